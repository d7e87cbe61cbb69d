"""Decode-step variants of our fused path on one GPU (30 s clip, batch 1, CFG 3, top_k 250, fp16):
L2-prefetch size, and the cuBLAS step for reference. Every fused variant must give the same tokens as the
first (same seed). (Programmatic dependent launch was tried the same way and measured slower:
results/musicgen-h100-step-variants-pdl.txt, patch in results/musicgen-h100-pdl-experiment.diff.)
    python3 bench/step_variants.py small,medium,large [variant,...]"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from musicgen import build, request  # noqa: E402
from lib.musicgen_codes import decoding_steps  # noqa: E402
from lib.musicgen_fast import FastMusicgen  # noqa: E402

sizes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["small", "medium", "large"]
variants = [("fused-pf0", dict(prefetch_bytes=0)), ("cublas-step", dict(fused_step=False)),
            ("fused-pf8M", dict(prefetch_bytes=8 << 20)), ("fused-pf24M", dict(prefetch_bytes=24 << 20))]
if len(sys.argv) > 2:
    variants = [v for v in variants if v[0] in sys.argv[2].split(",")]
res = {}
for size in sizes:
    model = build(size)
    steps = decoding_steps(4, 1500)
    ref = None
    for name, kw in variants:
        fast = FastMusicgen(model, "cuda", torch.float16, **kw)
        fast.generate_codes(request(1, 30), torch.Generator(device="cuda").manual_seed(0))
        dts = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            codes = fast.generate_codes(request(1, 30), torch.Generator(device="cuda").manual_seed(1))
            torch.cuda.synchronize()
            dts.append(time.perf_counter() - t)
        dt = min(dts)
        same = None
        if name.startswith("fused"):
            ref = codes if ref is None else ref
            same = bool(torch.equal(ref, codes))
        res[f"{size}.{name}"] = dict(wall_s=round(dt, 3), ms_per_step=round(dt / steps * 1000, 3), same_tokens=same)
        print(size, name, res[f"{size}.{name}"], flush=True)
        del fast
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
print("VARIANTS " + json.dumps(res))
