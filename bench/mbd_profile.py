"""Where one MBD U-Net call spends its time (GPU), and what simple variants change it.

    python3 bench/mbd_profile.py [--secs 30] [--configs transformer,conv]

Builds lib.mbd's DiffusionUNet at the assumed full size (hidden 48, depth 4, growth 4, kernel 8, stride 4,
codec_dim 128; bottleneck: 6-layer transformer, or none), bf16, one 30 s mono band, and prints the
per-kernel CUDA time of one call plus the time per call for: as is; cudnn.benchmark; a CUDA graph.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from lib import mbd  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--secs", type=float, default=30.0)
p.add_argument("--configs", default="transformer,conv")
p.add_argument("--full", default="transformer,conv", help="time the whole 4-band decoder for these configs")
args = p.parse_args()
dev = "cuda"
OUT = os.environ.get("OUT", "/tmp/out")
os.makedirs(OUT, exist_ok=True)
N = int(args.secs * 32000)
CONFIGS = {"transformer": dict(transformer=True), "conv": dict(transformer=False),
           "blstm": dict(bilstm=True)}
results = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "secs": args.secs}


def per_call(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return round(sorted(ts)[len(ts) // 2] * 1e3, 2)


for name in args.configs.split(","):
    torch.manual_seed(0)
    unet = mbd.DiffusionUNet(chin=1, hidden=48, depth=4, growth=4, kernel=8, stride=4, norm_groups=4,
                             emb_all_layers=True, codec_dim=128, **CONFIGS[name]).to(dev, torch.bfloat16).eval()
    params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(1, 1, N, device=dev, dtype=torch.bfloat16)
    cond = torch.randn(1, 128, N // 640, device=dev, dtype=torch.bfloat16)
    entry = {"params_m": round(params / 1e6, 1)}

    def call():
        with torch.inference_mode():
            return unet(x, 500, cond)

    for benchmark, suffix in ((False, ""), (True, "_cudnn_benchmark")):
        torch.backends.cudnn.benchmark = benchmark
        entry["ms_per_call" + suffix] = per_call(call)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)
        with open(os.path.join(OUT, f"mbd_profile_{name}{'_bench' if benchmark else ''}.txt"), "w") as f:
            f.write(table)
    print(f"== {name}: {entry}", flush=True)
    try:  # the whole call as one CUDA graph (static x / cond buffers)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            call()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(g):
            out = unet(x, 500, cond)
        entry["ms_per_call_graph"] = per_call(g.replay)
        ref = call()
        g.replay()
        entry["graph_max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
    except Exception as e:  # noqa: BLE001
        entry["graph_error"] = repr(e)[:300]
    entry["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    results[name] = entry
    print(json.dumps({name: entry}), flush=True)
    del unet
    torch.cuda.empty_cache()

torch.backends.cudnn.benchmark = False  # as lib.mbd runs

# attention at the bottleneck: T = N / 256 frames, 8 heads of 384 (flash needs <= 256)
T, H, hd = N // 256, 8, 384
q, k, v = (torch.randn(1, H, T, hd, device=dev, dtype=torch.bfloat16) for _ in range(3))


def explicit_attention(q, k, v):
    """The variant measured and not kept (bench/results/mbd-h100.md): two matrix products, fp32 scores and softmax."""
    b, h, t, d = q.shape
    scores = torch.bmm(q.reshape(b * h, t, d), k.reshape(b * h, -1, d).transpose(1, 2), out_dtype=torch.float32)
    p = torch.softmax(scores.mul_(d ** -0.5), dim=-1).to(q.dtype)
    return torch.bmm(p, v.reshape(b * h, -1, d)).view(b, h, t, d)


att = {"explicit": per_call(lambda: explicit_attention(q, k, v))}
ref64 = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * hd ** -0.5, -1) @ v.double()
for name, fn in (("explicit", lambda: explicit_attention(q, k, v)),
                 ("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))):
    o = fn().double()
    att[f"{name}_rel_err_vs_fp64"] = ((o - ref64).norm() / ref64.norm()).item()
del ref64
for backend in ("default", "math", "efficient"):
    try:
        if backend == "default":
            fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            be = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

            def fn(be=be):
                with sdpa_kernel(be):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        att[backend] = per_call(fn)
    except Exception as e:  # noqa: BLE001
        att[backend] = repr(e)[:120]
results["attention_T%d_h8x384_ms" % T] = att

# our GroupNorm against torch's, same weights
gn = mbd._GroupNorm(4, 48).to(dev)
with torch.no_grad():
    gn.weight.normal_()
    gn.bias.normal_()
ref_gn = torch.nn.GroupNorm(4, 48).to(dev)
ref_gn.load_state_dict(gn.state_dict())
for dt in (torch.float32, torch.bfloat16):
    xg = (torch.randn(2, 48, N // 4, device=dev) * 3 + 1).to(dt)
    with torch.no_grad():
        a, r = gn.to(dt)(xg).float(), ref_gn.to(dt)(xg).float()
        r64 = torch.nn.functional.group_norm(xg.double(), 4, gn.weight.double(), gn.bias.double(), gn.eps)
    results[f"groupnorm_{dt}"] = {"ours_ms": per_call(lambda: gn(xg)), "torch_ms": per_call(lambda: ref_gn(xg)),
                                  "ours_max_abs_vs_fp64": (a - r64).abs().max().item(),
                                  "torch_max_abs_vs_fp64": (r - r64).abs().max().item()}

# the whole decoder, 30 s mono, 4 bands (random checkpoint at the assumed size), bf16
if args.full:
    from transformers import EncodecConfig, EncodecModel
    from lib.tiny_mbd import build_checkpoint, save_checkpoint
    enc = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=64, hidden_size=128,
                        upsampling_ratios=[8, 5, 4, 4], codebook_size=2048, target_bandwidths=[2.2],
                        use_causal_conv=False, normalize=False, num_lstm_layers=2, compress=2)
    codec = mbd.EncodecCodec(EncodecModel(enc).to(dev).eval())
    codes = torch.randint(0, 2048, (1, 4, int(args.secs * 50)), device=dev)
    for name in args.full.split(","):
        t0 = time.perf_counter()
        path = save_checkpoint(build_checkpoint(0, hidden=48, depth=4, growth=4, codec_dim=128, **CONFIGS[name]),
                               f"/tmp/mbd_{name}.th")
        m = mbd.MultiBandDiffusion.from_checkpoint(path, device=dev, dtype=torch.bfloat16)
        built = time.perf_counter() - t0
        gen = torch.Generator(device=dev).manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        ms = per_call(lambda: m.decode(codes, codec, generator=gen), reps=3)
        results[f"decode_{name}"] = {"secs_audio": args.secs, "s": round(ms / 1e3, 3), "build_s": round(built, 1),
                                     "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(json.dumps({name: results[f"decode_{name}"]}), flush=True)
        del m
        torch.cuda.empty_cache()
print(json.dumps(results, indent=1))
json.dump(results, open(os.path.join(OUT, "mbd_profile.json"), "w"), indent=1)
