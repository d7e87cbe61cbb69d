"""Multi-Band Diffusion (MBD): EnCodec codes -> waveform, a diffusion decoder per frequency band.

Our implementation of the decoder described in "From Discrete Tokens to High-Fidelity Audio Using
Multi-Band Diffusion" (San Roman et al., 2023), loading the published MusicGen checkpoint
(facebook/multiband-diffusion, `mbd_musicgen_32khz.th`). Read `MultiBandDiffusion.decode` top to bottom:

1. condition = the EnCodec quantizer's embedding of the codes (B, 128, T) at 50 Hz; reference = the
   plain EnCodec decode of the same codes.
2. per band b (4 of them): start from Gaussian noise (B, 1, N) and run the band's U-Net denoiser through
   20 steps of the published power schedule (beta_t = linspace(b0^(1/e), b1^(1/e))^e, 1000 training steps
   subsampled every 50), with the DDPM posterior variance, clamped at `clip` each step; bands 2 and 3 then
   go back through their "processor" (per mel sub-band energy rescaling, whose statistics are in the
   checkpoint). The band outputs are summed.
3. band-wise energy re-matching: split the sum and the reference into 32 mel-spaced bands and scale each
   band of the sum by std(reference band) / std(diffusion band) (over the whole batch, as the reference
   implementation does, so left and right of a stereo pair share the gains).

Checkpoint layout: a torch pickle {"sample_rate", "n_bands", 0..n-1: {"cfg", "model_state",
"processor_state"}} where each "cfg" is an omegaconf DictConfig. We never unpickle arbitrary objects:
torch.load(weights_only=True) with inert stand-ins allow-listed under omegaconf's class names, then the
stand-ins are turned into plain dicts.

Stereo: left and right code streams are decoded as two batch items. Any duration: the U-Net is fully
convolutional (plus an optional bottleneck transformer / BLSTM over time); nothing limits the length but
memory. On GPU the U-Nets run in bf16 (the diffusion state stays float32), each band's U-Net call is
replayed as a CUDA graph after its first step, and group norm takes a parallel path (see _GroupNorm).
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from lib.cuda_graphs import DenoiserGraphs
from lib.group_norm import group_norm

CHECKPOINT_FILE = "mbd_musicgen_32khz.th"
EQ_BANDS = 32  # bands of the final energy re-matching (tokens_to_wav's default)


# ---------------------------------------------------------------------------------------------------
# Reading the checkpoint without unpickling arbitrary objects
# ---------------------------------------------------------------------------------------------------

class _Inert:
    """Stand-in for an omegaconf object: pickle's BUILD stores its state here and nothing runs."""

    def __setstate__(self, state):
        self.state = state


def _stand_in(full_name: str):
    module, _, name = full_name.rpartition(".")
    return type(name, (_Inert,), {"__module__": module, "__qualname__": name})


def _defaultdict(*args, **kwargs):  # omegaconf metadata holds a defaultdict(dict): keep it a plain dict
    return {}


class _TypingMarker:
    pass


_OMEGACONF_CLASSES = ["omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
                      "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
                      "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode",
                      "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode", "omegaconf.nodes.EnumNode",
                      "omegaconf.nodes.BytesNode", "omegaconf.nodes.PathNode",
                      "omegaconf.nodes.InterpolationResultNode"]
_MARKERS = ["typing.Any", "typing.Dict", "typing.List", "typing.Union", "typing.Optional", "builtins.dict",
            "builtins.list", "builtins.int", "builtins.float", "builtins.str", "builtins.bool", "builtins.object",
            "__builtin__.dict", "__builtin__.list", "__builtin__.long", "__builtin__.int", "__builtin__.float",
            "__builtin__.str", "__builtin__.bool", "__builtin__.object"]


def safe_globals():
    """The allow-list under which a checkpoint holding omegaconf configs loads with weights_only=True."""
    allowed = [(_stand_in(n), n) for n in _OMEGACONF_CLASSES]
    allowed += [(_defaultdict, "collections.defaultdict")]
    allowed += [(type(n, (_TypingMarker,), {}), n) for n in _MARKERS]
    return allowed


