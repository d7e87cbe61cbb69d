"""Weights streamed through shared memory (bench/cuda_stream.py) against the Triton GEMV chain of lib.musicgen_fast
(GPU only, Hopper; session 10, bench/README.md):
    python3 bench/gemv_stream.py [sizes] [variant,...] [part,...]
    python3 bench/gemv_stream.py small,medium,large s96,s96n,s48x2,s48x2n,s160,s96v4,s48x2v4,p24,p24n,p24b,p24nb,p48,p24c,p24cn,p24cnb
Writes gemv-stream.json and .log to $OUT (or here). Parts (all by default):
1. parity: stream_gemv with every prologue / epilogue (layer norm, GELU, residual), 1-4 rows, fp16 / bf16 / fp32,
   plain and as a programmatic dependent, against torch in fp32 on the same rounded inputs.
2. chains: per model size every layer's qkv (layer norm) -> out projection (residual) -> fc1 (layer norm, GELU) ->
   fc2 (residual), then the heads (layer norm): each GEMV a programmatic dependent that lets the next launch at its
   start, as in the fused step (no attention kernels), 2 rows (the CFG pair), fp16, the whole model's distinct
   matrices (nothing from L2). One CUDA graph per chain: us per layer (median of replays), the rate over the weights'
   bytes, and the logits' difference from the Triton chain's. `triton` is lib.musicgen_fast._gemv with lib's configs;
   stream_gemv variants sRING[xCTAS][vVPT][tTHREADS][n]: ring KB per program, programs per SM, 16-byte vectors per
   thread and row (v4: x held in registers), threads per program; n: the weights only streamed in, no products
   (wrong output: the streaming's own time).
3. persistent: the same matrices as plain GEMVs (no prologues / epilogues) in one stream_chain launch, against the
   Triton chain of the same plain GEMVs. Variants pSLOT_KB[n][b][c][x]: slot KB; n: no products; b: no barriers
   between the phases (wrong output: the stream's own rate); c: cp.async by the producer warp instead of bulk copies;
   x: each phase's x read in 2-byte loads (session 10's measurements; since session 11 in 16-byte loads, every one
   issued before the first store).
4. single: one 201 / 268 MB GEMV alone, each way, with nothing interrupting the stream.
5. trace: twelve of medium's fc1 as a chain of stream_gemv with per-program timestamps (see `traces`)."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cuda_stream as cg  # noqa: E402
from gemv_sweep import time_graph  # noqa: E402
import lib.musicgen_fast as mf  # noqa: E402

SIZES = {"small": (1024, 24), "medium": (1536, 48), "large": (2048, 48)}


def reference(x, w, ln, gelu, res, eps=1e-5):
    xf = x.float()
    if ln is not None:
        xf = F.layer_norm(xf, (x.shape[1],), ln[0].float(), ln[1].float(), eps).to(x.dtype).float()
    y = xf @ w.float().t()
    if gelu:
        y = F.gelu(y.to(x.dtype).float())
    if res is not None:
        y = y + res.float()
    return y


def parity(log):
    torch.manual_seed(0)
    worst = {}
    ok = True
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for (N, K) in ((3072, 1024), (1536, 6144), (8192, 2048), (200, 1536), (1000, 8192)):
            for M in (1, 2, 3, 4):
                w = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
                x = torch.randn(M, K, device="cuda", dtype=dt)
                ln = (torch.randn(K, device="cuda", dtype=dt) * 0.2 + 1, torch.randn(K, device="cuda", dtype=dt) * 0.1)
                res = torch.randn(M, N, device="cuda", dtype=dt)
                for name, kw in (("plain", {}), ("ln", dict(ln=ln)), ("ln-gelu", dict(ln=ln, gelu=True)),
                                 ("res", dict(res=res)), ("gelu-res", dict(gelu=True, res=res))):
                    for pdl in (False, True):
                        y = cg.stream_gemv(x, w, pdl=pdl, early=pdl, **kw)
                        ref = reference(x, w, kw.get("ln"), kw.get("gelu", False), kw.get("res"))
                        err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                        key = f"{str(dt)[6:]} {name}"
                        worst[key] = max(worst.get(key, 0.0), err)
                        tol = 2e-2 if dt == torch.bfloat16 else (4e-3 if dt == torch.float16 else 1e-5)
                        if not err <= tol:
                            ok = False
                            log(f"PARITY FAIL {key} N={N} K={K} M={M} pdl={pdl}: rel err {err:.3g} > {tol}")
    torch.cuda.synchronize()
    for k, v in worst.items():
        log(f"parity {k}: max rel err {v:.3g}")
    log(f"parity: {'all within tolerance' if ok else 'FAILED'}")
    return ok, worst


def build_layers(D, L, dt=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(1)

    def mat(n, k):
        return torch.randn(n, k, device="cuda", dtype=dt, generator=g) * k ** -0.5

    def norm():
        return (torch.ones(D, device="cuda", dtype=dt), torch.zeros(D, device="cuda", dtype=dt))

    layers = [dict(qkv=mat(3 * D, D), o=mat(D, D), fc1=mat(4 * D, D), fc2=mat(D, 4 * D), ln1=norm(), ln3=norm())
              for _ in range(L)]
    return layers, mat(4 * 2048, D), norm()


def chain(gemv, layers, heads, lnf, h0):
    h = h0
    D = h0.shape[1]
    for lay in layers:
        qkv = gemv(h, lay["qkv"], ln=lay["ln1"], pdl=True, early=True)
        h = gemv(qkv[:, :D], lay["o"], res=h, pdl=True, early=True)
        f = gemv(h, lay["fc1"], ln=lay["ln3"], gelu=True, pdl=True, early=True)
        h = gemv(f, lay["fc2"], res=h, pdl=True, early=True)
    return gemv(h, heads, ln=lnf, pdl=True, early=True)


def parse_variant(v):
    kw = {}
    body = v[1:]
    if body.endswith("n"):  # the weights streamed in, no products: the kernel's floor (wrong output)
        body, kw["stream_only"] = body[:-1], True
    if "t" in body:
        body, t = body.split("t")
        kw["threads"] = int(t)
    if "v" in body:
        body, vpt = body.split("v")
        kw["vecs_per_thread"] = int(vpt)
    if "x" in body:
        body, c = body.split("x")
        kw["ctas_per_sm"] = int(c)
    kw["ring_bytes"] = int(body) * 1024
    return kw


def kernel_chains(sizes, variants, log):
    """Part 2 (docstring): the step's GEMVs with their prologues / epilogues, Triton against stream_gemv."""
    out = {}
    for size in sizes:
        D, L = SIZES[size]
        layers, heads, lnf = build_layers(D, L)
        nbytes = sum(t.numel() * 2 for lay in layers for t in (lay["qkv"], lay["o"], lay["fc1"], lay["fc2"]))
        nbytes += heads.numel() * 2
        h0 = torch.randn(2, D, device="cuda", dtype=torch.float16)
        ms, ref = time_graph(lambda: chain(mf._gemv, layers, heads, lnf, h0))
        ref = ref.clone()
        row = dict(triton=dict(ms=ms, us_per_layer=ms * 1000 / L, tb_s=nbytes / ms / 1e9))
        log(f"{size}: {nbytes / 1e9:.2f} GB per chain; triton {ms:.3f} ms ({ms * 1000 / L:.1f} us/layer, "
            f"{nbytes / ms / 1e9:.2f} TB/s)")
        for v in variants:
            kw = parse_variant(v)
            try:
                ms, y = time_graph(lambda: chain(lambda *a, **k: cg.stream_gemv(*a, **k, **kw), layers, heads, lnf, h0))
            except Exception as e:
                log(f"  {v}: failed: {type(e).__name__}: {e}")
                row[v] = dict(error=str(e))
                continue
            diff = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row[v] = dict(ms=ms, us_per_layer=ms * 1000 / L, tb_s=nbytes / ms / 1e9, rel_diff_vs_triton=diff)
            log(f"  {v}: {ms:.3f} ms ({ms * 1000 / L:.1f} us/layer, {nbytes / ms / 1e9:.2f} TB/s), "
                f"logits rel diff vs triton {diff:.2e}")
        out[size] = row
        torch.cuda.empty_cache()
    return out


