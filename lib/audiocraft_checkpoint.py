"""Fine-tuned MusicGen checkpoints in audiocraft's export format -> our transformers MusicGen.

audiocraft (and Replicate's MusicGen trainer) export `state_dict.bin` = {"xp.cfg": YAML string,
"best_state": {name: tensor}, "version", "exported"} (the LM) and `compression_state_dict.bin`: either the
same layout for a retrained EnCodec, or {"pretrained": "facebook/encodec_32khz"}, a reference to the base
one (what fine-tunes that keep EnCodec frozen write). The LM is converted into the decoder; a shipped
EnCodec into the model's `audio_encoder`; a reference keeps the base model's EnCodec. Files are read with
torch.load(weights_only=True): tensors, dicts and strings only, never arbitrary objects.

`replicate_weights` (a URL or a local path) points at a `state_dict.bin`, a tar / zip archive holding one
(as Replicate's trainer outputs), or a local folder holding one; archives and folders may hold a
`compression_state_dict.bin` beside it. `fetch_weights` downloads once (http/https only, size cap,
timeout), caches by content hash, and the conversions check configs and shapes against the loaded model.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from lib.errors import UserError

PARAM = "replicate_weights"
MAX_BYTES = int(os.environ.get("COG_MUSIC_MAX_WEIGHTS_BYTES", 16 * 2**30))
TIMEOUT_S = float(os.environ.get("COG_MUSIC_WEIGHTS_TIMEOUT_S", 600))
CACHE_DIR = Path(os.environ.get("COG_MUSIC_WEIGHTS_CACHE", Path(tempfile.gettempdir()) / "cog-music-finetunes"))
LM_FILE = "state_dict.bin"
COMPRESSION_FILE = "compression_state_dict.bin"


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


def _pick(names: list[str], near: Optional[str] = None) -> Optional[str]:
    """The archive member to use among same-named ones: the one beside `near` (the LM file), else the
    shallowest."""
    if near is not None:
        beside = [n for n in names if Path(n).parent == Path(near).parent]
        names = beside or names
    return sorted(names, key=lambda n: (n.count("/"), len(n)))[0] if names else None


@contextmanager
def _archive(path: Path):
    """{member name: opener} of a tar / zip archive (regular files only); None when `path` is no archive."""
    if zipfile.is_zipfile(path) and not _is_torch_zip(path):
        with zipfile.ZipFile(path) as z:
            yield {n: (lambda n=n: z.open(n)) for n in z.namelist() if not n.endswith("/")}
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as t:
            yield {m.name: (lambda m=m: t.extractfile(m)) for m in t.getmembers() if m.isfile()}
    else:
        yield None


def _extract(path: Path, lm_dest: Path, codec_dest: Path) -> tuple[Optional[Path], Optional[Path]]:
    """A tar / zip archive -> (its state_dict.bin, its compression_state_dict.bin or None), written to the
    two destinations; (None, None) when `path` is no archive (then it is the LM file itself)."""
    with _archive(path) as members:
        if members is None:
            return None, None
        member_lm = _pick([n for n in members if Path(n).name == LM_FILE])
        if member_lm is None:
            raise _err(f"the archive holds no {LM_FILE}")
        member_codec = _pick([n for n in members if Path(n).name == COMPRESSION_FILE], near=member_lm)
        for member, dest in ((member_codec, codec_dest), (member_lm, lm_dest)):
            if member is not None:
                with members[member]() as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
    return lm_dest, (codec_dest if member_codec else None)


def _is_torch_zip(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("data.pkl") for n in z.namelist())


def fetch_weights(ref: str) -> tuple[Path, Optional[Path], str]:
    """A URL, a local file or a local folder -> (local state_dict.bin, local compression_state_dict.bin or
    None, content hash). Downloads a URL once (cached by URL, then by content hash). An archive or a folder
    may hold a compression_state_dict.bin beside its state_dict.bin; a bare file is the LM alone."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    sources = None  # a folder: (its LM file, its compression file or None)
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
        if src.is_dir():
            if not (src / LM_FILE).is_file():
                raise _err(f"the folder {ref} holds no {LM_FILE}")
            sources = (src / LM_FILE, src / COMPRESSION_FILE if (src / COMPRESSION_FILE).is_file() else None)
        elif not src.is_file():
            raise _err(f"{ref} does not exist (give an http(s) URL or a path to {LM_FILE}, a folder holding it "
                       "or an archive of it)")
    if sources:
        digest = hashlib.sha256("".join(_sha256(p) for p in sources if p).encode()).hexdigest()
    else:
        digest = _sha256(src)
    lm, codec = CACHE_DIR / f"{digest}.lm.bin", CACHE_DIR / f"{digest}.compression.bin"
    if not lm.is_file():  # written last: its presence means this digest is complete
        tmp_lm = Path(tempfile.mkstemp(dir=CACHE_DIR, prefix="extract-")[1])
        tmp_codec = Path(tempfile.mkstemp(dir=CACHE_DIR, prefix="extract-")[1])
        try:
            if sources:
                got_lm, got_codec = tmp_lm, tmp_codec if sources[1] else None
                shutil.copyfile(sources[0], tmp_lm)
                if sources[1]:
                    shutil.copyfile(sources[1], tmp_codec)
            else:
                got_lm, got_codec = _extract(src, tmp_lm, tmp_codec)
                if got_lm is None:  # not an archive: the file is the LM
                    got_lm = tmp_lm
                    shutil.copyfile(src, tmp_lm)
            if got_codec is not None:
                os.replace(tmp_codec, codec)
            os.replace(got_lm, lm)
        finally:
            tmp_lm.unlink(missing_ok=True)
            tmp_codec.unlink(missing_ok=True)
    return lm, (codec if codec.is_file() else None), digest