def load_weights_only(path) -> dict:
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def to_plain(obj):
    """omegaconf stand-ins (and containers of them) -> plain dicts / lists / values."""
    if isinstance(obj, _Inert):
        state = getattr(obj, "state", {}) or {}
        if "_content" in state:
            return to_plain(state["_content"])
        if "_val" in state:
            return to_plain(state["_val"])
        return None
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


_INTERP = re.compile(r"^\$\{([^}]+)\}$")


def resolve(cfg, root=None):
    """Resolve whole-value ${a.b} interpolations against the root config (all MBD configs need)."""
    root = cfg if root is None else root
    if isinstance(cfg, dict):
        return {k: resolve(v, root) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [resolve(v, root) for v in cfg]
    if isinstance(cfg, str):
        m = _INTERP.match(cfg)
        if m:
            node = root
            for part in m.group(1).split("."):
                if not isinstance(node, dict) or part not in node:
                    return cfg
                node = node[part]
            return resolve(node, root)
    return cfg


# ---------------------------------------------------------------------------------------------------
# Mel-spaced band splitting with windowed-sinc low-pass filters (FFT convolution)
# ---------------------------------------------------------------------------------------------------

def _mel_cutoffs(n_bands: int, sample_rate: float) -> list[float]:
    def hz_to_mel(f):
        return 2595 * torch.log10(1 + f / 700)

    low = hz_to_mel(torch.tensor(0.0)).item()
    high = hz_to_mel(torch.tensor(float(sample_rate / 2))).item()
    mels = torch.linspace(low, high, n_bands + 1)
    hz = 700 * (10 ** (mels / 2595) - 1)
    return [float(c) for c in hz[1:-1]]


class BandSplitter(nn.Module):
    """Splits (*, T) into (n_bands, *, T) bands evenly spaced in mel scale; the bands sum to the input.

    Each cutoff is a Hann-windowed sinc low-pass (8 zero crossings at the lowest cutoff, normalized to
    unit DC gain, replicate-padded edges); band i = lowpass_i - lowpass_{i-1}, the last = input - last
    lowpass. Applied with one FFT over the whole signal."""

    def __init__(self, sample_rate: float, n_bands: int, zeros: float = 8):
        super().__init__()
        self.n_bands = n_bands
        cutoffs = [c / sample_rate for c in _mel_cutoffs(n_bands, sample_rate)]
        self.half = int(zeros / min(cutoffs) / 2)
        t = torch.arange(-self.half, self.half + 1, dtype=torch.float32)
        window = torch.hann_window(2 * self.half + 1, periodic=False)
        filters = []
        for c in cutoffs:
            x = 2 * c * math.pi * t
            sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(x) / x)
            f = 2 * c * window * sinc
            filters.append(f / f.sum())
        self.register_buffer("filters", torch.stack(filters), persistent=False)  # (n-1, K)

    def lowpasses(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).float()
        padded = F.pad(flat[:, None], (self.half, self.half), mode="replicate")[:, 0]
        n = padded.shape[-1]
        spec = torch.fft.rfft(padded, n=n)  # (R, n//2+1)
        kernel = torch.fft.rfft(self.filters.float(), n=n)  # (F, n//2+1)
        # correlation with the (symmetric) filter = conv; valid part starts at 0 and has the input length
        out = torch.fft.irfft(spec[None] * kernel.conj()[:, None], n=n)[..., :shape[-1]]
        return out.reshape(len(self.filters), *shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lows = self.lowpasses(x)
        zero = torch.zeros_like(lows[:1])
        return torch.cat([lows, x.float()[None]]) - torch.cat([zero, lows])


# ---------------------------------------------------------------------------------------------------
# The per-band denoiser: a 1-D U-Net (parameter names follow the checkpoint)
# ---------------------------------------------------------------------------------------------------

class _GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose statistics are parallel reductions on CUDA (lib.group_norm: torch's kernel runs 4 thread
    blocks for a whole 30 s band, 83% of a U-Net call on an H100)."""

    def forward(self, x):
        if not x.is_cuda:
            return super().forward(x)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class _ResBlock(nn.Module):
    def __init__(self, channels: int, norm_groups: int, dilation: int):
        super().__init__()
        self.norm1 = _GroupNorm(norm_groups, channels)
        self.conv1 = nn.Conv1d(channels, channels, 3, 1, dilation, dilation=dilation)
        self.norm2 = _GroupNorm(norm_groups, channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, 1, dilation, dilation=dilation)

    def forward(self, x):
        h = self.conv1(F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        return x + h


class _Down(nn.Module):
    def __init__(self, chin, chout, kernel, stride, norm_groups, res_blocks):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(chin, chout, kernel, stride, (kernel - stride) // 2, bias=False)
        self.norm = _GroupNorm(norm_groups, chout)
        self.res_blocks = nn.Sequential(*[_ResBlock(chout, norm_groups, 2 ** i) for i in range(res_blocks)])

    def forward(self, x):
        x = F.pad(x, (0, (-x.shape[-1]) % self.stride))
        return self.res_blocks(F.relu(self.norm(self.conv(x))))


class _Up(nn.Module):
    def __init__(self, chin, chout, kernel, stride, norm_groups, res_blocks):
        super().__init__()
        self.res_blocks = nn.Sequential(*[_ResBlock(chin, norm_groups, 2 ** i) for i in range(res_blocks)])
        self.norm = _GroupNorm(norm_groups, chin)
        self.convtr = nn.ConvTranspose1d(chin, chout, kernel, stride, (kernel - stride) // 2, bias=False)

    def forward(self, x):
        return self.convtr(F.relu(self.norm(self.res_blocks(x))))


class _Attention(nn.Module):
    """Multi-head attention without biases; parameters as torch's MultiheadAttention (`mha.` prefix)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.mha = nn.Module()
        self.mha.in_proj_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * dim, dim)))
        self.mha.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, q_in, kv_in=None):
        b, t, d = q_in.shape
        w = self.mha.in_proj_weight
        if kv_in is None:
            q, k, v = F.linear(q_in, w).chunk(3, dim=-1)
        else:
            q = F.linear(q_in, w[:d])
            k, v = F.linear(kv_in, w[d:]).chunk(2, dim=-1)
        q, k, v = (z.reshape(b, z.shape[1], self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.mha.out_proj(out.transpose(1, 2).reshape(b, t, d))


class _TransformerLayer(nn.Module):
    """Post-norm transformer layer (ReLU feed-forward of 2048, no biases in projections)."""

    def __init__(self, dim: int, heads: int, cross: bool, ff: int = 2048):
        super().__init__()
        self.self_attn = _Attention(dim, heads)
        self.linear1 = nn.Linear(dim, ff, bias=False)
        self.linear2 = nn.Linear(ff, dim, bias=False)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        if cross:
            self.cross_attention = _Attention(dim, heads)
            self.norm_cross = nn.LayerNorm(dim)
        else:
            self.cross_attention = None

    def forward(self, src, cross_src=None):
        x = self.norm1(src + self.self_attn(src))
        if self.cross_attention is not None:
            # the reference adds the cross-attention of the layer INPUT (not of x) to x: kept as trained
            x = self.norm_cross(x + self.cross_attention(src, cross_src))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


def _sin_embedding(length: int, dim: int, device, dtype, max_period: float = 10_000.0):
    half = dim // 2
    pos = torch.arange(length, device=device, dtype=dtype).view(1, -1, 1)
    adim = torch.arange(half, device=device, dtype=dtype).view(1, 1, -1)
    phase = pos / (torch.full([], max_period, device=device, dtype=dtype) ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class _Transformer(nn.Module):
    def __init__(self, dim: int, cross: bool, heads: int = 8, layers: int = 6):
        super().__init__()
        self.layers = nn.ModuleList([_TransformerLayer(dim, heads, cross) for _ in range(layers)])

    def forward(self, x, cross_src=None):
        x = x + _sin_embedding(x.shape[1], x.shape[2], x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cross_src)
        return x


class _BLSTM(nn.Module):
    def __init__(self, dim: int, layers: int = 2):
        super().__init__()
        self.lstm = nn.LSTM(bidirectional=True, num_layers=layers, hidden_size=dim, input_size=dim)
        self.linear = nn.Linear(2 * dim, dim)

    def forward(self, x):  # (B, C, T)
        y = self.linear(self.lstm(x.permute(2, 0, 1))[0])
        return y.permute(1, 2, 0)


class DiffusionUNet(nn.Module):
    """Denoiser for one band: x_t (B, 1, N), step, EnCodec embedding (B, D, T) -> predicted noise."""

    def __init__(self, chin: int = 1, hidden: int = 24, depth: int = 3, growth: float = 2.0,
                 max_channels: int = 10_000, num_steps: int = 1000, emb_all_layers: bool = False,
                 cross_attention: bool = False, bilstm: bool = False, transformer: bool = False,
                 codec_dim: Optional[int] = None, kernel: int = 4, stride: int = 2, norm_groups: int = 4,
                 res_blocks: int = 1, dropout: float = 0.0, **unused):
        super().__init__()
        if unused.get("activation") not in (None, "ReLU", "relu"):
            raise ValueError(f"unsupported U-Net activation {unused['activation']!r}")
        self.encoders, self.decoders = nn.ModuleList(), nn.ModuleList()
        self.embedding = nn.Embedding(num_steps, hidden)
        self.embeddings = nn.ModuleList() if emb_all_layers else None
        for d in range(depth):
            self.encoders.append(_Down(chin, hidden, kernel, stride, norm_groups, res_blocks))
            self.decoders.insert(0, _Up(hidden, chin, kernel, stride, norm_groups, res_blocks))
            if emb_all_layers and d > 0:
                self.embeddings.append(nn.Embedding(num_steps, hidden))
            chin, hidden = hidden, min(int(hidden * growth), max_channels)
        self.bilstm = _BLSTM(chin) if bilstm else None
        self.cross = bool(transformer and cross_attention)
        self.transformer = _Transformer(chin, self.cross) if transformer else None
        self.conv_codec = nn.Conv1d(codec_dim, chin, 1) if codec_dim is not None else None

    def forward(self, x: torch.Tensor, step, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        """step: an int, or a (B,) long tensor (a CUDA graph reads it from memory at each replay)."""
        b = x.shape[0]
        steps = step if torch.is_tensor(step) else torch.full((b,), step, device=x.device, dtype=torch.long)
        skips, z = [], x
        for i, enc in enumerate(self.encoders):
            z = enc(z)
            if i == 0:
                z = z + self.embedding(steps)[:, :, None]
            elif self.embeddings is not None:
                z = z + self.embeddings[i - 1](steps)[:, :, None]
            skips.append(z)
        cross_src = None
        if self.conv_codec is not None:
            if condition is None:
                raise ValueError("this diffusion model needs the EnCodec condition")
            cond = self.conv_codec(condition)
            if self.cross:
                cross_src = cond.permute(0, 2, 1)
                cross_src = cross_src + _sin_embedding(cross_src.shape[1], cross_src.shape[2], x.device,
                                                       cross_src.dtype)
            else:
                # the reference adds the condition IN PLACE, to the tensor that is also the deepest skip, so
                # the skip carries it too (and, without a transformer / BLSTM, only the skip does): kept
                z = z + F.interpolate(cond, z.shape[-1])
                skips[-1] = z
        if self.transformer is not None:
            z = self.transformer(z.permute(0, 2, 1), cross_src).permute(0, 2, 1)
        elif self.bilstm is not None:
            z = self.bilstm(z)
        else:
            z = torch.zeros_like(z)
        for dec in self.decoders:
            s = skips.pop()
            z = dec(z[:, :, :s.shape[-1]] + s)
        return z[:, :, :x.shape[-1]]


def _normalize_unet_keys(state: dict) -> dict:
    """Attention weights may be saved with or without torch MultiheadAttention's `mha.` prefix."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"(self_attn|cross_attention)\.(in_proj_weight|out_proj\.weight)$", r"\1.mha.\2", k)
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------
# Schedule, processor, one band
# ---------------------------------------------------------------------------------------------------

@dataclass
class Schedule:
    """The reverse process of `num_steps` training steps, visited at `steps` (999, 949, ..., 49, 0)."""
    beta_t0: float = 1e-4
    beta_t1: float = 0.02
    beta_exp: float = 1.0
    num_steps: int = 1000
    clip: float = 5.0
    rescale: float = 1.0
    noise_scale: float = 1.0
    repartition: str = "power"
    steps: list = field(default_factory=lambda: list(range(1000))[::-50] + [0])

    def coefficients(self):
        """Per visited step: (step, 1/sqrt(alpha), (1-alpha)/sqrt(1-alpha_bar), sigma)."""
        if self.repartition != "power":
            raise ValueError(f"unsupported noise schedule repartition {self.repartition!r}")
        betas = torch.linspace(self.beta_t0 ** (1 / self.beta_exp), self.beta_t1 ** (1 / self.beta_exp),
                               self.num_steps, dtype=torch.float32) ** self.beta_exp
        cum = (1 - betas).cumprod(dim=0)

        def alpha_bar(s):
            return (1 - betas[:s + 1]).prod()

        sub = cum[list(reversed(self.steps))]
        sub_betas = 1 - torch.cat([sub[:1], sub[1:] / sub[:-1]])
        out, ab = [], alpha_bar(self.num_steps - 1)
        for i, step in enumerate(self.steps[:-1]):
            alpha = 1 - sub_betas[-1 - i]
            prev_ab = alpha_bar(self.steps[i + 1])
            if step == self.steps[-2]:
                sigma2, prev_ab = 0.0, torch.tensor(1.0)
            else:
                sigma2 = float((1 - prev_ab) / (1 - ab) * (1 - alpha))
            out.append((step, float(1 / alpha.sqrt()), float((1 - alpha) / (1 - ab).sqrt()),
                        math.sqrt(sigma2) if sigma2 > 0 else 0.0))
            ab = prev_ab
        return out


class BandProcessor(nn.Module):
    """Maps a band's diffusion-space sample back to audio: mel sub-bands rescaled by the checkpoint's
    statistics ((std / target_std) ** power_std, plus the mean). Identity when the band has none."""

    def __init__(self, sample_rate: int, n_bands: int, power_std, state: dict):
        super().__init__()
        self.split = BandSplitter(sample_rate, n_bands)
        counts = state["counts"].float()
        mean = state["sum_x"].float() / counts
        std = (state["sum_x2"].float() / counts - mean ** 2).clamp(min=0).sqrt()
        target_std = state["sum_target_x2"].float() / counts
        power = torch.tensor(power_std, dtype=torch.float32) if isinstance(power_std, list) else power_std
        self.register_buffer("scale", ((std / target_std) ** power).view(-1, 1, 1, 1), persistent=False)
        self.register_buffer("mean", mean.view(-1, 1, 1, 1), persistent=False)

    def forward(self, x):
        return (self.split(x) * self.scale + self.mean).sum(dim=0)


class Band(nn.Module):
    def __init__(self, unet: DiffusionUNet, schedule: Schedule, processor: Optional[BandProcessor]):
        super().__init__()
        self.unet, self.schedule, self.processor = unet, schedule, processor
        self.coefs = schedule.coefficients()


def _band_from_checkpoint(entry: dict, sample_rate: int) -> Band:
    cfg = resolve(to_plain(entry["cfg"]))
    unet_cfg = dict(cfg.get("diffusion_unet") or {})
    sched_cfg = dict(cfg.get("schedule") or {})
    if sched_cfg.get("n_bands") is not None:
        raise ValueError("per-band noise schedules (schedule.n_bands) are not supported")
    unet = DiffusionUNet(chin=int(cfg.get("channels", 1)), num_steps=int(sched_cfg.get("num_steps", 1000)),
                         **unet_cfg)
    state = _normalize_unet_keys(dict(entry["model_state"]))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"diffusion U-Net weights do not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    schedule = Schedule(**{k: sched_cfg[k] for k in ("beta_t0", "beta_t1", "beta_exp", "num_steps", "clip",
                                                      "rescale", "noise_scale", "repartition") if k in sched_cfg})
    if sched_cfg.get("variance", "beta") not in ("beta", "beta_tilde"):
        raise ValueError(f"unsupported schedule variance {sched_cfg.get('variance')!r}")
    proc_cfg = cfg.get("processor") or {}
    processor = None
    if proc_cfg.get("use"):
        if proc_cfg.get("name") != "multi_band_processor":
            raise ValueError(f"unsupported sample processor {proc_cfg.get('name')!r}")
        processor = BandProcessor(sample_rate, int(proc_cfg.get("n_bands", 8)), proc_cfg.get("power_std", 1.0),
                                  dict(entry["processor_state"]))
    return Band(unet.eval(), schedule, processor)


# ---------------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------------

class EncodecCodec:
    """The two things MBD needs from the compression model, on transformers' EncodecModel."""

    def __init__(self, encodec):
        self.model = encodec

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:  # (B, K, T) -> (B, 1, N)
        return self.model.decode(codes[None], audio_scales=[None]).audio_values.float()

    @torch.inference_mode()
    def latent(self, codes: torch.Tensor) -> torch.Tensor:  # (B, K, T) -> (B, D, T)
        return self.model.quantizer.decode(codes.transpose(0, 1)).float()


NoiseFn = Callable[[int, int, torch.Size], torch.Tensor]  # (band, index: 0 = initial, i = step i) -> noise


class MultiBandDiffusion:
    def __init__(self, bands: list[Band], sample_rate: int, device: torch.device, dtype: torch.dtype):
        self.bands, self.sample_rate, self.device, self.dtype = bands, sample_rate, torch.device(device), dtype
        for b in bands:
            b.to(self.device)
            b.unet.to(dtype)
        self.eq = BandSplitter(sample_rate, EQ_BANDS).to(self.device)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32) -> "MultiBandDiffusion":
        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT_FILE
        pkg = load_weights_only(path)
        if not isinstance(pkg, dict) or "n_bands" not in pkg or "sample_rate" not in pkg:
            raise ValueError(f"{path} is not a Multi-Band Diffusion checkpoint (no n_bands / sample_rate)")
        sr = int(pkg["sample_rate"])
        bands = [_band_from_checkpoint(pkg[i], sr) for i in range(int(pkg["n_bands"]))]
        return cls(bands, sr, device, dtype)

    # -- pieces -------------------------------------------------------------------------------------

    def _denoise(self, band: Band, x: torch.Tensor, cond: torch.Tensor, noise: NoiseFn, b: int) -> torch.Tensor:
        s = band.schedule
        x = x * s.noise_scale
        cond = cond.to(self.dtype)
        # on CUDA the U-Net call is replayed as a CUDA graph after its first (eager) step: one call is ~300
        # kernels, and the graph took the host's launch time out (14.5 -> 10.4 ms per call at 30 s on an H100)
        graphs = DenoiserGraphs(band.unet).installed() if self.device.type == "cuda" else contextlib.nullcontext()
        with graphs:
            for i, (step, inv_sqrt_alpha, eps_coef, sigma) in enumerate(band.coefs):
                steps = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)  # read by the graph
                est = band.unet(x.to(self.dtype), steps, cond).float() * s.noise_scale
                x = (x - eps_coef * est) * inv_sqrt_alpha
                if sigma > 0:
                    x = x + sigma * noise(b, i + 1, x.shape) * s.noise_scale
                if s.clip:
                    x = x.clamp(-s.clip, s.clip)
        return band.processor(x) if band.processor is not None else x

    def re_eq(self, wav: torch.Tensor, ref: torch.Tensor, strictness: float = 1.0) -> torch.Tensor:
        bands, ref_bands = self.eq(wav), self.eq(ref)
        gains = (ref_bands.flatten(1).std(dim=1) / bands.flatten(1).std(dim=1)) ** strictness
        return (bands * gains.view(-1, *[1] * wav.dim())).sum(dim=0)

    # -- the entry point ----------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, codec, noise: Optional[NoiseFn] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """codes (B, K, T) -> audio (B, 1, N) float32. `noise(band, index, shape)` supplies the Gaussian
        noise (index 0 = initial, i = after step i) to reproduce a reference run; else `generator`."""
        codes = codes.to(self.device)
        ref = codec.decode(codes).float()
        cond = codec.latent(codes).float()
        if noise is None:
            def noise(b, i, shape):
                return torch.randn(shape, device=self.device, generator=generator)
        shape = ref.shape
        inits = [noise(b, 0, shape).to(self.device).float() for b in range(len(self.bands))]
        # one band after the other: each U-Net call fills the GPU at these lengths (running the bands on
        # concurrent streams measured no faster), and one band's graph memory is freed before the next
        total = torch.zeros(shape, device=self.device)
        for b, band in enumerate(self.bands):
            total = total + self._denoise(band, inits[b], cond, noise, b)
        return self.re_eq(total, ref)