def single_kernels(log):
    """Part 4: one large GEMV alone (201 and 268 MB, 2 rows, no PDL): how fast each way streams when no kernel
    boundary interrupts it."""
    out = {}
    for (N, K) in ((65536, 1536), (16384, 8192)):
        w = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
        x = torch.randn(2, K, device="cuda", dtype=torch.float16)
        nb = N * K * 2
        for name, fn in (("triton", lambda: mf._gemv(x, w)), ("cublas", lambda: F.linear(x, w)),
                         ("s96", lambda: cg.stream_gemv(x, w)), ("s96n", lambda: cg.stream_gemv(x, w, stream_only=True)),
                         ("s48x2", lambda: cg.stream_gemv(x, w, ring_bytes=48 * 1024, ctas_per_sm=2)),
                         ("s48x2n", lambda: cg.stream_gemv(x, w, ring_bytes=48 * 1024, ctas_per_sm=2, stream_only=True))):
            ms = time_graph(fn)[0]
            out[f"{N}x{K} {name}"] = dict(us=ms * 1000, tb_s=nb / ms / 1e9)
            log(f"single N={N} K={K} ({nb / 1e6:.0f} MB) {name}: {ms * 1000:.1f} us, {nb / ms / 1e9:.2f} TB/s")
    return out


