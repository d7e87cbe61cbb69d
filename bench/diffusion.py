"""Our diffusion engines (lib/diffusion.py, as the predictor runs them on CUDA) against the stock diffusers pipeline
call, in one process, on random-init FULL-SIZE models (random weights cost what real ones cost).

Per engine, same steps, same seed, same request:
  stock     the plain pipeline call in fp32, as diffusers documents it (`pipe(...)`), output cropped as the
            pipeline crops it
  ours      lib.diffusion's engine `run()` (bf16 on Ampere+ for the fp16 the service asks, SDPA, Stable Audio
            decodes only the kept latent frames), the pipeline converted in place after the stock runs
  ours+compile  the same with the denoiser compiled (`module.compile(mode=...)`); the first call's time,
            which includes the compilation, is reported apart
  ours-fp32 (Stable Audio only) our path in fp32: isolates what the path changes from what the dtype changes
Each: one warm-up call with 2 steps, then `--reps` timed calls (wall time incl. the copy to host), peak GPU
memory (max_memory_allocated, weights included), and the max abs difference of the output against stock.

Models (full size, from the real checkpoints' configs):
  stable-audio      stabilityai/stable-audio-open-1.0: StableAudioDiTModel defaults (24 layers, 24 heads x 64,
                    12 KV heads, 1024 latent frames), AutoencoderOobleck defaults (128 ch, x[1,2,4,8,16]), T5-base
                    encoder, CosineDPMSolverMultistepScheduler (SDE, torchsde), CFG 7
  dance-diffusion   harmonai/maestro-150k's UNet1DModel, laid out as its original DiffusionAttnUnet1D (depth 14,
                    channels 128,128,256,256,512 x 9 + mid, attention at the 6 deepest levels, 16 fourier time
                    features as extra inputs), 65536 samples at 16 kHz, IPNDM
(The maestro config is written from the original model's defaults, not copied from the hub file.)

  python3 bench/diffusion.py --out $OUT                  # GPU: both engines, 20 steps
  BENCH_TINY=1 python3 bench/diffusion.py --steps 3      # CPU dry run on lib/tiny_diffusion's tiny pipelines
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib import diffusion as D  # noqa: E402
from lib.catalog import MODELS  # noqa: E402
from lib.request import Request  # noqa: E402

TINY = os.environ.get("BENCH_TINY") == "1"
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if DEV.type == "cuda" else None


def alloc_gb():
    return round(torch.cuda.memory_allocated() / 1e9, 3) if DEV.type == "cuda" else None


def params_m(*modules):
    return round(sum(p.numel() for m in modules for p in m.parameters()) / 1e6, 1)


# -- full-size random pipelines -------------------------------------------------------------------------------

def build_stable_audio(seed=0):
    if TINY:
        from lib.tiny_diffusion import build_stable_audio as tiny
        return tiny(seed).to(DEV)
    from diffusers import (AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudioDiTModel,
                           StableAudioPipeline, StableAudioProjectionModel)
    from transformers import T5Config, T5EncoderModel

    from lib.tiny import _t5_tokenizer

    torch.manual_seed(seed)
    with DEV:
        transformer = StableAudioDiTModel(sample_size=1024, in_channels=64, num_layers=24, attention_head_dim=64,
                                          num_attention_heads=24, num_key_value_attention_heads=12, out_channels=64,
                                          cross_attention_dim=768, time_proj_dim=256, global_states_input_dim=1536,
                                          cross_attention_input_dim=768)
        vae = AutoencoderOobleck(encoder_hidden_size=128, downsampling_ratios=[2, 4, 4, 8, 8],
                                 channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128, decoder_input_channels=64,
                                 audio_channels=2, sampling_rate=44100)
        text_encoder = T5EncoderModel(T5Config(vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12,
                                               num_layers=12))  # t5-base
        projection_model = StableAudioProjectionModel(text_encoder_dim=768, conditioning_dim=768, min_value=0,
                                                      max_value=512)
    scheduler = CosineDPMSolverMultistepScheduler(solver_order=2, prediction_type="v_prediction", sigma_data=1.0,
                                                  sigma_min=0.3, sigma_max=500, sigma_schedule="exponential",
                                                  solver_type="midpoint")
    tokenizer = _t5_tokenizer()  # a small offline vocab; the sequence is padded to 128 tokens as the real one
    tokenizer.model_max_length = 128
    return StableAudioPipeline(vae=vae, text_encoder=text_encoder, projection_model=projection_model,
                               tokenizer=tokenizer, transformer=transformer, scheduler=scheduler).to(DEV)


def build_dance_diffusion(seed=0):
    if TINY:
        from lib.tiny_diffusion import build_dance_diffusion as tiny
        return tiny(seed).to(DEV)
    from diffusers import DanceDiffusionPipeline, IPNDMScheduler, UNet1DModel

    torch.manual_seed(seed)
    channels = (128, 128, 256, 256) + (512,) * 9
    down = ("DownBlock1DNoSkip",) + ("DownBlock1D",) * 6 + ("AttnDownBlock1D",) * 6
    up = ("AttnUpBlock1D",) * 6 + ("UpBlock1D",) * 6 + ("UpBlock1DNoSkip",)
    with DEV:
        unet = UNet1DModel(block_out_channels=channels, extra_in_channels=16, time_embedding_dim=16,
                           sample_size=65536, sample_rate=16000, in_channels=2, out_channels=2, flip_sin_to_cos=True,
                           use_timestep_embedding=False, time_embedding_type="fourier",
                           mid_block_type="UNetMidBlock1D", down_block_types=down, up_block_types=up)
    return DanceDiffusionPipeline(unet=unet, scheduler=IPNDMScheduler()).to(DEV)


def engine_from(engine_class, spec, pipe, dtype):
    """lib.diffusion's engine, its __init__ run as is, on an in-memory pipeline instead of a folder."""

    class Bench(engine_class):
        def _load(self):
            return pipe.to(self.device, self.dtype)

    return Bench(spec, ROOT / "weights" / "none", DEV, dtype)


