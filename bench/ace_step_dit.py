"""Where one step of ACE-Step's DiT spends its time on the GPU, and what each candidate change would save.

Builds bench/diffusion.py's full-size random-init ACE-Step XL turbo pipeline in bf16, records the DiT's call from one
pipeline call (60 s of audio: 750 tokens after the patchify), then, on those exact inputs:
  dit          eager forward: stock, with our row-major hook (lib.diffusion), and with the fused blocks too
               (lib.ace_step_dit); host time to issue one call against its GPU time (a call that issues slower than it
               runs is host-bound); DenoiserGraphs: the first call (eager run + capture) against a replay
  profile_*    one eager forward's CUDA kernels, summed by kind (GEMM, attention, norms and elementwise, copies)
  attention    one layer's self-attention as the DiT runs it (diffusers' dispatch with the dense sliding-window mask,
               GQA) against the same call without a mask (what the full-attention layers run) and each SDPA backend
  vae          the Oobleck decode of the 60 s of latents with the fused Snake, by kernel kind

    python3 bench/ace_step_dit.py --out $OUT                  # GPU (full size, ~2 min)
    BENCH_TINY=1 python3 bench/ace_step_dit.py --reps 2       # CPU dry run on the tiny pipeline
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

import bench.diffusion as B  # noqa: E402
from lib import ace_step_dit  # noqa: E402
from lib import diffusion as D  # noqa: E402
from lib import snake  # noqa: E402
from lib.cuda_graphs import DenoiserGraphs  # noqa: E402

DEV, CUDA = B.DEV, B.DEV.type == "cuda"


def timed_ms(fn, reps):
    """Median GPU-synchronized wall time of fn() in ms, and the median time to issue it (no sync)."""
    walls, issues = [], []
    for _ in range(reps):
        B.sync()
        t = time.perf_counter()
        fn()
        issues.append(time.perf_counter() - t)
        B.sync()
        walls.append(time.perf_counter() - t)
    return round(statistics.median(walls) * 1e3, 3), round(statistics.median(issues) * 1e3, 3)


KINDS = [  # (kind, substrings of a kernel name), first match wins
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "cublas")),
    ("attention", ("flash", "fmha", "attention", "efficient", "softmax")),
    ("conv", ("conv", "implicit", "nchwToNhwc", "nhwcToNchw", "winograd")),
    ("snake", ("_snake",)),
    ("reduce", ("reduce", "norm", "mean")),
    ("copy", ("copy", "Memcpy", "Memset", "cat", "index")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def kernel_table(fn, top=25):
    """One call of fn under the profiler: ms per kernel kind and the top kernels (CUDA; CPU ops on the CPU)."""
    rows = B.kernel_rows(fn)
    kinds = {}
    for name, us, n in rows:
        kind = next((k for k, subs in KINDS if any(s.lower() in name.lower() for s in subs)), "other")
        ms, calls = kinds.get(kind, (0.0, 0))
        kinds[kind] = (ms + us / 1e3, calls + n)
    return dict(total_ms=round(sum(r[1] for r in rows) / 1e3, 3),
                kinds={k: dict(ms=round(v[0], 3), calls=v[1]) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
                top=[dict(name=n[:140], ms=round(us / 1e3, 3), calls=c) for n, us, c in rows[:top]])


def record_dit_call(pipe, seconds):
    """(args, kwargs) of the DiT's first call in one pipeline call, cloned."""
    seen = {}

    def grab(module, args, kwargs):
        if "call" not in seen:
            seen["call"] = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(prompt=B.PROMPT, lyrics=B.LYRICS, audio_duration=seconds, num_inference_steps=1, guidance_scale=1.0,
             shift=3.0, bpm=120, keyscale="C major", timesignature="4", vocal_language="en", output_type="latent",
             generator=torch.Generator("cpu").manual_seed(0))
    finally:
        handle.remove()
    return seen["call"]


def bench_dit(pipe, call, reps, res):
    """The DiT call as stock diffusers runs it, with session 3's row-major hook, and with the fused blocks too."""
    dit = pipe.transformer
    args, kwargs = call
    run = lambda: dit(*args, **kwargs)  # noqa: E731
    res["dit"] = dict(tokens=int(kwargs["hidden_states"].shape[1]) // dit.patch_size,
                      encoder_tokens=int(kwargs["encoder_hidden_states"].shape[1]))
    ref = run()[0].float()
    variants = {"stock": (), "row_major": ("row_major",), "fused": ("row_major", "fused")}
    for label, parts in variants.items():
        with contextlib.ExitStack() as stack:
            if "row_major" in parts:
                stack.callback(dit.layers[0].register_forward_pre_hook(D._row_major_hidden_states,
                                                                       with_kwargs=True).remove)
            if "fused" in parts:
                stack.enter_context(ace_step_dit.fused_blocks(dit))
            out = res["dit"][label] = {}
            got = run()[0].float()
            out["max_abs_diff_vs_stock"] = float((got - ref).abs().max())
            out["eager_ms"], out["issue_ms"] = timed_ms(run, reps)
            if label != "stock":
                res[f"profile_{label}"] = kernel_table(run)
                out["kinds"] = res[f"profile_{label}"]["kinds"]
            if CUDA:
                graphs = stack.enter_context(DenoiserGraphs(dit).installed())
                B.sync()
                t = time.perf_counter()
                run()  # eager + capture
                B.sync()
                out["graph_first_call_ms"] = round((time.perf_counter() - t) * 1e3, 3)
                out["graph_replay_ms"], out["graph_issue_ms"] = timed_ms(run, reps)
                out["graphs"] = graphs.summary()
        B.log(f"dit {label}: {out}")


