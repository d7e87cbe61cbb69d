"""MusicGen's decode step for one request as ONE persistent Triton kernel (musicgen_fast.PERSISTENT_STEP; OFF).

Status (session 6, H100): correct (tokens equal to transformers' in fp32, to the separate kernels' in fp16) but
slower than the separate kernels: 1.03 against 0.71 ms per step for small, 4.1 against 2.9 for large
(bench/results/persistent-step-*.txt). A barrier alone costs 1 us (bench/grid_barrier.py); the phases themselves,
timed without their barriers, are already as slow as the whole kernel step: one program per SM cannot keep enough
of W in flight from registers (a chunk and the next, 16-64 KB per SM), where the separate kernels get several
programs per SM from the hardware. Triton 3.6 does not software-pipeline loads that feed no tl.dot; a version whose
GEMVs are tl.dot over K steps (pipelined into shared memory) is the next thing to try. Kept, with the barrier
(also used by lib/lstm.py) and the interpreter tests, as that attempt's base. (Session 7: asking L2 for the next
phases' weights by bulk prefetch, which holds no registers, made it slower still:
bench/results/persistent-step-h100-l2-prefetch.txt.)

Why: at batch 1 the fused step is ~170 (small) to ~340 (medium, large) dependent kernels of 0.5-34 MB each. Even
launched as programmatic dependents each costs ~2-3 us more than its bytes take to stream (bench/README.md, session 5),
so small and medium are latency-bound. Here one program per SM runs every phase of the step in turn:

    embedding -> per layer: qkv, self-attention, out projection, [cross scores, cross out], fc1, fc2 -> heads

with a grid-wide barrier between phases (every phase needs all of the previous one's output: a layer norm needs the
whole hidden state, a GEMV the whole input vector). Before a program waits at a barrier it has already asked for its
share of the next phase's weights (no phase writes them) or its first block of cached keys and values (no phase of
this step writes below `pos`), so HBM is busy while the barrier resolves. The arithmetic is the fused step's:
the same layer norm, GEMV, softmax, split attention and merge helpers.

Each phase splits its matrix by rows: program p owns rows [p * rpp, (p + 1) * rpp), rpp = cdiv(N, programs), and reads
them in chunks of RC rows x the whole K (one pass: the input vector is loaded once per phase), the next chunk asked
for before the current one is used.

The barrier is a counter every program increments once per phase and waits on (a monotonic target, reset by the
step's last kernel). Every program must be resident at once: the grid is one program per SM and the launch is
cooperative where Triton can make it so. A wait that lasts past `SPIN_LIMIT` polls releases every barrier of the
launch and raises the error flag: the host turns it into an error (and stops using this kernel) instead of hanging.

On the CPU (Triton's interpreter, which runs programs one after another) each phase is its own launch and the
barriers are skipped: the tests run the same phase code against transformers.
"""
from __future__ import annotations

import os

import torch

from . import musicgen_fast as mf

