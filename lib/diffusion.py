"""The diffusion engines: ACE-Step 1.5, AudioLDM 2, AudioLDM, Dance Diffusion and Stable Audio Open, each a
diffusers pipeline loaded once from weights/<folder> (HF layout, offline).

Every engine reads the same way: named components (the diffusers pipeline's modules), `check(req, task)`
first (every limit said in the error, before any model work), then `run`: load input audio -> encode
(text, audio) -> prepare latents -> denoise loop (progress logged per step, cancellation between steps:
cog raises CancelationException from the step callback's log call) -> decode -> float32 (channels,
samples) at the model's native rate. Normalization and encoding are the service's.

Seeds: every random draw goes through a CPU `torch.Generator` seeded with the request's seed (and the global
RNG is seeded too, for the few diffusers draws that take no generator, e.g. VAE posterior sampling), so the
same seed gives the same audio on the same device and dtype.

On CUDA, each request replays its denoiser as CUDA graphs (DenoiserGraphs: same kernels, freed when the request
ends); Dance Diffusion's UNet1D gets two rewrites (unet1d_rewrites), the Oobleck VAE's Snake runs fused (lib.snake)
and ACE-Step's DiT blocks run fused (lib.ace_step_dit), all the same numbers up to rounding; setup warms each engine
with a short request. On other devices the diffusers path runs as is. bench/diffusion.py measures each against the
stock pipeline call.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lib import audio as audio_io
from lib import ace_step_dit, snake
from lib.catalog import ModelSpec
from lib.errors import UserError
from lib.forwards import replaced_forwards
from lib.cuda_graphs import DenoiserGraphs
from lib.group_norm import group_norm
from lib.params import ACE_TRACKS, MAX_DURATION_S

Log = Callable[[str], None]


def pipeline_files_missing(folder: Path) -> list[str]:
    """What a diffusers pipeline folder lacks to load: model_index.json and each component's config/weights."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        return ["model_index.json"]
    missing = []
    for name, value in json.loads(index.read_text()).items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            missing.append(f"{name}/")
            continue
        files = {p.name for p in sub.iterdir()}
        if not files & {"config.json", "scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json"}:
            missing.append(f"{name}/config")
        weighty = name not in ("scheduler", "tokenizer", "tokenizer_2", "feature_extractor")
        if weighty and not any(f.endswith((".safetensors", ".bin")) for f in files):
            missing.append(f"{name}/weights")
    return missing


class _StepLog:
    """Logs denoising progress (steps done / total) at most every ~10% or 5 s; also the cancellation point."""

    def __init__(self, log: Log, total: int, label: str = "denoising"):
        self.log, self.total, self.label = log, max(int(total), 1), label
        self.done, self.last_pct, self.last_t = 0, -100, 0.0

    def step(self, done: Optional[int] = None) -> None:
        self.done = self.done + 1 if done is None else done
        pct = int(100 * self.done / self.total)
        now = time.monotonic()
        if self.done >= self.total or pct >= self.last_pct + 10 or now - self.last_t > 5:
            self.last_pct, self.last_t = pct, now
            self.log(f"{self.label}: step {self.done}/{self.total}")

    # diffusers' modern hook: callback_on_step_end(pipe, step, timestep, tensors) -> tensors
    def on_step_end(self, pipe, step, timestep, kwargs):
        self.step(step + 1)
        return {}

    # diffusers' legacy hook: callback(step, timestep, latents)
    def legacy(self, step, timestep, latents):
        self.step(step + 1)


def _seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator(device="cpu").manual_seed(seed)


def _label(spec: ModelSpec) -> str:
    return f"{spec.name} ({ENGINE_LABELS[spec.engine]})"


ENGINE_LABELS = {
    "musicgen": "MusicGen",
    "ace-step": "ACE-Step 1.5",
    "audioldm2": "AudioLDM 2",
    "audioldm": "AudioLDM",
    "dance-diffusion": "Dance Diffusion",
    "stable-audio": "Stable Audio Open",
}


# -- CUDA speed-ups (used only when the engine runs on CUDA; the CPU path is the plain diffusers one) ----------

# Dance Diffusion's UNet1DModel (diffusers), two rewrites that give the same numbers up to rounding:

