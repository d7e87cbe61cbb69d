"""Fine-tuned MusicGen LMs in audiocraft's export format -> our transformers MusicGen decoder.

audiocraft (and Replicate's MusicGen trainer) export `state_dict.bin` = {"xp.cfg": YAML string,
"best_state": {name: tensor}, "version", "exported"} and `compression_state_dict.bin` (the EnCodec, or
{"pretrained": "facebook/encodec_32khz"} - a reference to the base one). Fine-tunes keep EnCodec frozen,
so we keep the base model's EnCodec and convert the LM only. Files are read with
torch.load(weights_only=True): tensors, dicts and strings only, never arbitrary objects.

`replicate_weights` (a URL or a local path) points at either a `state_dict.bin` or a tar / zip archive
holding one (as Replicate's trainer outputs). `fetch_weights` downloads once (http/https only, size cap,
timeout), caches by content hash, and `convert` checks the shapes against the loaded base model.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import torch

from lib.errors import UserError

PARAM = "replicate_weights"
MAX_BYTES = int(os.environ.get("COG_MUSIC_MAX_WEIGHTS_BYTES", 16 * 2**30))
TIMEOUT_S = float(os.environ.get("COG_MUSIC_WEIGHTS_TIMEOUT_S", 600))
CACHE_DIR = Path(os.environ.get("COG_MUSIC_WEIGHTS_CACHE", Path(tempfile.gettempdir()) / "cog-music-finetunes"))
LM_FILE = "state_dict.bin"


def _err(msg: str) -> UserError:
    return UserError(PARAM, msg)


# -- fetching -----------------------------------------------------------------------------------------

def _download(url: str, dest: Path) -> None:
    import requests

    try:
        with requests.get(url, stream=True, timeout=(30, TIMEOUT_S), allow_redirects=True) as r:
            if r.status_code != 200:
                raise _err(f"downloading {url} failed: HTTP {r.status_code}")
            declared = r.headers.get("Content-Length")
            if declared and int(declared) > MAX_BYTES:
                raise _err(f"{url} is {int(declared) / 2**30:.1f} GiB, over the {MAX_BYTES / 2**30:.0f} GiB limit")
            got = 0
            with open(dest, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    got += len(chunk)
                    if got > MAX_BYTES:
                        raise _err(f"{url} is over the {MAX_BYTES / 2**30:.0f} GiB limit")
                    f.write(chunk)
            if declared and got != int(declared):
                raise _err(f"download of {url} is truncated ({got} of {declared} bytes)")
    except requests.RequestException as e:
        raise _err(f"downloading {url} failed: {type(e).__name__}: {e}") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _extract_lm(path: Path, dest: Path) -> Path:
    """`path` itself, or the state_dict.bin inside a tar / zip archive."""
    if zipfile.is_zipfile(path) and not _is_torch_zip(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if Path(n).name == LM_FILE]
            if not names:
                raise _err(f"the archive holds no {LM_FILE}")
            with z.open(sorted(names, key=len)[0]) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
        return dest
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as t:
            members = [m for m in t.getmembers() if m.isfile() and Path(m.name).name == LM_FILE]
            if not members:
                raise _err(f"the archive holds no {LM_FILE}")
            with t.extractfile(sorted(members, key=lambda m: len(m.name))[0]) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
        return dest
    return path


def _is_torch_zip(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("data.pkl") for n in z.namelist())


def fetch_weights(ref: str) -> tuple[Path, str]:
    """A URL or local path -> (local LM file, its content hash). Downloads a URL once (cached by URL, then
    by content hash)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", ref):
        if not ref.lower().startswith(("http://", "https://")):
            raise _err(f"only http(s) URLs or local paths are accepted, got {ref.split(':', 1)[0]}://")
        by_url = CACHE_DIR / ("url-" + hashlib.sha256(ref.encode()).hexdigest())
        if not by_url.is_file():
            tmp = Path(tempfile.mkstemp(dir=CACHE_DIR, prefix="download-")[1])
            try:
                _download(ref, tmp)
                os.replace(tmp, by_url)
            finally:
                tmp.unlink(missing_ok=True)
        src = by_url
    else:
        src = Path(ref).expanduser()
        if not src.is_file():
            raise _err(f"{ref} does not exist (give an http(s) URL or a path to {LM_FILE} or an archive of it)")
    digest = _sha256(src)
    lm = CACHE_DIR / f"{digest}.bin"
    if not lm.is_file():
        tmp = Path(tempfile.mkstemp(dir=CACHE_DIR, prefix="extract-")[1])
        try:
            got = _extract_lm(src, tmp)
            if got == src:
                shutil.copyfile(src, tmp)
            os.replace(tmp, lm)
        finally:
            tmp.unlink(missing_ok=True)
    return lm, digest