# -- measuring ------------------------------------------------------------------------------------------------

def timed(fn, reps):
    """fn() -> np.ndarray; returns (last output, [seconds], peak GB)."""
    reset_peak()
    times, out = [], None
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(round(time.perf_counter() - t, 4))
    return out, times, peak_gb()


def compare(a, b):
    n = min(a.shape[-1], b.shape[-1])
    a, b = np.asarray(a, np.float64)[..., :n], np.asarray(b, np.float64)[..., :n]
    d = np.abs(a - b)
    rms = float(np.sqrt(np.mean(a ** 2)))
    return dict(max_abs_diff=float(d.max()), mean_abs_diff=float(d.mean()), ref_max_abs=float(np.abs(a).max()),
                ref_rms=rms, snr_db=float(10 * np.log10(np.mean(a ** 2) / max(np.mean((a - b) ** 2), 1e-30))),
                shape_equal=bool(a.shape == b.shape))


def record(results, entry, name, out, times, peak, ref=None, **extra):
    e = dict(seconds=times, best_s=min(times), peak_gb=peak, shape=list(out.shape), finite=bool(np.isfinite(out).all()),
             **extra)
    if ref is not None:
        e["vs_stock"] = compare(ref, out)
    entry[name] = e
    log(f"  {name}: best {e['best_s']:.3f}s {times} peak {peak} GB" +
        (f" max|diff| {e['vs_stock']['max_abs_diff']:.3g} (ref max {e['vs_stock']['ref_max_abs']:.3g}, "
         f"snr {e['vs_stock']['snr_db']:.1f} dB)" if ref is not None else ""))
    return e


