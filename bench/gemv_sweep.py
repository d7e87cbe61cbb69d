"""GEMV configs for the decode step's matrices (GPU only): our Triton `_gemv` at 2 rows (CFG) against
cuBLAS (F.linear), weights rotated over enough copies to miss L2 (HBM, as in a real step).
    python3 bench/gemv_sweep.py [rows] [BNxBKxWARPS,...] [shape,...] [pdl]   # per shape: cuBLAS, best config, TB/s
K need not be a multiple of BK (the kernel masks the last step). With `pdl`, each GEMV of the chain runs as in
the fused step: a programmatic dependent of the one before (Hopper), with its matrix's prologue / epilogue
(layer norm for qkv, fc1, heads and the folded scores; GELU for fc1; residual for o, fc2 and fold_o)."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lib.musicgen_fast as mf  # noqa: E402

# the decode step's matrices (N, K) per model size
SHAPES = {}
for name, D in (("small", 1024), ("medium", 1536), ("large", 2048)):
    H = D // 64
    for what, (N, K) in dict(qkv=(3 * D, D), o=(D, D), fc1=(4 * D, D), fc2=(D, 4 * D), heads=(4 * 2048, D),
                             fold_q=(H * 16, D), fold_o=(D, H * 16),  # folded cross-attention, 16 text tokens
                             fold_q32=(H * 32, D), fold_o32=(D, H * 32)).items():  # and 32
        SHAPES[f"{name}.{what}"] = (N, K)
ROLE = dict(qkv=dict(ln=True), fc1=dict(ln=True, gelu=True), heads=dict(ln=True), fold_q=dict(ln=True),
            fold_q32=dict(ln=True), o=dict(res=True), fc2=dict(res=True), fold_o=dict(res=True), fold_o32=dict(res=True))


def triton_pow2(n):
    return 1 << (n - 1).bit_length()


def operands(N, K, rows, device="cuda"):
    """Enough copies of an (N, K) fp16 weight that a chain of GEMVs over them streams >= 160 MB from HBM (no L2
    reuse), and one (rows, K) input. Returns (weights, x)."""
    n_w = max(8, int(160e6 // (N * K * 2)))
    ws = [torch.randn(N, K, device=device, dtype=torch.float16) * K ** -0.5 for _ in range(n_w)]
    return ws, torch.randn(rows, K, device=device, dtype=torch.float16)


def time_graph(fn, reps=30):
    """(median ms of `reps` replays, fn's output): fn() run once, then captured as one CUDA graph and replayed."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(reps):
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    ts.sort()
    return ts[len(ts) // 2], out


def time_chain(fn, n_w, reps=20):
    """us per GEMV: fn(0..n_w-1) (one weight copy each) captured as one graph, median of `reps` replays (launch gaps
    of the graph included)."""
    return time_graph(lambda: [fn(i) for i in range(n_w)], reps)[0] / n_w * 1000


def main():
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    configs = [(bn, bk, nw) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024) for nw in (4, 8)
               if bn * bk * rows <= 8192 * nw and bn * bk >= 1024]
    if len(sys.argv) > 2 and sys.argv[2]:
        configs = [tuple(int(v) for v in c.split("x")) for c in sys.argv[2].split(",")]
    shapes = sys.argv[3].split(",") if len(sys.argv) > 3 and sys.argv[3] else list(SHAPES)
    pdl = len(sys.argv) > 4 and sys.argv[4] == "pdl"
    res = {}
    torch.manual_seed(0)
    for name, (N, K) in ((n, SHAPES[n]) for n in shapes):
        nbytes = N * K * 2
        ws, x = operands(N, K, rows)
        n_w = len(ws)
        out = torch.empty(rows, N, device="cuda", dtype=torch.float16)
        ref = F.linear(x, ws[0]).float()
        r = {"cublas_us": time_chain(lambda i: torch.matmul(x, ws[i].t(), out=out), n_w)}
        kw = {}
        if pdl:  # the matrix's own prologue / epilogue, as in the step
            role = ROLE[name.split(".")[1]]
            kw = dict(pdl=True, gelu=role.get("gelu", False),
                      ln=(torch.ones(K, device="cuda", dtype=torch.float16),) * 2 if role.get("ln") else None,
                      res=torch.zeros(rows, N, device="cuda", dtype=torch.float16) if role.get("res") else None)
        best = None
        for cfg in dict.fromkeys([*configs, tuple(mf._gemv_config(rows, N, K, 2))]):  # + what lib picks now
            if N % cfg[0] or cfg[1] > triton_pow2(K):
                continue
            if not kw:
                y = mf._gemv(x, ws[0], config=cfg)
                err = float((y.float() - ref).norm() / ref.norm())
                assert err < 2e-3, (name, cfg, err)
            us = time_chain(lambda i: mf._gemv(x, ws[i], out=out, config=cfg, **kw), n_w)
            r[str(cfg)] = round(us, 2)
            if best is None or us < best[1]:
                best = (cfg, us)
        r["best"] = best[0]
        r["best_us"] = round(best[1], 2)
        r["heuristic"] = mf._gemv_config(rows, N, K, 2)
        r["heuristic_us"] = r.get(str(tuple(r["heuristic"])))
        r["best_TBps"] = round(nbytes / best[1] / 1e6, 2)
        r["cublas_TBps"] = round(nbytes / r["cublas_us"] / 1e6, 2)
        res[name] = r
        print(f"{name:14s} N{N:6d} K{K:5d} {nbytes/1e6:6.1f} MB cublas {r['cublas_us']:7.2f} us ({r['cublas_TBps']} TB/s) "
              f"best {best[0]} {best[1]:7.2f} us ({r['best_TBps']} TB/s) heuristic {r['heuristic']} {r['heuristic_us']}",
              flush=True)
        del ws
        torch.cuda.empty_cache()
    print("GEMV_SWEEP " + json.dumps({k: (v["best"], v["best_us"]) for k, v in res.items()}))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"gemv-sweep-rows{rows}{'-pdl' if pdl else ''}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