# -- reading and converting ---------------------------------------------------------------------------

def _read(path: Path, what: str):
    """torch.load(weights_only=True) with a clear error naming `what` for truncated / foreign files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes
        raise _err(f"cannot read {what} (truncated or not a torch checkpoint): {type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200]}") from e


def _unpack(pkg, kind: str) -> tuple[dict, dict]:
    """An audiocraft export {"xp.cfg", "best_state", ...} -> (config dict, best_state)."""
    import yaml

    if not isinstance(pkg, dict) or "best_state" not in pkg or "xp.cfg" not in pkg:
        keys = sorted(map(str, pkg))[:8] if isinstance(pkg, dict) else type(pkg).__name__
        raise _err(f"not an audiocraft {kind} export (expected keys 'xp.cfg' and 'best_state', got {keys})")
    cfg = pkg["xp.cfg"]
    if isinstance(cfg, str):
        try:
            cfg = yaml.safe_load(cfg)
        except yaml.YAMLError as e:
            raise _err(f"the {kind} xp.cfg is not valid YAML: {e}") from e
    state = pkg["best_state"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # an un-exported training checkpoint keeps it one level down
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        raise _err(f"the {kind} xp.cfg / best_state have the wrong types")
    return cfg, state


def load_export(path: Path) -> tuple[dict, dict]:
    """state_dict.bin -> (config dict, best_state). Clear errors for truncated / foreign files."""
    return _unpack(_read(path, "the weights file"), "MusicGen")


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


# -- the compression model (EnCodec) ------------------------------------------------------------------
#
# audiocraft's EncodecModel (SEANet encoder/decoder + residual VQ) and transformers' EncodecModel build
# their layers in the same order, so the layer indices carry over; only the wrappers differ:
#   audiocraft                                        transformers (audio_encoder)
#   {encoder,decoder}.model.<i>.conv.conv.<p>         {encoder,decoder}.layers.<i>.conv.<p>
#   decoder.model.<i>.convtr.convtr.<p>               decoder.layers.<i>.conv.<p>
#   ....<i>.block.<j>.conv.conv.<p>                   ....<i>.block.<j>.conv.<p>   (same for shortcut.)
#   ....conv.norm.<p> / convtr.norm.<p>               ....norm.<p>                 (time_group_norm)
#   ....<i>.lstm.<p>                                  ....<i>.lstm.<p>
#   quantizer.vq.layers.<k>._codebook.<b>             quantizer.layers.<k>.codebook.<b>
# Weight norm is saved as weight_g / weight_v (torch.nn.utils.weight_norm, what audiocraft uses) or as
# parametrizations.weight.original0 / original1 (the parametrization API, what transformers uses now):
# the same two tensors (g: the norm per output slice, v: the direction), renamed to whichever the loaded
# model has. A convolution saved without weight norm (norm 'none') is split into g = |w|, v = w.

_WN_NEW = ("parametrizations.weight.original0", "parametrizations.weight.original1")
_WN_OLD = ("weight_g", "weight_v")
_CODEBOOK = re.compile(r"quantizer\.vq\.layers\.(\d+)\._codebook\.(inited|cluster_size|embed|embed_avg)")
_SEANET = re.compile(r"(encoder|decoder)\.model\.(\d+)\.(.+)")


def _wn_norm(v: torch.Tensor) -> torch.Tensor:
    """|v| over every dim but the first, kept broadcastable (torch's weight norm with dim=0)."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def codec_to_transformers(state: dict) -> dict:
    """audiocraft EncodecModel names -> transformers EncodecModel names (weight norm as parametrizations;
    `fit_weight_norm` then matches the loaded model's form). Unknown names come back prefixed with '?'."""
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        m = _CODEBOOK.fullmatch(key)
        if m:
            out[f"quantizer.layers.{m[1]}.codebook.{m[2]}"] = value
            continue
        m = _SEANET.fullmatch(key)
        if not m:
            out["?" + key] = value
            continue
        rest = m[3]
        rest = re.sub(r"^((?:block\.\d+\.|shortcut\.)?)(?:conv\.conv|convtr\.convtr)\.", r"\1conv.", rest)
        rest = re.sub(r"^((?:block\.\d+\.|shortcut\.)?)(?:conv|convtr)\.norm\.", r"\1norm.", rest)
        for old, new in zip(_WN_OLD, _WN_NEW):
            if rest.endswith("." + old):
                rest = rest[: -len(old)] + new
        if not re.match(r"^((block\.\d+\.|shortcut\.)?(conv|norm)\.|lstm\.)", rest):
            out["?" + key] = value
            continue
        out[f"{m[1]}.layers.{m[2]}.{rest}"] = value
    return out


def fit_weight_norm(state: dict, ours: dict) -> dict:
    """Rename / convert the weight-norm tensors of `state` (parametrization names, or plain `.weight`) into
    the form the loaded model's state dict `ours` uses."""
    out = {}
    for key, value in state.items():
        if key in ours or key.startswith("?"):
            out[key] = value
            continue
        prefix, new = next(((key[: -len(n)], i) for i, n in enumerate(_WN_NEW) if key.endswith(n)), (None, None))
        if prefix is not None and prefix + _WN_OLD[new] in ours:  # the model uses torch's old weight_norm
            out[prefix + _WN_OLD[new]] = value
        elif prefix is not None and prefix + "weight" in ours:  # the model has no weight norm here: fold
            if new == 0:
                g, v = state[prefix + _WN_NEW[0]], state.get(prefix + _WN_NEW[1])
                if v is None or g.shape[0] != v.shape[0]:
                    out[key] = value  # reported by the check as unknown
                else:
                    out[prefix + "weight"] = g * v / _wn_norm(v)
        elif key.endswith(".weight") and value.dim() == 3:  # saved without weight norm: split
            base = key[: -len("weight")]
            names = next((n for n in (_WN_NEW, _WN_OLD) if base + n[0] in ours), None)
            if names:
                out[base + names[0]], out[base + names[1]] = _wn_norm(value), value
            else:
                out[key] = value
        else:
            out[key] = value
    return out


def _cfg_value(cfg: dict, dotted: str, _depth: int = 0):
    """cfg["a"]["b"] for "a.b", following OmegaConf's ${a.b} references (exports keep them unresolved);
    None when absent or unresolvable."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, str):
        m = re.fullmatch(r"\$\{([\w.]+)\}", node.strip())
        if m:
            return _cfg_value(cfg, m[1], _depth + 1) if _depth < 8 else None
    return node


def check_codec_config(cfg: dict, encodec) -> None:
    """The settings of audiocraft's xp.cfg that decide what the codec computes, against the loaded model's
    EncodecConfig (shapes are checked separately). Not compared: pad_mode (the loaded model's padding is
    used, whatever the export says: transformers' own conversion of facebook/encodec_32khz keeps its default
    where audiocraft's config names 'constant')."""
    ours = encodec.config

    def differs(name, theirs, mine):
        if theirs is None or (isinstance(theirs, str) and "${" in theirs):
            return
        a = list(theirs) if isinstance(theirs, (list, tuple)) else theirs
        b = list(mine) if isinstance(mine, (list, tuple)) else mine
        if a != b:
            raise _err(f"the fine-tune's compression model ({COMPRESSION_FILE}) is not this model's EnCodec: "
                       f"{name}={theirs!r}, the loaded model has {mine!r}")

    differs("compression_model", _cfg_value(cfg, "compression_model"), "encodec")
    differs("encodec.autoencoder", _cfg_value(cfg, "encodec.autoencoder"), "seanet")
    differs("encodec.quantizer", _cfg_value(cfg, "encodec.quantizer"), "rvq")
    differs("sample_rate", _cfg_value(cfg, "sample_rate") or _cfg_value(cfg, "encodec.sample_rate"),
            int(ours.sampling_rate))
    differs("channels", _cfg_value(cfg, "channels") or _cfg_value(cfg, "encodec.channels"), int(ours.audio_channels))
    differs("encodec.causal", _cfg_value(cfg, "encodec.causal"), bool(ours.use_causal_conv))
    differs("encodec.renormalize", _cfg_value(cfg, "encodec.renormalize"), bool(ours.normalize))
    differs("rvq.bins", _cfg_value(cfg, "rvq.bins"), int(ours.codebook_size))
    differs("rvq.n_q", _cfg_value(cfg, "rvq.n_q"), len(encodec.quantizer.layers))
    seanet = {k: _cfg_value(cfg, f"seanet.{k}") for k in (_cfg_value(cfg, "seanet") or {})}
    mine = {"dimension": ours.hidden_size, "n_filters": ours.num_filters, "n_residual_layers":
            ours.num_residual_layers, "ratios": ours.upsampling_ratios, "lstm": ours.num_lstm_layers,
            "kernel_size": ours.kernel_size, "last_kernel_size": ours.last_kernel_size,
            "residual_kernel_size": ours.residual_kernel_size, "dilation_base": ours.dilation_growth_rate,
            "compress": ours.compress, "true_skip": not ours.use_conv_shortcut, "causal": ours.use_causal_conv,
            "norm": ours.norm_type, "activation": "ELU", "channels": ours.audio_channels}
    for part in ("encoder", "decoder"):
        merged = {k: v for k, v in seanet.items() if k not in ("encoder", "decoder")}
        merged.update(seanet.get(part) or {})
        for k, v in mine.items():
            differs(f"seanet.{part}.{k}" if k in (seanet.get(part) or {}) else f"seanet.{k}", merged.get(k), v)
        alpha = (merged.get("activation_params") or {}).get("alpha", 1.0)
        differs("seanet.activation_params.alpha", alpha, 1.0)
        if part == "decoder":
            differs("seanet.decoder.final_activation", merged.get("final_activation") or None, None)
            differs("seanet.decoder.trim_right_ratio", merged.get("trim_right_ratio"), ours.trim_right_ratio)


def check_codec(state: dict, encodec) -> None:
    ours = encodec.state_dict()
    unknown = [k.lstrip("?") for k in state if k.startswith("?") or k not in ours]
    missing = [k for k in ours if k not in state]
    if unknown or missing:
        raise _err(f"incompatible compression model ({COMPRESSION_FILE}): unknown {unknown[:4]}, "
                   f"missing {missing[:4]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise _err(f"incompatible compression model ({COMPRESSION_FILE}): {k} is {tuple(v.shape)}, the "
                       f"loaded model's EnCodec needs {tuple(ours[k].shape)}")


def load_codec(path: Path, model, log=None) -> Optional[dict]:
    """compression_state_dict.bin -> the loaded model's audio_encoder state (transformers names), or None
    when the export only names a pretrained codec (audiocraft's export_pretrained_compression_model, what
    fine-tunes that keep EnCodec frozen write): then the base model's EnCodec is kept."""
    pkg = _read(path, COMPRESSION_FILE)
    if isinstance(pkg, dict) and "pretrained" in pkg and "best_state" not in pkg:
        name = str(pkg["pretrained"]).removeprefix("//pretrained/")
        rate = int(model.config.audio_encoder.sampling_rate)
        khz = re.search(r"(\d+)\s*khz", name.lower())
        if name.lower().startswith(("dac", "wavtokenizer")) or (khz and int(khz[1]) * 1000 != rate):
            raise _err(f"the fine-tune's {COMPRESSION_FILE} names the compression model {name!r}, but this MusicGen "
                       f"decodes with its own {rate // 1000} kHz EnCodec: pick weights trained on "
                       "facebook/encodec_32khz codes")
        if log:
            log(f"replicate_weights: {COMPRESSION_FILE} refers to the pretrained {name}: keeping the base "
                "model's EnCodec")
        return None
    cfg, state = _unpack(pkg, "compression model")
    check_codec_config(cfg, model.audio_encoder)
    ours = model.audio_encoder.state_dict()
    converted = fit_weight_norm(codec_to_transformers(state), ours)
    check_codec(converted, model.audio_encoder)
    return converted


class FineTune:
    """Converted fine-tune weights, ready to swap into a loaded MusicGen (in place, then restored): the LM
    decoder and its projections, and the EnCodec when the fine-tune ships its own (`codec_state`)."""

    def __init__(self, digest: str, decoder_state: dict, top: dict, codec_state: Optional[dict] = None):
        self.digest, self.decoder_state, self.top, self.codec_state = digest, decoder_state, top, codec_state

    @classmethod
    def load(cls, ref: str, model, log=None) -> "FineTune":
        path, codec_path, digest = fetch_weights(ref)
        cfg, state = load_export(path)
        decoder_state, top = to_transformers(state, model.decoder.config.hidden_size)
        check_compatible(cfg, decoder_state, top, model)
        codec_state = load_codec(codec_path, model, log) if codec_path is not None else None
        return cls(digest, decoder_state, top, codec_state)

    def _targets(self, model):
        params = dict(model.decoder.named_parameters())
        params.update({k: v for k, v in model.decoder.named_buffers() if k in self.decoder_state})
        for k, v in self.decoder_state.items():
            yield params[k], v
        for name, v in self.top.items():
            mod, _, pname = name.partition(".")
            yield getattr(getattr(model, mod), pname), v
        if self.codec_state:
            codec = dict(model.audio_encoder.named_parameters())
            codec.update(model.audio_encoder.named_buffers())
            for k, v in self.codec_state.items():
                yield codec[k], v

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
