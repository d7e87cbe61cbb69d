"""Decode-step variants on one GPU (30 s clip, batch 1, CFG 3, top_k 250, fp16): the persistent one-launch
step (lib.musicgen_fast._persistent_step_kernel) and its launch configurations, the ~8-launches-per-layer fused
step with its L2-prefetch sizes, and the cuBLAS step for reference. `agreement`: the share of tokens equal to the
first variant's (same seed; fp16 sums in another order can flip a sampled token, which then changes the rest). (Programmatic dependent launch was tried the same way and measured slower:
results/musicgen-h100-step-variants-pdl.txt, patch in results/musicgen-h100-pdl-experiment.diff.)
    python3 bench/step_variants.py small,medium,large [variant,...] [seconds, default 30]"""
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
def persistent(**cfg):
    return dict(persistent_config=cfg)


variants = [("persistent", dict()),
            ("p-g1-bn8-w8", persistent(BLOCK_N=8, num_warps=8, BLOCK_K=512, BLOCK_KF=512)),
            ("p-g2-bn4", persistent(ctas_per_sm=2, BLOCK_N=4)), ("p-g4-bn4", persistent(ctas_per_sm=4, BLOCK_N=4)),
            ("p-g4-bn2", persistent(ctas_per_sm=4, BLOCK_N=2)),
            ("p-g4-bn4-nopf", persistent(ctas_per_sm=4, BLOCK_N=4, PREFETCH=False)),
            ("p-g8-bn2", persistent(ctas_per_sm=8, BLOCK_N=2)), ("p-g8-bn2-w2", persistent(ctas_per_sm=8, BLOCK_N=2,
                                                                                             num_warps=2)),
            ("fused-pf0", dict(persistent=False, prefetch_bytes=0)), ("cublas-step", dict(fused_step=False)),
            ("fused-pf8M", dict(persistent=False, prefetch_bytes=8 << 20)),
            ("fused-pf24M", dict(persistent=False, prefetch_bytes=24 << 20))]
if len(sys.argv) > 2:
    variants = [v for v in variants if v[0] in sys.argv[2].split(",")]
secs = int(sys.argv[3]) if len(sys.argv) > 3 else 30
res = {}
for size in sizes:
    model = build(size)
    steps = decoding_steps(4, int(secs * 50))
    ref = None
    for name, kw in variants:
        fast = FastMusicgen(model, "cuda", torch.float16, **kw)
        fast.generate_codes(request(1, secs), torch.Generator(device="cuda").manual_seed(0))
        dts = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            codes = fast.generate_codes(request(1, secs), torch.Generator(device="cuda").manual_seed(1))
            torch.cuda.synchronize()
            dts.append(time.perf_counter() - t)
        dt = min(dts)
        ref = codes if ref is None else ref
        res[f"{size}.{name}"] = dict(wall_s=round(dt, 3), ms_per_step=round(dt / steps * 1000, 3),
                                     agreement=round(float((ref == codes).float().mean()), 4),
                                     config=fast._persistent_config(2) if fast.persistent else None,
                                     grid=sorted(set(fast._resident.values())) or None)
        print(size, name, res[f"{size}.{name}"], flush=True)
        del fast
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
print("VARIANTS " + json.dumps(res))