def traces(log):
    """Part 5: twelve of medium's fc1 (6144 x 1536, 18.9 MB) as a chain of stream_gemv, programmatic dependents
    that let the next launch at their start; each program records its SM and the global timer at its start, past
    its wait, and at its end. Medians over the chain: the period (one GEMV), how long before the previous GEMV's
    program on the same SM ended this one started (negative: it ran beside it), start to past the wait, past the
    wait to the end, and the lag from the previous GEMV's last end to this one's first program past its wait."""
    import statistics as st
    out = {}
    N, K, J = 6144, 1536, 12
    ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(J)]
    x = torch.randn(2, K, device="cuda", dtype=torch.float16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, kw in (("s96n", dict(stream_only=True)), ("s96", {}), ("s160n", dict(ring_bytes=160 * 1024, stream_only=True)),
                     ("s48x2n", dict(ring_bytes=48 * 1024, ctas_per_sm=2, stream_only=True))):
        pkw = {k: v for k, v in kw.items() if k != "stream_only"}
        grid = cg.plan(2, N, K, 2, sms, 227 * 1024, **pkw)[0]
        tr = [torch.zeros(grid * 4, device="cuda", dtype=torch.int64) for _ in range(J)]

        def f():
            for w, t in zip(ws, tr):
                cg.stream_gemv(x, w, pdl=True, early=True, trace=t, **kw)
        time_graph(f, reps=3)
        T = [t.view(-1, 4).cpu().tolist() for t in tr]
        m = {k: [] for k in ("period", "start_vs_prev_end_same_sm", "start_to_past_wait", "past_wait_to_end", "lag")}
        for j in range(1, J):
            a, b = T[j - 1], T[j]
            end_by_sm = {r[0]: r[3] for r in a}
            m["period"].append(max(r[3] for r in b) - max(r[3] for r in a))
            m["start_vs_prev_end_same_sm"].append(st.median(r[1] - end_by_sm[r[0]] for r in b if r[0] in end_by_sm))
            m["start_to_past_wait"].append(st.median(r[2] - r[1] for r in b))
            m["past_wait_to_end"].append(st.median(r[3] - r[2] for r in b))
            m["lag"].append(min(r[2] for r in b) - max(r[3] for r in a))
        out[name] = {k: st.median(v) / 1000 for k, v in m.items()}
        log(f"trace fc1 {name}: " + ", ".join(f"{k} {v:.2f} us" for k, v in out[name].items())
            + f" (its bytes at 3 TB/s: {N * K * 2 / 3e6:.2f} us)")
    return out


def main():
    sizes = (sys.argv[1] if len(sys.argv) > 1 else "small,medium,large").split(",")
    variants = (sys.argv[2] if len(sys.argv) > 2 else "s96,s96n,s48x2,s48x2n,s160,p24,p24n,p24b,p24nb,p48").split(",")
    parts = (sys.argv[3] if len(sys.argv) > 3 else "parity,chains,persistent,single,trace").split(",")
    out_dir = os.environ.get("OUT", ".")
    log_lines = []

    def log(s):
        print(s, flush=True)
        log_lines.append(s)

    log(f"# {torch.cuda.get_device_name()} torch {torch.__version__} cuda {torch.version.cuda}")
    log(f"# python3 bench/gemv_stream.py {','.join(sizes)} {','.join(variants)} {','.join(parts)}")
    reason = cg.unavailable_reason("cuda", torch.float16)
    if reason:
        log(f"stream_gemv unavailable: {reason}")
        return
    results = {}
    if "parity" in parts:
        results["parity_ok"], results["parity"] = parity(log)
    if "chains" in parts:
        results["chains"] = kernel_chains(sizes, [v for v in variants if v[0] == "s"], log)
    if "persistent" in parts:
        results["persistent"] = persistent_chains(sizes, [v for v in variants if v[0] == "p"], log)
    if "single" in parts:
        results["single"] = single_kernels(log)
    if "trace" in parts:
        results["trace"] = traces(log)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "gemv-stream.json").write_text(json.dumps(results, indent=1))
    (Path(out_dir) / "gemv-stream.log").write_text("\n".join(log_lines) + "\n")