triton, tl = mf.triton, getattr(mf, "tl", None)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if triton is not None:
    SPIN_LIMIT = tl.constexpr(1 << 21)  # ~1-2 s of polls: far beyond any real barrier, short enough not to hang
    from .musicgen_fast import (_attend_block, _attend_more, _embed_row, _gemv_epilogue, _group_softmax,
                                _layer_norm_rows, _merge_splits, _split_span, _store_partial)

    @triton.jit
    def _grid_sync(Bar, Err, target, dead, SYNC: tl.constexpr):
        """Arrive at the barrier and wait until `target` arrivals (all programs, this phase) have been counted.
        dead: the error flag as the launch began (an earlier launch timed out): do not wait at all."""
        if SYNC:
            tl.debug_barrier()  # every thread's stores of the phase issued before the program's one release
            cnt = tl.atomic_add(Bar, 1, sem="acq_rel", scope="gpu") + 1
            spins = dead * SPIN_LIMIT
            while (cnt < target) & (spins < SPIN_LIMIT):
                cnt = tl.atomic_add(Bar, 0, sem="acquire", scope="gpu")
                spins += 1
            if (cnt < target) & (dead == 0):  # a program never arrived (not resident?): release every barrier, flag it
                tl.atomic_add(Bar, 1 << 30, sem="relaxed", scope="gpu")
                tl.atomic_xchg(Err, 1, sem="relaxed", scope="gpu")
            tl.debug_barrier()

    @triton.jit
    def _share_rows(pid, rpp, N, c, RC: tl.constexpr):
        """Chunk c (RC rows) of program pid's rows [pid * rpp, (pid + 1) * rpp) of N, and which of them exist."""
        lo = pid * rpp
        n = lo + c * RC + tl.arange(0, RC)
        return n, n < tl.minimum(lo + rpp, N)

    @triton.jit
    def _w_chunk(W, pid, rpp, N, K, c, RC: tl.constexpr, BK: tl.constexpr):
        """Chunk c of program pid's rows of W (N, K) row-major, the whole K (BK >= K); nothing past its share."""
        n, nm = _share_rows(pid, rpp, N, c, RC)
        kk = tl.arange(0, BK)
        return tl.load(W + n[:, None] * K + kk[None, :], mask=nm[:, None] & (kk[None, :] < K), other=0.0,
                       eviction_policy="evict_first")

    @triton.jit
    def _gemv_weights(W, LW, pid, rpp, N, K, RC: tl.constexpr, BK: tl.constexpr, LN: tl.constexpr,
                      SOFTMAX: tl.constexpr, GROUP: tl.constexpr):
        """What a GEMV phase reads that no phase writes, asked for before the barrier: program pid's first chunk of
        W, and the layer norm's weights (LN: LW, LW + K) or the softmax's additive mask (SOFTMAX: LW[k % GROUP])."""
        kk = tl.arange(0, BK)
        km = kk < K
        lw = tl.zeros([BK], dtype=tl.float32)
        lb = lw
        if LN:
            lw = tl.load(LW + kk, mask=km, other=0.0).to(tl.float32)
            lb = tl.load(LW + K + kk, mask=km, other=0.0).to(tl.float32)
        if SOFTMAX:
            lw = tl.load(LW + kk % GROUP)
        return _w_chunk(W, pid, rpp, N, K, 0, RC, BK), lw, lb

    @triton.jit
    def _gemv_share(w, lw, lb, X, W, Y, R, M, N, K, sx, sy, sr, eps, pid, rpp, BLOCK_M: tl.constexpr,
                    RC: tl.constexpr, BK: tl.constexpr, LN: tl.constexpr, GELU: tl.constexpr, RES: tl.constexpr,
                    SOFTMAX: tl.constexpr, GROUP: tl.constexpr):
        """Program pid's rows of Y = f(X) @ W^T (_gemv_kernel's one-pass form), with what _gemv_weights asked for.
        LN: X layer-normed with (lw, lb); SOFTMAX: X is fp32 scores, softmax-ed per group of GROUP with lw added;
        GELU / RES (+ R) in the epilogue. X and R were written by other programs: read past L1 (.cg), both asked for
        at once (one round trip); each chunk's residual and the next chunk of W are asked for a chunk ahead."""
        m = tl.arange(0, BLOCK_M)
        mmask = m < M
        kk = tl.arange(0, BK)
        km = kk < K
        xm = mmask[:, None] & km[None, :]
        x = tl.load(X + m[:, None] * sx + kk[None, :], mask=xm, other=0.0, cache_modifier=".cg")
        n, nm = _share_rows(pid, rpp, N, 0, RC)
        r = _residual(R, m, n, mmask[:, None] & nm[None, :], sr, RES)
        if LN:
            x = _layer_norm_rows(x, xm, lw, lb, K, eps)
        if SOFTMAX:
            x = _group_softmax(x, km, lw, BLOCK_M, BK, GROUP)
        xf = x.to(tl.float32)
        for c in range(tl.cdiv(rpp, RC)):
            w_next = _w_chunk(W, pid, rpp, N, K, c + 1, RC, BK)  # past the share: masked out, no traffic
            n_next, nm_next = _share_rows(pid, rpp, N, c + 1, RC)
            r_next = _residual(R, m, n_next, mmask[:, None] & nm_next[None, :], sr, RES)
            out = tl.sum(xf[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            _gemv_epilogue(out, r, Y, m, n, mmask[:, None] & nm[None, :], sy, GELU, RES)
            w, r, n, nm = w_next, r_next, n_next, nm_next

    @triton.jit
    def _residual(R, m, n, om, sr, RES: tl.constexpr):
        """R[m, n] in fp32 where om (RES), else zeros."""
        if RES:
            return tl.load(R + m[:, None] * sr + n[None, :], mask=om, other=0.0, cache_modifier=".cg").to(tl.float32)
        return tl.zeros(om.shape, dtype=tl.float32)

    @triton.jit
    def _kv_first_block(Kc, Vc, Pos, it, items, sk_r, sk_h, sk_t, NH: tl.constexpr, HD: tl.constexpr,
                        BLOCK_T: tl.constexpr, NSPLIT: tl.constexpr):
        """The first block of keys / values of self-attention work item `it` (row, head, split); none past `items`."""
        r = it // (NH * NSPLIT)
        h = (it // NSPLIT) % NH
        kb, vb, n, lo, hi = _split_span(Kc, Vc, Pos, r, h, it % NSPLIT, sk_r, sk_h, BLOCK_T, NSPLIT)
        hi = tl.where(it < items, hi, lo)
        t = lo + tl.arange(0, BLOCK_T)
        valid = t < hi
        d = tl.arange(0, HD)
        k = tl.load(kb + t[:, None] * sk_t + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(vb + t[:, None] * sk_t + d[None, :], mask=valid[:, None], other=0.0)
        return k, v

    @triton.jit
    def _self_attn_share(k, v, QKV, Kc, Vc, Part, Cnt, Att, Pos, pid, nprog, rows, sq_r, sk_r, sk_h, sk_t, scale,
                         D: tl.constexpr, NH: tl.constexpr, HD: tl.constexpr, BLOCK_T: tl.constexpr,
                         NSPLIT: tl.constexpr):
        """Program pid's self-attention work items (row, head, split) pid, pid + nprog, ...: flash-decoding as the
        fused kernel's (_self_attn_fused_kernel): the split's partial result, and the split of a (row, head) that
        finishes last merges them with the new key / value, writes the output and the new key / value at `pos`.
        The first item's first block of keys / values is already in (k, v); each item asks for the next one's."""
        items = rows * NH * NSPLIT
        d = tl.arange(0, HD)
        for it in range(pid, items, nprog):
            k_next, v_next = _kv_first_block(Kc, Vc, Pos, it + nprog, items, sk_r, sk_h, sk_t, NH, HD, BLOCK_T, NSPLIT)
            r = it // (NH * NSPLIT)
            h = (it // NSPLIT) % NH
            sp = it % NSPLIT
            kb, vb, n, lo, hi = _split_span(Kc, Vc, Pos, r, h, sp, sk_r, sk_h, BLOCK_T, NSPLIT)
            q = tl.load(QKV + r * sq_r + h * HD + d, cache_modifier=".cg").to(tl.float32) * scale
            t = lo + tl.arange(0, BLOCK_T)
            acc, m_i, l_i = _attend_block(tl.sum(k.to(tl.float32) * q[None, :], axis=1), v, t < hi,
                                          tl.zeros([HD], dtype=tl.float32), tl.full([], -1e30, tl.float32),
                                          tl.full([], 0.0, tl.float32))
            acc, m_i, l_i = _attend_more(q, kb, vb, QKV, lo + BLOCK_T, hi, sk_t, acc, m_i, l_i, HD, BLOCK_T, False)
            rh = r * NH + h
            _store_partial(Part, rh, sp, acc, m_i, l_i, HD, NSPLIT)
            tl.debug_barrier()  # every thread's partial stored before the program's one atomic releases them
            done = tl.atomic_add(Cnt + rh, 1, sem="acq_rel", scope="gpu")
            if done == NSPLIT - 1:
                kn = tl.load(QKV + r * sq_r + D + h * HD + d, cache_modifier=".cg")
                vn = tl.load(QKV + r * sq_r + 2 * D + h * HD + d, cache_modifier=".cg")
                out = _merge_splits(Part, rh, q, kn, vn, HD, NSPLIT, VOLATILE=True)
                tl.store(Att + r * D + h * HD + d, out.to(Att.dtype.element_ty))
                tl.store(kb + n * sk_t + d, kn)
                tl.store(vb + n * sk_t + d, vn)
                tl.atomic_xchg(Cnt + rh, 0, sem="relaxed", scope="gpu")
            k = k_next
            v = v_next

    @triton.jit
    def _gemv_phase(X, W, Y, R, LW, M, N, K, sx, sy, sr, eps, pid, nprog, Bar, Err, g, g_lo, dead,
                    SYNC: tl.constexpr, BLOCK_M: tl.constexpr, RC: tl.constexpr, BK: tl.constexpr, LN: tl.constexpr,
                    GELU: tl.constexpr, RES: tl.constexpr, SOFTMAX: tl.constexpr, GROUP: tl.constexpr):
        """GEMV phase g: ask for this program's weights, wait for phase g - 1 (unless g starts the launch), then
        compute this program's rows (_gemv_share)."""
        rpp = tl.cdiv(N, nprog)
        w, lw, lb = _gemv_weights(W, LW, pid, rpp, N, K, RC, BK, LN, SOFTMAX, GROUP)
        if g > g_lo:
            _grid_sync(Bar, Err, (g - g_lo) * nprog, dead, SYNC)
        _gemv_share(w, lw, lb, X, W, Y, R, M, N, K, sx, sy, sr, eps, pid, rpp, BLOCK_M, RC, BK, LN, GELU, RES,
                    SOFTMAX, GROUP)

    @triton.jit
    def _step_kernel(Cur, Pos, Hs, QKV, Att, Sc, Ff, Logits, Part, Cnt, Bar, Err,
                     Emb, Pe, Ln1, Wqkv, Wo, Ln2, FoldQ, FoldO, CBias, Ln3, Fc1, Fc2, LnF, Heads, Kc, Vc,
                     n_layers, rows, bb, V1, NV, sk_l, sk_r, sk_h, sk_t, eps, scale, g_lo, g_hi,
                     D: tl.constexpr, FFN: tl.constexpr, NH: tl.constexpr, HD: tl.constexpr, KCB: tl.constexpr,
                     S: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                     RC_QKV: tl.constexpr, RC_O: tl.constexpr, RC_SC: tl.constexpr, RC_X: tl.constexpr,
                     RC_F1: tl.constexpr, RC_F2: tl.constexpr, RC_HEAD: tl.constexpr, BLOCK_T: tl.constexpr,
                     NSPLIT: tl.constexpr, SYNC: tl.constexpr):
        """Phases g_lo .. g_hi - 1 of the decode step (module docstring). Phase 0 is the embedding; layer l's
        phases start at 1 + l * NPH (NPH = 7 with the folded cross-attention, S its text bucket; 5 without, melody);
        the heads are the last. BD, BF, BS: D, FFN and NH * S rounded up to powers of two; RC_*: rows of W per
        chunk of each phase."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        HS = NH * S
        NPH = 7 if S > 0 else 5
        dead = tl.load(Err)
        if g_lo == 0:  # embedding: row r by program r
            if pid < rows:
                _embed_row(Cur, Emb, Pe, Pos, Hs, pid, bb, V1, D, D, KCB, BD)
        for l in range(n_layers):
            g = 1 + l * NPH
            if (g + NPH > g_lo) & (g < g_hi):
                ll = tl.cast(l, tl.int64)
                if (g >= g_lo) & (g < g_hi):  # qkv = LN1(h) @ Wqkv^T
                    _gemv_phase(Hs, Wqkv + ll * 3 * D * D, QKV, QKV, Ln1 + ll * 2 * D, rows, 3 * D, D, D, 3 * D, 0,
                                eps, pid, nprog, Bar, Err, g, g_lo, dead, SYNC, BLOCK_M, RC_QKV, BD, True, False, False,
                                False, 1)
                g += 1
                if (g >= g_lo) & (g < g_hi):  # self-attention over the cache + the new key / value (written at pos)
                    kc = Kc + ll * sk_l
                    vc = Vc + ll * sk_l
                    k, v = _kv_first_block(kc, vc, Pos, pid, rows * NH * NSPLIT, sk_r, sk_h, sk_t, NH, HD, BLOCK_T,
                                           NSPLIT)
                    if g > g_lo:
                        _grid_sync(Bar, Err, (g - g_lo) * nprog, dead, SYNC)
                    _self_attn_share(k, v, QKV, kc, vc, Part, Cnt, Att, Pos, pid, nprog, rows, 3 * D, sk_r, sk_h,
                                     sk_t, scale, D, NH, HD, BLOCK_T, NSPLIT)
                g += 1
                if (g >= g_lo) & (g < g_hi):  # h += attn @ Wo^T
                    _gemv_phase(Att, Wo + ll * D * D, Hs, Hs, Hs, rows, D, D, D, D, D, eps, pid, nprog, Bar, Err, g,
                                g_lo, dead, SYNC, BLOCK_M, RC_O, BD, False, False, True, False, 1)
                g += 1
                if S > 0:  # cross-attention of row 0, folded (musicgen_fast._fold_cross_attention)
                    if (g >= g_lo) & (g < g_hi):  # scores = LN2(h[0]) @ fold_q^T (fp32)
                        _gemv_phase(Hs, FoldQ + ll * HS * D, Sc, Sc, Ln2 + ll * 2 * D, 1, HS, D, D, HS, 0, eps, pid,
                                    nprog, Bar, Err, g, g_lo, dead, SYNC, 1, RC_SC, BD, True, False, False, False, 1)
                    g += 1
                    if (g >= g_lo) & (g < g_hi):  # h[0] += softmax(scores + text mask, per head) @ fold_o^T
                        _gemv_phase(Sc, FoldO + ll * D * HS, Hs, Hs, CBias, 1, D, HS, HS, D, D, eps, pid, nprog, Bar,
                                    Err, g, g_lo, dead, SYNC, 1, RC_X, BS, False, False, True, True, S)
                    g += 1
                if (g >= g_lo) & (g < g_hi):  # f = gelu(LN3(h) @ fc1^T)
                    _gemv_phase(Hs, Fc1 + ll * FFN * D, Ff, Ff, Ln3 + ll * 2 * D, rows, FFN, D, D, FFN, 0, eps, pid,
                                nprog, Bar, Err, g, g_lo, dead, SYNC, BLOCK_M, RC_F1, BD, True, True, False, False, 1)
                g += 1
                if (g >= g_lo) & (g < g_hi):  # h += f @ fc2^T
                    _gemv_phase(Ff, Fc2 + ll * D * FFN, Hs, Hs, Hs, rows, D, FFN, FFN, D, D, eps, pid, nprog, Bar,
                                Err, g, g_lo, dead, SYNC, BLOCK_M, RC_F2, BF, False, False, True, False, 1)
        g = 1 + n_layers * NPH
        if (g >= g_lo) & (g < g_hi):  # logits = LN_f(h) @ heads^T
            _gemv_phase(Hs, Heads, Logits, Logits, LnF, rows, NV, D, D, NV, 0, eps, pid, nprog, Bar, Err, g, g_lo,
                        dead, SYNC, BLOCK_M, RC_HEAD, BD, True, False, False, False, 1)


def _rows_per_chunk(N: int, K: int, programs: int) -> int:
    """Rows of W per chunk: a program's whole share of the N rows if it fits in CHUNK_ELEMS values (K rounded up to a
    power of two), else as many rows as do (a power of two either way)."""
    p2 = triton.next_power_of_2
    return max(1, min(p2(-(-N // programs)), CHUNK_ELEMS // p2(K)))


# values of W per chunk (each program has one chunk in use and the next in flight), programs per SM, warps per
# program, and a register cap (None: Triton's) that lets that many programs share an SM
CHUNK_ELEMS = 8192
PROGRAMS_PER_SM = 1
NUM_WARPS = 8
MAXNREG = None
SPLIT = (8, 128)  # self-attention work items per (row, head) and keys per block
COOPERATIVE = True  # launch cooperatively (the driver guarantees that every program is resident, or fails)
BARRIERS = True  # False only to time the phases without their barriers (bench/step_ablation.py; wrong tokens)


class PersistentStep:
    """The launcher: one per FastMusicgen. `run(slot)` enqueues the step's layers and heads as one kernel (or, in
    the interpreter, one launch per phase) writing the slot's logits; the sampling kernels follow as before."""

    def __init__(self, fast):
        self.fast = fast
        dev = fast.device
        self.sms = 4 if INTERPRET or dev.type != "cuda" else torch.cuda.get_device_properties(dev).multi_processor_count

    @staticmethod
    def applies(fast, slot) -> bool:
        """One request (the CFG pair or one row), with the folded cross-attention or none (melody)."""
        return slot.rows <= 2 and (fast.melody or slot.fold_q is not None)

    def buffers(self, s):
        """The slot's activations (graph-stable): created on first use."""
        if getattr(s, "pstep", None) is None:
            f, dev, dt = self.fast, self.fast.device, self.fast.dtype
            ffn = f.layers[0].fc1.shape[0]
            s.pstep = dict(
                h=torch.empty(s.rows, f.D, device=dev, dtype=dt),
                qkv=torch.empty(s.rows, 3 * f.D, device=dev, dtype=dt),
                att=torch.empty(s.rows, f.D, device=dev, dtype=dt), ff=torch.empty(s.rows, ffn, device=dev, dtype=dt),
                sc=torch.empty(1, max(1, f.H * s.cond_len), device=dev, dtype=torch.float32),
                logits=torch.empty(s.rows, f.K * f.V, device=dev, dtype=dt),
                part=torch.empty(s.rows, f.H, SPLIT[0], f.hd + 2, device=dev, dtype=torch.float32),
                bar=torch.zeros(2, device=dev, dtype=torch.int32))  # (barrier count, error flag)
        return s.pstep

    def run(self, s) -> torch.Tensor:
        f = self.fast
        b = self.buffers(s)
        st = f.stacked
        fold = s.fold_q is not None
        S = s.cond_len if fold else 0
        ffn = st["fc1"].shape[1]
        nv = f.K * f.V
        nph = 7 if fold else 5
        total = 2 + f.n_layers * nph
        dummy = b["h"]
        args = (s.cur, s.kv_pos, b["h"], b["qkv"], b["att"], b["sc"], b["ff"], b["logits"], b["part"], s.cnt,
                b["bar"][0:], b["bar"][1:], f.emb, f._pe, st["ln1"], st["wqkv"], st["wo"], st.get("ln2", dummy),
                s.fold_q if fold else dummy, s.fold_o if fold else dummy, s.cbias[0] if fold else dummy, st["ln3"],
                st["fc1"], st["fc2"], f.ln_f[0], f.heads, s.k, s.v,
                f.n_layers, s.rows, s.seq.shape[0], f.V + 1, nv, s.k.stride(0), s.k.stride(1), s.k.stride(2),
                s.k.stride(3), f.eps, f.hd ** -0.5)
        p2 = triton.next_power_of_2
        P = self.sms * (1 if INTERPRET or not f.cuda else PROGRAMS_PER_SM)
        hs = max(1, f.H * S)
        meta = dict(D=f.D, FFN=ffn, NH=f.H, HD=f.hd, KCB=f.K, S=S, BD=p2(f.D), BF=p2(ffn), BS=p2(hs),
                    BLOCK_M=p2(s.rows), RC_QKV=_rows_per_chunk(3 * f.D, f.D, P), RC_O=_rows_per_chunk(f.D, f.D, P),
                    RC_SC=_rows_per_chunk(hs, f.D, P), RC_X=_rows_per_chunk(f.D, hs, P),
                    RC_F1=_rows_per_chunk(ffn, f.D, P), RC_F2=_rows_per_chunk(f.D, ffn, P),
                    RC_HEAD=_rows_per_chunk(nv, f.D, P), BLOCK_T=SPLIT[1], NSPLIT=SPLIT[0])
        grid = (P,)
        if INTERPRET or not f.cuda:  # programs run one after another: one launch per phase, no barriers
            for g in range(total):
                _step_kernel[grid](*args, g, g + 1, SYNC=False, **meta)
        else:
            extra = {"launch_cooperative_grid": True} if COOPERATIVE else {}
            if MAXNREG:
                extra["maxnreg"] = MAXNREG
            _step_kernel[grid](*args, 0, total, SYNC=BARRIERS, num_warps=NUM_WARPS, **meta, **extra)
        return b["logits"]

    @staticmethod
    def failed(s) -> bool:
        """Whether a barrier of this slot's kernel timed out since the last check (one host sync); clears it."""
        b = getattr(s, "pstep", None)
        if b is None:
            return False
        bad = bool(b["bar"][1].item())
        b["bar"].zero_()
        return bad

