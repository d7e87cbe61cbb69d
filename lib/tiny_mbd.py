"""A tiny RANDOM Multi-Band Diffusion checkpoint in the published layout (mbd_musicgen_32khz.th).

The real file is a torch pickle {"sample_rate", "n_bands", i: {"cfg": omegaconf DictConfig,
"model_state", "processor_state"}}. omegaconf is not a dependency here, so the configs are written as
the same pickle records omegaconf produces (DictConfig / ListConfig / AnyNode objects with `_metadata`,
`_parent`, `_content` / `_val` state) by a pickler that names our stand-in classes after omegaconf's.
lib.mbd must read it through torch.load(weights_only=True) exactly as it reads the real one.
"""
from __future__ import annotations

import pickle
import typing
from pathlib import Path

import torch

from lib.mbd import CHECKPOINT_FILE, BandSplitter, DiffusionUNet

_OMEGA_NAMES = {}


def _omega(full: str):
    module, _, name = full.rpartition(".")

    class _Rec:
        def __init__(self, state):
            self.state = state

        def __reduce_ex__(self, protocol):
            import copyreg

            return copyreg.__newobj__, (type(self),), self.state

    _Rec.__name__ = _Rec.__qualname__ = name
    _OMEGA_NAMES[_Rec] = (module, name)
    return _Rec


_DictConfig = _omega("omegaconf.dictconfig.DictConfig")
_ListConfig = _omega("omegaconf.listconfig.ListConfig")
_ContainerMetadata = _omega("omegaconf.base.ContainerMetadata")
_Metadata = _omega("omegaconf.base.Metadata")
_AnyNode = _omega("omegaconf.nodes.AnyNode")


def _container_meta(key, list_=False):
    return _ContainerMetadata({"ref_type": typing.Any, "object_type": list if list_ else dict, "optional": True,
                               "key": key, "flags": {}, "flags_root": False, "resolver_cache": {},
                               "key_type": int if list_ else typing.Any, "element_type": typing.Any})


def to_omegaconf_records(value, key=None, parent=None):
    """A plain config -> the objects an omegaconf DictConfig pickles as."""
    if isinstance(value, dict):
        node = _DictConfig({"_metadata": _container_meta(key), "_parent": parent, "_content": None})
        node.state["_content"] = {k: to_omegaconf_records(v, k, node) for k, v in value.items()}
        return node
    if isinstance(value, (list, tuple)):
        node = _ListConfig({"_metadata": _container_meta(key, True), "_parent": parent, "_content": None})
        node.state["_content"] = [to_omegaconf_records(v, i, node) for i, v in enumerate(value)]
        return node
    meta = _Metadata({"ref_type": typing.Any, "object_type": None, "optional": True, "key": key, "flags": {},
                      "flags_root": False, "resolver_cache": {}})
    return _AnyNode({"_metadata": meta, "_parent": parent, "_val": value})


class _Pickler(pickle._Pickler):
    def save_global(self, obj, name=None):
        if obj in _OMEGA_NAMES:
            module, qual = _OMEGA_NAMES[obj]
            self.write(pickle.GLOBAL + f"{module}\n{qual}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)



class _PickleModule:
    Pickler = _Pickler
    Unpickler = pickle.Unpickler
    load = pickle.load


def band_config(band: int, *, hidden: int = 8, depth: int = 3, transformer: bool = True, bilstm: bool = False,
                cross_attention: bool = False, codec_dim: int = 16, growth: float = 2,
                sample_rate: int = 32000) -> dict:
    """The per-band training config (the fields MultiBandDiffusion reads), as the 4-band grid sets them:
    bands 2 and 3 use the multi-band processor (power_std 0.4 / 0.75)."""
    return {
        "sample_rate": sample_rate, "channels": 1, "device": "cpu", "solver": "diffusion",
        "diffusion_unet": {"hidden": hidden, "depth": depth, "res_blocks": 1, "norm_groups": 4, "kernel": 8,
                           "stride": 4, "growth": growth, "max_channels": 10_000, "dropout": 0.0,
                           "emb_all_layers": True, "bilstm": bilstm, "codec_dim": codec_dim,
                           "transformer": transformer, "cross_attention": cross_attention},
        "schedule": {"repartition": "power", "variable_step_batch": True, "beta_t0": 1.0e-5, "beta_t1": 2.9e-2,
                     "beta_exp": 7.5, "num_steps": 1000, "variance": "beta", "clip": 5.0, "rescale": 1.0,
                     "n_bands": None, "noise_scale": 1.0},
        "processor": {"name": "multi_band_processor", "use": band >= 2, "n_bands": 8, "num_samples": 10_000,
                      "power_std": [0.4, 0.4, 0.4, 0.75][band]},
        "filter": {"use": True, "n_bands": 4, "idx_band": band, "cutoffs": None},
        "dataset": {"generate": {"audio": {"sample_rate": "${sample_rate}"}}},
    }


def build_checkpoint(seed: int = 0, n_bands: int = 4, **unet_kwargs) -> dict:
    """The checkpoint as a plain dict (configs still plain dicts); random U-Nets and processor stats."""
    gen = torch.Generator().manual_seed(seed)
    pkg = {"sample_rate": 32000, "n_bands": n_bands}
    for b in range(n_bands):
        cfg = band_config(b, **unet_kwargs)
        torch.manual_seed(seed * 100 + b)
        unet = DiffusionUNet(chin=1, num_steps=1000, **cfg["diffusion_unet"])
        with torch.no_grad():  # GroupNorm / LayerNorm start at identity: randomize them so all weights matter
            for name, p in unet.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        state = {k: v for k, v in unet.state_dict().items()}
        # torch's MultiheadAttention stores attention weights under `mha.` (as in the real file)
        proc = {}
        if cfg["processor"]["use"]:
            nb = cfg["processor"]["n_bands"]
            proc = {"counts": torch.tensor([10_000.0]),
                    "sum_x": 1e-3 * torch.randn(nb, generator=gen) * 10_000,
                    "sum_x2": (0.01 + torch.rand(nb, generator=gen) * 0.05) * 10_000,
                    "sum_target_x2": (0.1 + torch.rand(nb, generator=gen)) * 10_000,
                    # the processor's band-split filters are a (persistent) buffer of the real file too
                    "split_bands.lowpass.filters": BandSplitter(32000, nb).filters[:, None].clone()}
        pkg[b] = {"cfg": cfg, "model_state": state, "processor_state": proc}
    return pkg


def save_checkpoint(pkg: dict, path: Path) -> Path:
    """Write `pkg` with its configs pickled as omegaconf DictConfigs (the real file's layout)."""
    out = dict(pkg)
    for b in range(pkg["n_bands"]):
        out[b] = dict(pkg[b], cfg=to_omegaconf_records(pkg[b]["cfg"]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path, pickle_module=_PickleModule, pickle_protocol=2)
    return path


def write_mbd(directory: Path, seed: int = 0) -> Path:
    directory = Path(directory)
    save_checkpoint(build_checkpoint(seed), directory / CHECKPOINT_FILE)
    (directory / "TINY_RANDOM_WEIGHTS").write_text("Random weights for tests: the audio is noise.\n")
    return directory