def bench_engine(name, args, results, save):
    entry = results["engines"].setdefault(name, {})
    steps, seed = args.steps, args.seed
    if name == "stable-audio":
        spec, engine_class, build = MODELS["stable-audio-open"], D.StableAudioEngine, build_stable_audio
        duration = args.sa_seconds
        req = lambda n: Request(prompt="warm analog synth pads, slow tempo", duration=duration,  # noqa: E731
                                num_inference_steps=n, guidance_scale=7.0, model_version=spec.name)
        task = "text2music"
    else:
        spec, engine_class, build = MODELS["dance-diffusion-maestro"], D.DanceDiffusionEngine, build_dance_diffusion
        duration = 65536 / 16000 if not TINY else 1.0
        req = lambda n: Request(duration=duration, num_inference_steps=n, model_version=spec.name)  # noqa: E731
        task = "unconditional"

    base = alloc_gb()  # what an earlier engine left allocated (0 once freed: see the end of this function)
    t = time.perf_counter()
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    sync()
    denoiser = pipe.transformer if name == "stable-audio" else pipe.unet
    entry.update(build_s=round(time.perf_counter() - t, 2), duration_s=duration, steps=steps, seed=seed,
                 params_m=dict(denoiser=params_m(denoiser), total=params_m(*[m for m in pipe.components.values()
                                                                            if isinstance(m, torch.nn.Module)])),
                 allocated_before_build_gb=base, weights_fp32_gb=alloc_gb())
    log(f"{name}: built in {entry['build_s']}s, {entry['params_m']} M params")

    def stock(n):
        torch.manual_seed(seed)
        g = torch.Generator("cpu").manual_seed(seed)
        if name == "stable-audio":
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
            a = pipe(prompt=req(n).prompt, audio_end_in_s=duration, num_inference_steps=n, guidance_scale=7.0,
                     generator=g).audios
            return a[0].float().cpu().numpy()
        return pipe(batch_size=1, num_inference_steps=n, generator=g, audio_length_in_s=duration).audios[0]

    with torch.inference_mode():
        stock(2)
        ref, times, peak = timed(lambda: stock(steps), args.reps)
    record(results, entry, "stock_fp32", ref, times, peak)
    save()

    quiet = lambda m: None  # noqa: E731
    variants = [("ours_fp32", torch.float32)] if name == "stable-audio" and args.ours_fp32 else []
    variants.append(("ours", torch.float16))  # what the service passes on CUDA; the engine picks bf16 on Ampere+
    eager = None
    for label, dtype in variants:
        reset_peak()
        engine = engine_from(engine_class, spec, pipe, dtype)
        run = lambda n: engine.run(req(n), task, seed, quiet)  # noqa: E731
        run(2)
        out, times, peak = timed(lambda: run(steps), args.reps)
        record(results, entry, label, out, times, peak, ref=ref, dtype=str(engine.dtype))
        eager = out
        save()

    if name in args.compile and time.perf_counter() - T0 < args.compile_deadline:
        try:
            mod = engine.pipe.transformer if name == "stable-audio" else engine.unet
            mod.compile(mode=args.compile_mode, dynamic=False)
            sync()
            t = time.perf_counter()
            run(steps)
            sync()
            first = round(time.perf_counter() - t, 2)
            out, times, peak = timed(lambda: run(steps), args.reps)
            e = record(results, entry, "ours_compiled", out, times, peak, ref=ref, dtype=str(engine.dtype),
                       mode=args.compile_mode, first_call_s=first, compile_s=round(first - min(times), 2))
            e["vs_ours_eager"] = compare(eager, out)
        except Exception as exc:  # report, keep the rest
            entry["ours_compiled"] = dict(error=f"{type(exc).__name__}: {exc}"[:2000])
            log(traceback.format_exc())
    elif name in args.compile:
        entry["ours_compiled"] = dict(skipped=f"past the {args.compile_deadline}s deadline")
    s = entry["stock_fp32"]["best_s"]
    entry["speedup_vs_stock"] = {k: round(s / v["best_s"], 2) for k, v in entry.items()
                                 if isinstance(v, dict) and "best_s" in v and k != "stock_fp32"}
    log(f"{name}: speed-up {entry['speedup_vs_stock']}")
    save()



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="dance-diffusion,stable-audio")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--sa-seconds", type=float, default=30.0)
    ap.add_argument("--compile", default="dance-diffusion,stable-audio", help="engines whose denoiser to compile")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--compile-deadline", type=float, default=150.0, help="skip compiling past this many seconds")
    ap.add_argument("--no-ours-fp32", dest="ours_fp32", action="store_false")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    args.compile = [c for c in args.compile.split(",") if c]
    import diffusers
    import transformers

    results = dict(command="python3 " + " ".join(sys.argv), tiny=TINY, argv=vars(args),
                   versions=dict(torch=torch.__version__, diffusers=diffusers.__version__,
                                 transformers=transformers.__version__, python=platform.python_version(),
                                 cuda=torch.version.cuda),
                   gpu=torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
                   settings=dict(tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                                 cudnn_tf32=torch.backends.cudnn.allow_tf32), engines={})
    path = Path(args.out) / ("diffusion-tiny.json" if TINY else "diffusion.json")

    def save():
        results["elapsed_s"] = round(time.perf_counter() - T0, 1)
        path.write_text(json.dumps(results, indent=1))

    for name in [e for e in args.engines.split(",") if e]:
        try:
            bench_engine(name, args, results, save)
        except Exception as exc:
            results["engines"].setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            log(traceback.format_exc())
        save()
        # the compiled module's dynamo cache holds the weights: without this, results/diffusion-h100.json's second
        # engine started with ~3.2 GB of the first one still allocated (counted in its stock and eager peaks)
        torch._dynamo.reset()
        gc.collect()
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