def persistent_chains(sizes, variants, log):
    """Part 3: the same layers as plain GEMVs (no norms, GELU or residuals), each layer's qkv -> out projection (of
    qkv's first D) -> fc1 -> fc2, then the heads: the Triton chain (programmatic dependents, early) against
    cg.stream_chain, one persistent launch (variants: pSLOT_KB[n: no products][b: no barriers][c: cp.async, not
    bulk copies][x: x read in 2-byte loads])."""
    out = {}
    for size in sizes:
        D, L = SIZES[size]
        layers, heads, _ = build_layers(D, L)
        new = lambda n: torch.empty(2, n, device="cuda", dtype=torch.float16)  # noqa: E731
        h0 = torch.randn(2, D, device="cuda", dtype=torch.float16)
        steps, h = [], h0
        for lay in layers:
            qkv, h2, f, h3 = new(3 * D), new(D), new(4 * D), new(D)
            steps += [(h, lay["qkv"], qkv), (qkv[:, :D], lay["o"], h2), (h2, lay["fc1"], f), (f, lay["fc2"], h3)]
            h = h3
        steps.append((h, heads, new(heads.shape[0])))
        nbytes = sum(w.numel() * 2 for _, w, _ in steps)
        table = cg.chain_table(steps)

        def triton_chain():
            for x, w, y in steps:
                mf._gemv(x, w, out=y, pdl=True, early=True)
            return steps[-1][2]
        ms, ref = time_graph(triton_chain)
        ref = ref.clone()
        row = dict(triton=dict(ms=ms, tb_s=nbytes / ms / 1e9))
        log(f"persistent {size}: {nbytes / 1e9:.2f} GB; triton chain {ms:.3f} ms ({ms * 1000 / L:.1f} us/layer, "
            f"{nbytes / ms / 1e9:.2f} TB/s)")
        for v in variants:
            body = v[1:]
            nb, nc, ca, xs = "b" in body, "n" in body, "c" in body, "x" in body
            slot = int(body.replace("b", "").replace("n", "").replace("c", "").replace("x", ""))
            done = torch.zeros(1, device="cuda", dtype=torch.int32)

            def run():
                done.zero_()
                cg.stream_chain(table, 2, done, slot_kb=slot, no_compute=nc, no_barrier=nb, cp_async=ca,
                                x_scalar=xs)
                return steps[-1][2]
            try:
                ms, y = time_graph(run)
            except Exception as e:
                log(f"  {v}: failed: {type(e).__name__}: {e}")
                continue
            diff = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row[v] = dict(ms=ms, tb_s=nbytes / ms / 1e9, rel_diff_vs_triton=diff)
            log(f"  {v}: {ms:.3f} ms ({ms * 1000 / L:.1f} us/layer, {nbytes / ms / 1e9:.2f} TB/s), rel diff vs "
                f"triton {diff:.2e}")
        out[size] = row
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    main()