def _group_norm_one_group(self, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm(1, C), i.e. statistics over all of (C, L) per sample, by lib.group_norm (PyTorch's kernel reduces
    each whole 128 x 65536 activation in one thread block)."""
    return group_norm(x, 1, self.weight if self.affine else None, self.bias if self.affine else None, self.eps)


def _downsample_per_channel(self, x: torch.Tensor) -> torch.Tensor:
    """Downsample1d as the per-channel filter it is (diffusers builds a dense C x C x K weight, zero off the
    diagonal, every call)."""
    x = torch.nn.functional.pad(x, (self.pad,) * 2, self.pad_mode)
    weight = self.kernel.to(x)[None, None, :].repeat(x.shape[1], 1, 1)
    return torch.nn.functional.conv1d(x, weight, stride=2, groups=x.shape[1])


def _upsample_per_channel(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Upsample1d likewise (a grouped transposed convolution instead of the dense one)."""
    x = torch.nn.functional.pad(x, ((self.pad + 1) // 2,) * 2, self.pad_mode)
    weight = self.kernel.to(x)[None, None, :].repeat(x.shape[1], 1, 1)
    return torch.nn.functional.conv_transpose1d(x, weight, stride=2, padding=self.pad * 2 + 1, groups=x.shape[1])


def unet1d_rewrites(unet: torch.nn.Module, norm: bool = True, resample: bool = True):
    """Within the block, the UNet1D's GroupNorm(1, C) layers use `_group_norm_one_group` and its Downsample1d /
    Upsample1d the per-channel filters (instance overrides, removed on exit). Yields how many modules changed."""
    from diffusers.models.unets.unet_1d_blocks import Downsample1d, Upsample1d

    rewrites = {Downsample1d: _downsample_per_channel, Upsample1d: _upsample_per_channel} if resample else {}
    pairs = []
    for m in unet.modules():
        fn = rewrites.get(type(m))
        if fn is None and norm and type(m) is torch.nn.GroupNorm and m.num_groups == 1:
            fn = _group_norm_one_group
        if fn is not None:
            pairs.append((m, fn))
    return replaced_forwards(pairs)


class DiffusionEngine:
    """Shared plumbing. Subclasses set `pipeline_class`, limits and defaults, and implement `_generate`."""

    pipeline_class: str = ""
    default_steps: int = 50
    default_guidance: Optional[float] = None
    min_duration_s: float = 1.0
    max_duration_s: float = 30.0
    duration_note: str = ""
    denoiser: str = ""  # the pipeline component the denoising loop calls every step
    cuda_graphs: bool = True  # on CUDA, replay the denoiser as CUDA graphs (DenoiserGraphs), one request at a time
    fused_snake: bool = True  # on CUDA, the Oobleck VAE's Snake activations as one kernel each (lib.snake)

    def __init__(self, spec: ModelSpec, folder: Path, device: torch.device, dtype: torch.dtype):
        self.spec, self.folder, self.device = spec, Path(folder), torch.device(device)
        self.dtype = self._dtype_for(dtype)
        self.pipe = self._load()
        self.pipe.set_progress_bar_config(disable=True)
        self.tiny = (self.folder / "TINY_RANDOM_WEIGHTS").exists()

    # -- loading ---------------------------------------------------------------------------------------

    def _dtype_for(self, dtype: torch.dtype) -> torch.dtype:
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported() and dtype == torch.float16:
            return torch.bfloat16  # no fp16 overflow in the audio VAEs; same speed on Ampere+
        return dtype

    def _load(self):
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        return cls.from_pretrained(self.folder, torch_dtype=self.dtype, local_files_only=True,
                                   **self._load_kwargs()).to(self.device)

    def _load_kwargs(self) -> dict:
        return {}

    # -- requests --------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return _label(self.spec)

    def steps(self, req) -> int:
        return int(req.num_inference_steps) if req.num_inference_steps is not None else self.default_steps

    def guidance(self, req) -> Optional[float]:
        return float(req.guidance_scale) if req.guidance_scale is not None else self.default_guidance

    def check_duration(self, duration: float) -> None:
        if not self.min_duration_s <= duration <= self.max_duration_s:
            raise UserError("duration", f"{self.label} makes {self.min_duration_s:g} to {self.max_duration_s:g} s of "
                                        f"audio{self.duration_note}; got {duration:g} s")

    def check(self, req, task: str) -> None:
        """Engine-specific checks, before any model work (lib.request already checked ranges and ignored inputs)."""
        if task in self.duration_tasks():
            self.check_duration(float(req.duration))

    def duration_tasks(self) -> tuple:
        return tuple(self.spec.tasks)

    def run(self, req, task: str, seed: int, log: Log) -> np.ndarray:
        self.check(req, task)
        t0 = time.perf_counter()
        generator = _seed_all(seed)
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            graphs = self._speedups(stack, log)
            audio = self._generate(req, task, generator, log)
            if graphs is not None:
                log(f"{self.spec.name}: {graphs.summary()}")
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        log(f"{self.spec.name}: {task} in {time.perf_counter() - t0:.2f}s")
        return audio

    def warm_up(self) -> None:
        """One short request (1 s, 2 steps), run by the service in setup on CUDA: the first real request then pays
        no Triton compilation (the fused kernels take every length: their length arguments are not specialized) and
        no cuBLAS / cuDNN initialisation."""
        from lib.request import Request

        req = Request(model_version=self.spec.name, prompt="warm up", duration=max(self.min_duration_s, 1.0),
                      num_inference_steps=2)
        self.run(req, self.duration_tasks()[0], 0, lambda message: None)

    def _speedups(self, stack: contextlib.ExitStack, log: Log) -> Optional[DenoiserGraphs]:
        """Enter, for this request, what makes the denoising loop faster on CUDA (nothing on other devices); the
        stack undoes it all when the request ends, normally or not (graphs freed, overrides removed)."""
        vae = getattr(self.pipe, "vae", None)
        if self.fused_snake and vae is not None and snake.available(self.device):
            stack.enter_context(snake.fused_snake(vae))
        if self.device.type == "cuda":
            for module, hook in self._cuda_pre_hooks():
                stack.callback(module.register_forward_pre_hook(hook, with_kwargs=True).remove)
            for rewrite in self._cuda_rewrites():
                stack.enter_context(rewrite)
        if self.device.type == "cuda" and self.cuda_graphs and self.denoiser:
            return stack.enter_context(DenoiserGraphs(getattr(self.pipe, self.denoiser), log=log).installed())
        return None

    def _cuda_pre_hooks(self) -> list:
        """(module, forward pre-hook taking kwargs) pairs installed for a request on CUDA: fixes to how a diffusers
        pipeline feeds its modules there (same values, faster)."""
        return []

    def _cuda_rewrites(self) -> list:
        """Context managers entered for a request on CUDA, before the graphs: forwards replaced by fused ones."""
        return []

    def _generate(self, req, task: str, generator: torch.Generator, log: Log) -> np.ndarray:
        raise NotImplementedError

    def _samples(self, duration: float) -> int:
        return int(round(duration * self.sample_rate))


# -- ACE-Step 1.5 ------------------------------------------------------------------------------------------

KEYSCALE_RE = re.compile(r"^[A-Ga-g][#b♯♭]?\s*(major|minor|maj|min|m)?$", re.IGNORECASE)
LANGUAGE_RE = re.compile(r"^([a-z]{2,3}(-[A-Za-z]{2,4})?|unknown)$")
REPAINT_CROSSFADE_S = 0.02  # the crossfade at each edge of a repainted window, inside the window


def _row_major_hidden_states(module, args, kwargs):
    """Forward pre-hook on the first block of diffusers' AceStepTransformer1DModel. The model feeds its blocks
    `proj_in_conv(x.transpose(1, 2)).transpose(1, 2)`: a transposed view whose row stride is the sequence length.
    Elementwise ops keep that layout all the way through the 32 blocks (strided, unvectorized kernels), and every
    projection reads it with a leading dimension that is not 16-byte aligned, so cuBLAS falls back to sm80 "align2"
    kernels. One copy to row-major layout before the first block: the same values, aligned GEMMs."""
    h = kwargs.get("hidden_states")
    if h is None or h.is_contiguous():
        return None
    return args, {**kwargs, "hidden_states": h.contiguous()}


class AceStepEngine(DiffusionEngine):
    pipeline_class = "AceStepPipeline"
    denoiser = "transformer"
    min_duration_s = 1.0
    max_duration_s = MAX_DURATION_S
    duration_note = " (trained on 10 to 600 s; this container serves up to its global limit)"
    sample_rate = 48000
    channels = 2
    contiguous_tokens: bool = True  # on CUDA, the DiT's token stream in row-major layout (_row_major_hidden_states)
    fused_dit: bool = True  # on CUDA, the DiT blocks' elementwise work fused, projections packed (lib.ace_step_dit)

    def __init__(self, spec, folder, device, dtype):
        super().__init__(spec, folder, device, dtype)
        self.sample_rate = int(self.pipe.sample_rate)
        self.channels = int(self.pipe.vae.config.audio_channels)
        self.hop = int(np.prod(self.pipe.vae.config.downsampling_ratios))
        self.turbo = bool(self.pipe.is_turbo)
        self.default_steps = 8 if self.turbo else 32
        self.default_guidance = None if self.turbo else 7.0
        if self.device.type == "cuda":  # once, at load: the first request need not repack ~4 GB of weights
            ace_step_dit.pack_weights(self.pipe.transformer)

    def duration_tasks(self) -> tuple:
        return ("text2music",)

    def _cuda_pre_hooks(self) -> list:
        return [(self.pipe.transformer.layers[0], _row_major_hidden_states)] if self.contiguous_tokens else []

    def _cuda_rewrites(self) -> list:
        return [ace_step_dit.fused_blocks(self.pipe.transformer)] if self.fused_dit and ace_step_dit.available(self.device) \
            else []

    def check(self, req, task):
        super().check(req, task)
        if req.keyscale is not None and not KEYSCALE_RE.match(req.keyscale.strip()):
            raise UserError("keyscale", f"must be a key such as 'C major', 'F# minor' or 'Am', got {req.keyscale!r}")
        if req.timesignature is not None and req.timesignature not in (2, 3, 4, 6):
            raise UserError("timesignature", f"must be 2 (2/4), 3 (3/4), 4 (4/4) or 6 (6/8), got {req.timesignature}")
        if req.vocal_language is not None and not LANGUAGE_RE.match(req.vocal_language):
            raise UserError("vocal_language", "must be an ISO 639-1 code such as en, zh, ja, es, fr (or unknown), got "
                                              f"{req.vocal_language!r}")
        if req.lyrics is not None and len(req.lyrics) > 4096:
            raise UserError("lyrics", f"at most 4096 characters, got {len(req.lyrics)}")
        if task == "text2music" and req.input_audio is not None:
            raise UserError("input_audio", "text2music ignores input_audio: remove it, or set task to cover, repaint, "
                                           "extract, lego or complete")
        if task != "text2music" and req.input_audio is None:
            raise UserError("input_audio", f"task {task} needs an input_audio (the source audio)")
        if task == "repaint":
            end = req.repainting_end
            if end is not None and end != -1 and end <= req.repainting_start:
                raise UserError("repainting_end", f"must be after repainting_start ({req.repainting_start:g} s) or -1 "
                                                  f"(end of the audio), got {end:g}")

    # -- stages ----------------------------------------------------------------------------------------

    def _source(self, req) -> np.ndarray:
        """input_audio at 48 kHz stereo; cut to `duration` when the user set one (else its own length)."""
        src = audio_io.load_audio(req.input_audio, self.sample_rate, self.channels)
        clip_s = src.shape[1] / self.sample_rate
        if not req.is_default("duration"):
            if req.duration > clip_s + 1e-6:
                raise UserError("duration", f"is {req.duration:g} s but input_audio is only {clip_s:.2f} s long: "
                                            "audio-to-audio tasks keep the input's length; lower duration or leave "
                                            "it at its default to use the whole clip")
            src = src[:, :self._samples(float(req.duration))]
        clip_s = src.shape[1] / self.sample_rate
        if clip_s < self.min_duration_s:
            raise UserError("input_audio", f"is {clip_s:.2f} s long; {self.label} needs at least "
                                           f"{self.min_duration_s:g} s")
        if clip_s > self.max_duration_s:
            raise UserError("input_audio", f"is {clip_s:.1f} s long; {self.label} takes up to {self.max_duration_s:g} "
                                           "s: trim it or set duration to use its beginning")
        return src

    def _window(self, req, n_samples: int) -> tuple[int, int]:
        clip_s = n_samples / self.sample_rate
        start = float(req.repainting_start)
        end = clip_s if req.repainting_end in (None, -1) else float(req.repainting_end)
        if start >= clip_s:
            raise UserError("repainting_start", f"{start:g} s is past the end of the audio ({clip_s:.2f} s long)")
        if end > clip_s + 1e-6:
            raise UserError("repainting_end", f"{end:g} s is past the end of the audio ({clip_s:.2f} s long); use -1 "
                                              "for the end")
        s, e = int(round(start * self.sample_rate)), min(int(round(end * self.sample_rate)), n_samples)
        if e - s < self.hop:
            raise UserError("repainting_end", f"the window is {(e - s) / self.sample_rate * 1000:.0f} ms long; it must "
                                              f"be at least {self.hop / self.sample_rate * 1000:.0f} ms (one latent frame)")
        return s, e

    def call_kwargs(self, req, task: str, generator, src: Optional[np.ndarray], step_log: _StepLog) -> dict:
        """The diffusers AceStepPipeline arguments for this request (shared with bench/diffusion.py)."""
        kw = dict(prompt=req.prompt or "", lyrics=req.lyrics or "",
                  vocal_language=req.vocal_language or "unknown", num_inference_steps=self.steps(req),
                  guidance_scale=self.guidance(req) or 1.0, shift=3.0 if req.shift is None else float(req.shift),
                  generator=generator, bpm=req.bpm, keyscale=req.keyscale,
                  timesignature=None if req.timesignature is None else str(req.timesignature),
                  task_type=task, output_type="latent", return_dict=False,
                  callback_on_step_end=step_log.on_step_end)
        if src is None:
            kw["audio_duration"] = float(req.duration)
        else:
            padded = math.ceil(src.shape[1] / self.hop) * self.hop  # whole latent frames
            wav = np.pad(src, ((0, 0), (0, padded - src.shape[1])))
            kw["src_audio"] = torch.from_numpy(wav)
            kw["audio_duration"] = padded / self.sample_rate
        if task in ("extract", "lego"):
            kw["track_name"] = req.track_name
        if task == "complete" and req.track_name:
            kw["complete_track_classes"] = [req.track_name]
        if task in ("repaint", "lego"):
            kw["repainting_start"] = float(req.repainting_start)
            kw["repainting_end"] = -1.0 if req.repainting_end in (None, -1) else float(req.repainting_end)
        if task == "cover":
            kw["audio_cover_strength"] = float(req.audio_cover_strength)
        return kw

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, T, C) latents -> (channels, samples) float32; VAE output as is (no loudness change here)."""
        audio = self.pipe.vae.decode(latents.transpose(1, 2).to(self.pipe.vae.dtype)).sample[0].float()
        peak = float(audio.abs().max())
        return audio / peak if peak > 1.0 else audio  # anti-clip only, as ACE-Step's own decode

    def _generate(self, req, task, generator, log):
        src = self._source(req) if task != "text2music" else None
        window = self._window(req, src.shape[1]) if task == "repaint" else None
        step_log = _StepLog(log, self.steps(req))
        (latents,) = self.pipe(**self.call_kwargs(req, task, generator, src, step_log))
        audio = self.decode(latents).cpu().numpy()
        n = src.shape[1] if src is not None else self._samples(float(req.duration))
        audio = audio[:, :n]
        if window is not None:
            audio = splice(src, audio, *window, int(REPAINT_CROSSFADE_S * self.sample_rate))
            log(f"repaint: kept the audio outside {window[0] / self.sample_rate:.2f}-{window[1] / self.sample_rate:.2f}"
                f" s, {REPAINT_CROSSFADE_S * 1000:.0f} ms crossfades inside the window")
        return audio


def splice(original: np.ndarray, generated: np.ndarray, start: int, end: int, fade: int) -> np.ndarray:
    """original outside [start, end), generated inside, with linear crossfades of `fade` samples placed inside the
    window (so every sample outside it is the original's, bit for bit)."""
    out = original.astype(np.float32).copy()
    out[:, start:end] = generated[:, start:end]
    fade = max(0, min(fade, (end - start) // 2))
    if fade:
        ramp = np.linspace(0.0, 1.0, fade + 2, dtype=np.float32)[1:-1]
        if start > 0:
            sl = slice(start, start + fade)
            out[:, sl] = original[:, sl] * (1 - ramp) + generated[:, sl] * ramp
        if end < original.shape[1]:
            sl = slice(end - fade, end)
            out[:, sl] = generated[:, sl] * (1 - ramp) + original[:, sl] * ramp
    return out


# -- AudioLDM 2 and AudioLDM -------------------------------------------------------------------------------

class AudioLDM2Engine(DiffusionEngine):
    pipeline_class = "AudioLDM2Pipeline"
    denoiser = "unet"
    default_steps = 100
    default_guidance = 3.5
    max_duration_s = 30.0
    duration_note = " (trained on 10 s clips)"
    channels = 1

    def __init__(self, spec, folder, device, dtype):
        super().__init__(spec, folder, device, dtype)
        self.sample_rate = int(self.pipe.vocoder.config.sampling_rate)

    def _load_kwargs(self):
        # diffusers #12630: repos whose language_model is a GPT2Model fail in generate(); the LM head variant
        # loads the same weights (its head is tied to the input embeddings) and generates.
        cfg = json.loads((self.folder / "language_model" / "config.json").read_text())
        if "GPT2Model" in cfg.get("architectures", []) or "GPT2LMHeadModel" not in cfg.get("architectures", []):
            from transformers import GPT2LMHeadModel

            lm = GPT2LMHeadModel.from_pretrained(self.folder / "language_model", dtype=self.dtype,
                                                 local_files_only=True)
            return {"language_model": lm}
        return {}

    def call_kwargs(self, req, task, generator, step_log) -> dict:
        return dict(prompt=req.prompt or "", negative_prompt=req.negative_prompt,
                    audio_length_in_s=float(req.duration), num_inference_steps=self.steps(req),
                    guidance_scale=self.guidance(req), generator=generator, output_type="np", return_dict=False,
                    callback=step_log.legacy, callback_steps=1)

    def _generate(self, req, task, generator, log):
        (audio,) = self.pipe(**self.call_kwargs(req, task, generator, _StepLog(log, self.steps(req))))
        return np.asarray(audio[0], dtype=np.float32)[None, :self._samples(float(req.duration))]


class AudioLDMEngine(AudioLDM2Engine):
    pipeline_class = "AudioLDMPipeline"
    default_steps = 50
    default_guidance = 2.5

    def _load_kwargs(self):
        return {}


# -- Dance Diffusion ---------------------------------------------------------------------------------------

class DanceDiffusionEngine(DiffusionEngine):
    pipeline_class = "DanceDiffusionPipeline"
    denoiser = "unet"
    default_steps = 100
    default_strength = 0.5
    max_duration_s = 30.0
    duration_note = " (the UNet's memory grows with length)"
    # The UNet1D rewrites (unet1d_rewrites; same numbers up to rounding) and where they apply: CUDA only, so the
    # CPU path stays diffusers' own (bench/diffusion.py's CPU dry run and the tests add "cpu" to check them).
    fast_norm = True
    fast_resample = True
    fast_devices: tuple = ("cuda",)
    # cudnn.benchmark during the request: measured in bench/diffusion.py, off (the chosen algorithms can differ
    # between processes, so the same seed could give slightly different audio after a restart)
    cudnn_benchmark = False

    def __init__(self, spec, folder, device, dtype):
        super().__init__(spec, folder, device, dtype)
        self.unet, self.scheduler = self.pipe.unet, self.pipe.scheduler
        self.sample_rate = int(self.unet.config.sample_rate)
        self.channels = int(self.unet.config.in_channels)
        self.down = 2 ** len(self.unet.up_blocks)

    def _load(self):
        """Configs written before diffusers 0.36 (every harmonai checkpoint) have no `time_embedding_dim`; the newer
        default (2 x block_out_channels[0]) no longer matches their 16-wide fourier features, so say it."""
        import diffusers
        from diffusers import UNet1DModel

        cfg = json.loads((self.folder / "unet" / "config.json").read_text())
        kw = {}
        if cfg.get("time_embedding_type", "fourier") == "fourier" and cfg.get("time_embedding_dim") is None:
            kw["time_embedding_dim"] = int(cfg.get("extra_in_channels") or 16) if not cfg.get(
                "use_timestep_embedding") else 16
        unet = UNet1DModel.from_pretrained(self.folder / "unet", torch_dtype=self.dtype, local_files_only=True, **kw)
        return diffusers.DanceDiffusionPipeline.from_pretrained(self.folder, unet=unet, torch_dtype=self.dtype,
                                                                local_files_only=True).to(self.device)

    def duration_tasks(self):
        return ("unconditional",)

    def _speedups(self, stack, log):
        if self.device.type in self.fast_devices and (self.fast_norm or self.fast_resample):
            stack.enter_context(unet1d_rewrites(self.unet, norm=self.fast_norm, resample=self.fast_resample))
        if self.device.type == "cuda" and self.cudnn_benchmark and not torch.backends.cudnn.benchmark:
            torch.backends.cudnn.benchmark = True
            stack.callback(setattr, torch.backends.cudnn, "benchmark", False)
        return super()._speedups(stack, log)  # the graphs capture the rewritten modules

    def check(self, req, task):
        super().check(req, task)
        if task == "variation" and req.input_audio is None:
            raise UserError("input_audio", "task variation needs an input_audio (the audio to vary)")
        if task == "unconditional" and req.input_audio is not None:
            raise UserError("input_audio", "unconditional generation ignores input_audio: remove it, or set task to "
                                           "variation")
        if req.strength is not None and req.strength <= 0:
            raise UserError("strength", "must be above 0 (0 would return the input unchanged)")

    def _generate(self, req, task, generator, log):
        steps = self.steps(req)
        if task == "variation":
            x0 = audio_io.load_audio(req.input_audio, self.sample_rate, self.channels)
            if not req.is_default("duration"):  # an explicit duration cuts the input; else its own length
                x0 = x0[:, :self._samples(float(req.duration))]
            self.check_duration(x0.shape[1] / self.sample_rate)
            n = x0.shape[1]
        else:
            x0, n = None, self._samples(float(req.duration))
        size = math.ceil(n / self.down) * self.down
        if size < 3 * self.down:
            raise UserError("duration", f"{self.label} needs at least {3 * self.down / self.sample_rate:.3f} s")
        dtype = self.unet.dtype
        noise = torch.randn((1, self.channels, size), generator=generator).to(self.device, dtype)
        self.scheduler.set_timesteps(steps, device=self.device)
        timesteps = self.scheduler.timesteps.to(dtype)
        begin = 0
        if x0 is not None:
            strength = self.default_strength if req.strength is None else float(req.strength)
            begin = min(steps - 1, int(round(steps * (1 - strength))))
            clean = torch.from_numpy(np.pad(x0, ((0, 0), (0, size - n)))).to(self.device, dtype)[None]
            alpha, sigma = self.scheduler.alphas[begin], self.scheduler.betas[begin]  # v-diffusion: a^2 + s^2 = 1
            audio = alpha * clean + sigma * noise
            self.scheduler.set_begin_index(begin)
        else:
            audio = noise
        step_log = _StepLog(log, len(timesteps) - begin)
        for t in timesteps[begin:]:
            model_output = self.unet(audio, t).sample
            audio = self.scheduler.step(model_output, t, audio).prev_sample
            step_log.step()
        return audio.clamp(-1, 1).float().cpu().numpy()[0, :, :n]


# -- Stable Audio Open -------------------------------------------------------------------------------------

class _RotaryOnDevice:
    """Forward pre-hook on diffusers' StableAudioDiTModel. StableAudioPipeline builds the rotary embedding on the
    CPU and passes it every step; each attention layer then copies it to the GPU from pageable memory, a copy that
    waits for the GPU to drain, several times per layer, so host and GPU never overlap, and the CPU tensors keep
    DenoiserGraphs from capturing the step. The hook hands the DiT a device copy instead, made once per request
    (the pipeline passes the same tensors every step): the same values, and the step becomes one graph replay."""

    def __init__(self, device: torch.device):
        self.device, self.copies = device, {}

    def __call__(self, module, args, kwargs):
        rotary = kwargs.get("rotary_embedding")
        if not isinstance(rotary, tuple) or not all(isinstance(t, torch.Tensor) and not t.is_cuda for t in rotary):
            return None
        key = tuple(id(t) for t in rotary)
        if key not in self.copies:  # the CPU tensors are kept too, so that their ids can't be reused meanwhile
            self.copies = {key: (rotary, tuple(t.to(self.device) for t in rotary))}
        return args, {**kwargs, "rotary_embedding": self.copies[key][1]}


class StableAudioEngine(DiffusionEngine):
    pipeline_class = "StableAudioPipeline"
    denoiser = "transformer"
    default_steps = 100
    default_guidance = 7.0
    min_duration_s = 1.0
    duration_note = ""

    def __init__(self, spec, folder, device, dtype):
        super().__init__(spec, folder, device, dtype)
        vae = self.pipe.vae
        self.sample_rate = int(vae.config.sampling_rate)
        self.channels = int(vae.config.audio_channels)
        self.max_duration_s = self.pipe.transformer.config.sample_size * vae.hop_length / self.sample_rate
        self.duration_note = " (its DiT's window)"
        self.scheduler_config = dict(self.pipe.scheduler.config)

    def _cuda_pre_hooks(self) -> list:
        return [(self.pipe.transformer, _RotaryOnDevice(self.device))]

    def check(self, req, task):
        super().check(req, task)
        if task == "audio2audio" and req.input_audio is None:
            raise UserError("input_audio", "task audio2audio needs an input_audio (the init audio)")
        if task != "audio2audio" and req.input_audio is not None:
            raise UserError("input_audio", f"{task} ignores input_audio: remove it, or set task to audio2audio")
        if req.strength is not None and req.strength <= 0:
            raise UserError("strength", "must be above 0 (0 would return the input unchanged)")

    def _scheduler_for(self, strength: float):
        """SDEdit on the EDM sigma ladder: the init audio's latents are noised to sigma_max^strength * sigma_min^(1 -
        strength) (log-linear), and the schedule runs from there; strength 1 is diffusers' own init-audio behaviour."""
        cls = type(self.pipe.scheduler)
        cfg = dict(self.scheduler_config)
        lo, hi = float(cfg["sigma_min"]), float(cfg["sigma_max"])
        cfg["sigma_max"] = math.exp(math.log(lo) + strength * (math.log(hi) - math.log(lo)))
        return cls.from_config(cfg)

    DECODE_MARGIN_FRAMES = 16  # latent frames decoded past the end: more than the VAE decoder's reach

    def call_kwargs(self, req, task, generator, step_log) -> dict:
        return dict(prompt=req.prompt or "", negative_prompt=req.negative_prompt, audio_end_in_s=float(req.duration),
                    num_inference_steps=self.steps(req), guidance_scale=self.guidance(req), generator=generator,
                    output_type="latent", callback=step_log.legacy, callback_steps=1)

    def _silence_frame(self) -> torch.Tensor:
        """The VAE's latent for digital silence (the posterior mean mid-way through a silent clip): what the
        padding of a short init audio encodes to, away from its edges."""
        if getattr(self, "_silence", None) is None:
            vae = self.pipe.vae
            zeros = torch.zeros(1, self.channels, 32 * vae.hop_length, device=self.device, dtype=vae.dtype)
            self._silence = vae.encode(zeros).latent_dist.mean[0, :, 16]
        return self._silence

    def init_latents(self, init: np.ndarray, duration: float, sigma0: float, generator) -> torch.Tensor:
        """What diffusers' prepare_latents builds from `initial_audio_waveforms` (noise * sigma0 + VAE latents of
        the init audio padded with silence to the DiT window), divided by sigma0 since the pipeline multiplies
        passed latents by it. Only the part of the init audio that the output keeps is encoded (plus a margin),
        not the whole 47 s window: the padding's latents are the silence frame."""
        vae, n_lat = self.pipe.vae, int(self.pipe.transformer.config.sample_size)
        hop = vae.hop_length
        keep = min(init.shape[1], int(math.ceil(duration * self.sample_rate)))
        frames = min(n_lat, math.ceil(keep / hop) + self.DECODE_MARGIN_FRAMES)
        chunk = np.zeros((self.channels, frames * hop), dtype=np.float32)
        chunk[:, :keep] = init[:, :keep]
        wav = torch.from_numpy(chunk)[None].to(self.device, vae.dtype)
        enc = vae.encode(wav).latent_dist.sample(generator)  # (1, C, frames)
        full = self._silence_frame()[None, :, None].expand(1, -1, n_lat).clone()
        full[..., :frames] = enc
        noise = torch.randn(full.shape, generator=generator).to(self.device, full.dtype)
        return noise + full / sigma0

    def decode(self, latents: torch.Tensor, n_samples: int) -> np.ndarray:
        """Decode only the latent frames the output keeps (+ margin): the DiT window is 47 s whatever the duration,
        and diffusers decodes all of it before cropping."""
        hop = self.pipe.vae.hop_length
        frames = min(latents.shape[-1], math.ceil(n_samples / hop) + self.DECODE_MARGIN_FRAMES)
        audio = self.pipe.vae.decode(latents[..., :frames]).sample
        return audio[0, :, :n_samples].float().cpu().numpy()

    def _generate(self, req, task, generator, log):
        kw = self.call_kwargs(req, task, generator, _StepLog(log, self.steps(req)))
        n = self._samples(float(req.duration))
        if task == "audio2audio":
            init = audio_io.load_audio(req.input_audio, self.sample_rate, self.channels)
            strength = 1.0 if req.strength is None else float(req.strength)
            self.pipe.scheduler = self._scheduler_for(strength)
            kw["latents"] = self.init_latents(init, float(req.duration), self.pipe.scheduler.init_noise_sigma,
                                              generator)
        else:
            self.pipe.scheduler = type(self.pipe.scheduler).from_config(self.scheduler_config)
        latents = self.pipe(**kw).audios  # output_type="latent" always returns the dataclass
        return self.decode(latents, n)


ENGINES = {
    "ace-step": AceStepEngine,
    "audioldm2": AudioLDM2Engine,
    "audioldm": AudioLDMEngine,
    "dance-diffusion": DanceDiffusionEngine,
    "stable-audio": StableAudioEngine,
}
