"""Experiment: a GEMV for the CFG pair written as a tensor-core dot (x padded to 16 rows) so that Triton
software-pipelines the weight loads (num_stages deep, cp.async), against our `_gemv` heuristic and cuBLAS.
Weights rotated through HBM, graph-launched (gaps included), as bench/gemv_sweep.py.
    python3 bench/gemv_dot.py            # prints per shape: cuBLAS, ours now, best dot config, TB/s
SPLIT > 1 splits K over programs and adds the partial sums with fp32 atomics (timing only: the order of
the adds is not fixed, so a served kernel would need a deterministic merge)."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib.musicgen_fast as mf  # noqa: E402
from gemv_sweep import SHAPES, operands, time_chain  # noqa: E402


@triton.jit
def _gemv_dot_kernel(X, W, Y, M, N, K, sx, sy, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    kspan = K // SPLIT
    for k0 in range(sp * kspan, (sp + 1) * kspan, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(W + n[:, None] * K + k[None, :])
        x = tl.load(X + m[None, :] * sx + k[:, None], mask=m[None, :] < M, other=0.0)
        acc = tl.dot(w, x, acc)
    if SPLIT == 1:
        tl.store(Y + m[None, :] * sy + n[:, None], acc.to(Y.dtype.element_ty), mask=m[None, :] < M)
    else:
        tl.atomic_add(Y + m[None, :] * sy + n[:, None], acc, mask=m[None, :] < M, sem="relaxed")


def gemv_dot(x, w, out, bn, bk, split, stages, warps):
    M, K = x.shape
    N = w.shape[0]
    if split > 1:
        out.zero_()
    _gemv_dot_kernel[(N // bn, split)](x, w, out, M, N, K, x.stride(0), out.stride(0), BLOCK_N=bn, BLOCK_K=bk,
                                       SPLIT=split, num_stages=stages, num_warps=warps)
    return out


rows = 2
CONFIGS = [(bn, bk, sp, st, nw) for bn in (16, 32, 64, 128) for bk in (64, 128, 256) for sp in (1, 2, 4, 8)
           for st in (3, 5) for nw in (4,)]

res = {}
torch.manual_seed(0)
for name, (N, K) in SHAPES.items():
    nbytes = N * K * 2
    ws, x = operands(N, K, rows)
    n_w = len(ws)
    out = torch.empty(rows, N, device="cuda", dtype=torch.float16)
    out32 = torch.empty(rows, N, device="cuda", dtype=torch.float32)
    ref = F.linear(x.float(), ws[0].float())
    r = {"cublas_us": time_chain(lambda i: torch.matmul(x, ws[i].t(), out=out), n_w),
         "ours_now_us": time_chain(lambda i: mf._gemv(x, ws[i], out=out), n_w)}
    best = None
    for bn, bk, sp, st, nw in CONFIGS:
        if N % bn or K % (bk * sp) or (N // bn) * sp < 64 or (N // bn) * sp > 4096 or K // sp < bk * 2:
            continue
        o = out if sp == 1 else out32
        try:
            y = gemv_dot(x, ws[0], o, bn, bk, sp, st, nw)
            err = float((y.float() - ref).norm() / ref.norm())
            if not err < 2e-3:
                r[f"{(bn, bk, sp, st, nw)}"] = f"err {err:.2e}"
                continue
            us = time_chain(lambda i: gemv_dot(x, ws[i], o, bn, bk, sp, st, nw), n_w)
        except Exception as e:  # noqa: BLE001  (shared memory, etc.)
            r[f"{(bn, bk, sp, st, nw)}"] = repr(e)[:80]
            continue
        r[str((bn, bk, sp, st, nw))] = round(us, 2)
        if best is None or us < best[1]:
            best = ((bn, bk, sp, st, nw), us)
    r["best"], r["best_us"] = best[0], round(best[1], 2)
    for k in ("cublas", "ours_now", "best"):
        r[f"{k}_TBps"] = round(nbytes / r[f"{k}_us"] / 1e6, 2)
    res[name] = r
    print(f"{name:14s} {nbytes/1e6:6.1f} MB  cublas {r['cublas_us']:7.2f} us {r['cublas_TBps']:4.2f} TB/s | ours now "
          f"{r['ours_now_us']:7.2f} {r['ours_now_TBps']:4.2f} | dot best {best[0]} {best[1]:7.2f} {r['best_TBps']:4.2f}",
          flush=True)
    del ws
    torch.cuda.empty_cache()
if os.environ.get("OUT"):
    Path(os.environ["OUT"], "gemv-dot-rows2.json").write_text(json.dumps(res, indent=1))