# -- reading and converting ---------------------------------------------------------------------------

def load_export(path: Path) -> tuple[dict, dict]:
    """state_dict.bin -> (config dict, best_state). Clear errors for truncated / foreign files."""
    import yaml

    try:
        pkg = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes
        raise _err(f"cannot read the weights file (truncated or not a torch checkpoint): {type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200]}") from e
    if not isinstance(pkg, dict) or "best_state" not in pkg or "xp.cfg" not in pkg:
        keys = sorted(map(str, pkg))[:8] if isinstance(pkg, dict) else type(pkg).__name__
        raise _err(f"not an audiocraft MusicGen export (expected keys 'xp.cfg' and 'best_state', got {keys})")
    cfg = pkg["xp.cfg"]
    if isinstance(cfg, str):
        try:
            cfg = yaml.safe_load(cfg)
        except yaml.YAMLError as e:
            raise _err(f"its xp.cfg is not valid YAML: {e}") from e
    state = pkg["best_state"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # an un-exported training checkpoint keeps it one level down
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        raise _err("its xp.cfg / best_state have the wrong types")
    return cfg, state


_RENAMES = [
    (r"^emb\.(\d+)\.", r"model.decoder.embed_tokens.\1."),
    (r"^transformer\.layers\.(\d+)\.", r"model.decoder.layers.\1."),
    (r"\.cross_attention\.", ".encoder_attn."),
    (r"\.linear1\.", ".fc1."),
    (r"\.linear2\.", ".fc2."),
    (r"\.norm1\.", ".self_attn_layer_norm."),
    (r"\.norm_cross\.", ".encoder_attn_layer_norm."),
    (r"\.norm2\.", ".final_layer_norm."),
    (r"^out_norm\.", "model.decoder.layer_norm."),
    (r"^linears\.(\d+)\.", r"lm_heads.\1."),
]
_PROJECTIONS = {"condition_provider.conditioners.description.output_proj.": "enc_to_dec_proj.",
                "condition_provider.conditioners.self_wav.output_proj.": "audio_enc_to_dec_proj."}


def to_transformers(state: dict, hidden: int) -> tuple[dict, dict]:
    """audiocraft LM names -> (decoder state for MusicgenForCausalLM, top-level projections)."""
    decoder, top = {}, {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        proj = next((p for p in _PROJECTIONS if key.startswith(p)), None)
        if proj:
            top[_PROJECTIONS[proj] + key[len(proj):]] = value
            continue
        if key.startswith(("condition_provider.", "fuser.")):
            continue  # text-conditioner internals we do not use (T5 stays the base model's)
        new = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        if new.endswith("in_proj_weight"):
            base = new[: -len("in_proj_weight")]
            decoder[base + "q_proj.weight"] = value[:hidden]
            decoder[base + "k_proj.weight"] = value[hidden:2 * hidden]
            decoder[base + "v_proj.weight"] = value[2 * hidden:]
        elif new.endswith(".self_attn.out_proj.weight") or new.endswith(".encoder_attn.out_proj.weight") \
                or new.startswith(("model.decoder.", "lm_heads.")):
            decoder[new] = value
        else:
            decoder["?" + key] = value  # unknown: reported by check_compatible
    return decoder, top


def from_transformers(model, perturb: Optional[callable] = None) -> dict:
    """Our MusicGen -> audiocraft LM names (the inverse of to_transformers): tests build fine-tunes with it."""
    inverse = {}
    for key, value in model.decoder.state_dict().items():
        if "embed_positions" in key:
            continue
        k = key
        k = re.sub(r"^model\.decoder\.embed_tokens\.(\d+)\.", r"emb.\1.", k)
        k = re.sub(r"^model\.decoder\.layers\.(\d+)\.", r"transformer.layers.\1.", k)
        k = k.replace(".encoder_attn_layer_norm.", ".norm_cross.").replace(".encoder_attn.", ".cross_attention.")
        k = k.replace(".fc1.", ".linear1.").replace(".fc2.", ".linear2.")
        k = k.replace(".self_attn_layer_norm.", ".norm1.").replace(".final_layer_norm.", ".norm2.")
        k = re.sub(r"^model\.decoder\.layer_norm\.", "out_norm.", k)
        k = re.sub(r"^lm_heads\.(\d+)\.", r"linears.\1.", k)
        inverse[k] = value.detach().clone()
    fused = {}
    for k in list(inverse):
        m = re.match(r"(.*)\.(q|k|v)_proj\.weight$", k)
        if m:
            fused.setdefault(m.group(1), {})[m.group(2)] = inverse.pop(k)
    for base, parts in fused.items():
        inverse[base + ".in_proj_weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if getattr(model, "enc_to_dec_proj", None) is not None:
        for n, v in model.enc_to_dec_proj.state_dict().items():
            inverse[f"condition_provider.conditioners.description.output_proj.{n}"] = v.detach().clone()
    if getattr(model, "audio_enc_to_dec_proj", None) is not None:
        for n, v in model.audio_enc_to_dec_proj.state_dict().items():
            inverse[f"condition_provider.conditioners.self_wav.output_proj.{n}"] = v.detach().clone()
    if perturb is not None:
        inverse = {k: perturb(k, v) for k, v in inverse.items()}
    return inverse


def lm_config(model) -> dict:
    """The xp.cfg fields an export of `model` carries (what audiocraft's trainer writes)."""
    dec = model.decoder.config
    return {"solver": "musicgen", "sample_rate": int(model.config.audio_encoder.sampling_rate),
            "channels": int(dec.audio_channels), "interleave_stereo_codebooks": {"use": dec.audio_channels == 2},
            "transformer_lm": {"dim": dec.hidden_size, "num_heads": dec.num_attention_heads,
                               "num_layers": dec.num_hidden_layers, "n_q": dec.num_codebooks,
                               "card": dec.vocab_size, "hidden_scale": dec.ffn_dim // dec.hidden_size},
            "codebooks_pattern": {"modeling": "delay"}}


def check_compatible(cfg: dict, decoder_state: dict, top: dict, model) -> None:
    lm = cfg.get("transformer_lm") or {}
    dec = model.decoder.config
    want = {"dim": dec.hidden_size, "num_layers": dec.num_hidden_layers, "n_q": dec.num_codebooks,
            "card": dec.vocab_size}
    for k, v in want.items():
        if k in lm and int(lm[k]) != int(v):
            raise _err(f"these weights are for a different MusicGen ({k}={lm[k]}, the loaded model has {v}): "
                       "pick the model_version they were fine-tuned from")
    unknown = [k[1:] for k in decoder_state if k.startswith("?")]
    ours = {k: v for k, v in model.decoder.state_dict().items() if "embed_positions" not in k}
    missing = [k for k in ours if k not in decoder_state]
    if unknown or missing:
        raise _err(f"incompatible LM weights: unknown {unknown[:4]}, missing {missing[:4]}")
    for k, v in decoder_state.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise _err(f"incompatible LM weights: {k} is {tuple(v.shape)}, the loaded model needs "
                       f"{tuple(ours[k].shape)}: pick the model_version they were fine-tuned from")
    for name, tensor in top.items():
        mod, _, pname = name.partition(".")
        target = getattr(model, mod, None)
        if target is None or tuple(getattr(target, pname).shape) != tuple(tensor.shape):
            raise _err(f"incompatible LM weights: {name} does not fit the loaded model")


def save_export(model, path: Path, perturb=None) -> Path:
    """Write `model`'s LM as audiocraft's export (state_dict.bin). Tests make tiny fine-tunes with it."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"best_state": from_transformers(model, perturb), "xp.cfg": yaml.safe_dump(lm_config(model)),
                "version": "1.3.0", "exported": True}, path)
    return path


class FineTune:
    """Converted fine-tune weights, ready to swap into a loaded MusicGen (in place, then restored)."""

    def __init__(self, digest: str, decoder_state: dict, top: dict):
        self.digest, self.decoder_state, self.top = digest, decoder_state, top

    @classmethod
    def load(cls, ref: str, model) -> "FineTune":
        path, digest = fetch_weights(ref)
        cfg, state = load_export(path)
        decoder_state, top = to_transformers(state, model.decoder.config.hidden_size)
        check_compatible(cfg, decoder_state, top, model)
        return cls(digest, decoder_state, top)

    def _targets(self, model):
        params = dict(model.decoder.named_parameters())
        params.update({k: v for k, v in model.decoder.named_buffers() if k in self.decoder_state})
        for k, v in self.decoder_state.items():
            yield params[k], v
        for name, v in self.top.items():
            mod, _, pname = name.partition(".")
            yield getattr(getattr(model, mod), pname), v

    def swapped_into(self, model):
        """Context manager: the model runs with these weights inside, its own weights restored after."""
        from contextlib import contextmanager

        @contextmanager
        def swap():
            backup = []
            with torch.no_grad():
                try:
                    for target, value in self._targets(model):
                        backup.append((target, target.detach().to("cpu", copy=True)))
                        target.copy_(value.to(target.device, target.dtype))
                    yield model
                finally:
                    for target, saved in backup:
                        target.copy_(saved.to(target.device))
        return swap()