def bench_attention(pipe, call, reps, res):
    """A sliding-window layer's self-attention on the DiT's shapes (random q/k/v, the model's own mask)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.ace_step_transformer import _create_4d_mask

    dit = pipe.transformer
    attn = dit.layers[0].self_attn
    n = int(call[1]["hidden_states"].shape[1]) // dit.patch_size
    g = torch.Generator(DEV).manual_seed(0)
    q = torch.randn(1, n, attn.heads, attn.head_dim, device=DEV, dtype=dit.dtype, generator=g)
    k = torch.randn(1, n, attn.kv_heads, attn.head_dim, device=DEV, dtype=dit.dtype, generator=g)
    v = torch.randn_like(k)
    mask = _create_4d_mask(seq_len=n, dtype=dit.dtype, device=DEV, sliding_window=dit.config.sliding_window,
                           is_sliding_window=True, is_causal=False)
    out = res["attention"] = dict(tokens=n, heads=attn.heads, kv_heads=attn.kv_heads, window=dit.config.sliding_window)

    def dispatch(m):
        return dispatch_attention_fn(q, k, v, attn_mask=m, scale=attn.scaling, enable_gqa=attn.heads != attn.kv_heads)

    ref = dispatch(mask).float()
    out["stock_masked_ms"] = timed_ms(lambda: dispatch(mask), reps)[0]
    out["stock_unmasked_ms"] = timed_ms(lambda: dispatch(None), reps)[0]
    out["stock_masked_profile"] = kernel_table(lambda: dispatch(mask), top=6)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    rep = attn.heads // attn.kv_heads
    kr, vr = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name)
        for label, kk, vv, gqa in (("gqa", kt, vt, True), ("repeated_kv", kr, vr, False)):
            key = f"sdpa_{name.lower()}_{label}_masked"
            try:
                with sdpa_kernel([backend]):
                    fn = lambda: F.scaled_dot_product_attention(qt, kk, vv, attn_mask=mask, scale=attn.scaling,  # noqa
                                                                enable_gqa=gqa)
                    err = (fn().transpose(1, 2).float() - ref).abs().max().item()
                    out[key] = dict(ms=timed_ms(fn, reps)[0], max_abs_diff=err)
            except Exception as e:  # this backend does not take these inputs
                out[key] = dict(error=f"{type(e).__name__}: {e}"[:160])
    B.log(f"attention: { {k: v for k, v in out.items() if k != 'stock_masked_profile'} }")


def bench_vae(pipe, seconds, reps, res):
    vae = pipe.vae
    frames = int(round(seconds * pipe.sample_rate / int(torch.tensor(vae.config.downsampling_ratios).prod())))
    z = torch.randn(1, vae.config.decoder_input_channels, frames, device=DEV, dtype=vae.dtype)
    run = lambda: vae.decode(z).sample  # noqa: E731
    out = res["vae"] = dict(latent_frames=frames)
    run()
    out["stock_ms"] = timed_ms(run, reps)[0]
    out["stock_profile"] = kernel_table(run, top=12)
    if snake.available(DEV):
        with snake.fused_snake(vae):
            run()
            out["fused_snake_ms"] = timed_ms(run, reps)[0]
            out["fused_snake_profile"] = kernel_table(run, top=12)
    B.log(f"vae: { {k: v for k, v in out.items() if 'profile' not in k} }")
    B.log(f"vae kinds: {out.get('fused_snake_profile', out['stock_profile'])['kinds']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--parts", default="dit,attention,vae")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if B.TINY:
        args.seconds = min(args.seconds, 2.0)
    res = dict(command=" ".join(sys.argv), seconds=args.seconds, reps=args.reps, torch=torch.__version__,
               python=platform.python_version(), gpu=torch.cuda.get_device_name() if CUDA else "cpu")
    pipe = B.build_ace_step(0).to(DEV, torch.bfloat16 if CUDA else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        call = record_dit_call(pipe, args.seconds)
        for part in args.parts.split(","):
            {"dit": lambda: bench_dit(pipe, call, args.reps, res),
             "attention": lambda: bench_attention(pipe, call, args.reps, res),
             "vae": lambda: bench_vae(pipe, args.seconds, args.reps, res)}[part]()
    path = Path(args.out) / f"ace-step-dit-{'tiny' if B.TINY else res['gpu'].split()[-1].lower()}.json"
    path.write_text(json.dumps(res, indent=1))
    B.log(f"wrote {path}")


if __name__ == "__main__":
    main()
