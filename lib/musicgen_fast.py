"""Our own MusicGen / MusicGen-melody decoder: static KV cache, CFG as batch 2, GPU sampling, CUDA graphs.

Same contract as `musicgen_codes.reference_generate_codes` (codes (B, K, T0+new_frames), de-delayed, prompt
codes kept at the front), built from an already-loaded transformers model:

    fast = FastMusicgen(model, device="cuda", dtype=torch.float16)   # copies the decoder weights (fused)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes = fast.generate_codes(req, gen)

What is mirrored from transformers (5.17 .. 5.23), step by step:
- conditioning: T5 last hidden state -> `enc_to_dec_proj` -> * attention_mask; with CFG (scale > 1) the
  unconditional rows are zeros with a zero mask, so their cross-attention output is exactly 0.
  Melody: [proj(chroma) repeated/truncated to `chroma_length`, text] is PREPENDED to the decoder sequence
  (no cross-attention, no mask on the prefix); the unconditional chroma is one-hot on bin 0.
- delay pattern: `build_delay_pattern_mask` / `apply_delay_pattern_mask` (pad = decoder start token),
  stereo codebooks interleaved (codebooks 2c and 2c+1 share the delay c).
- logits (fp32) -> CFG `uncond + (cond - uncond) * scale` -> / temperature -> top-k -> top-p -> softmax ->
  one token per (batch, codebook) row.

Sampling noise: where transformers calls `torch.multinomial(probs, 1)`, we draw exponential noise
E ~ Exp(1) of the same shape (rows, vocab) from the request's torch.Generator and take argmax(probs / E)
(the "exponential race": P(argmax = i) = p_i exactly). On the CPU the noise is drawn one step at a time,
exactly as a patched `torch.multinomial` (see `race_multinomial`) draws it inside transformers' generate,
so the tests compare tokens given the same noise. On CUDA the same draws are made in chunks of
`noise_chunk` steps outside the graph (same distribution; deterministic for a seed; not the same token
stream as the CPU, which GPU arithmetic could not give anyway).

On CUDA one decode step (embedding sum, all layers, heads, CFG, sampling, delay masking, counters) is
captured as a CUDA graph per (batch bucket, conditioning-length bucket, sampling mode) and replayed
(with attn="sdpa", also per KV-length bucket); attention and layer norm are Triton kernels there
(flash-decoding self-attention that writes the new K/V itself and reads only the filled cache). For the CFG pair
(at most 2 rows) the whole step is fused Triton kernels, ~8 per layer (`_decode_step_fused`): a GEMV that reads
each weight once with the layer norm in its prologue and the residual add / GELU in its epilogue, one-launch
split attention, one embedding kernel and one sampling kernel (CFG, temperature, top-k, race, delay mask);
for one conditioned row (batch 1) and a short text, cross-attention is two GEMVs against per-request matrices
(`_fold_cross_attention`) instead of three kernels;
larger batches use cuBLAS for the matrices. The host enqueues steps without waiting for the GPU, except that it stays at most
`max_inflight` steps ahead so that `on_step` progress and cancellation stay current. On the CPU the same
code runs eagerly.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from .musicgen_codes import CodesRequest, decoding_steps


# ----------------------------------------------------------------------------------------------- sampling
def race_sample(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax(p / E) with E ~ Exp(1): an exact draw from the categorical distribution `probs` (rows, V)."""
    return torch.argmax(probs / noise.clamp_min(torch.finfo(noise.dtype).tiny), dim=-1)


def race_multinomial(generator: torch.Generator):
    """A stand-in for `torch.multinomial(probs, 1)` drawing the same noise, in the same order, as our CPU
    decoder: one (rows, V) exponential draw per call. Used by the parity tests inside transformers' generate."""

    def multinomial(probs, num_samples=1, replacement=False, *, generator_=None, out=None, **kw):
        assert num_samples == 1
        noise = torch.empty(probs.shape, dtype=torch.float32, device=probs.device).exponential_(generator=generator)
        return race_sample(probs, noise)[:, None]

    return multinomial


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _cond_bucket(n: int, block: int) -> int:
    """Text-length bucket (graphs are captured per bucket): powers of two from 16 up to 2 * `block` tokens (the
    folded cross-attention's per-head softmax needs a power of two, and a short prompt pads less), then multiples
    of `block`."""
    if n <= 2 * block:
        return max(16, 1 << (n - 1).bit_length())
    return _round_up(n, block)


def _batch_bucket(b: int) -> int:
    return 1 << (b - 1).bit_length()


def sinusoids(n: int, dim: int) -> torch.Tensor:
    """MusicgenSinusoidalPositionalEmbedding.get_embedding (fp32)."""
    half = dim // 2
    emb = math.log(10000) / (half - 1)
    emb = torch.exp(torch.arange(half, dtype=torch.int64).float() * -emb)
    emb = torch.arange(n, dtype=torch.int64).float().unsqueeze(1) * emb.unsqueeze(0)
    emb = torch.cat([torch.cos(emb), torch.sin(emb)], dim=1).view(n, -1)
    if dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros(n, 1)], dim=1)
    return emb



# ------------------------------------------------------------------------------------ Triton decode kernels
try:  # on the GPU image; the CPU path (tests) never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
try:  # programmatic dependent launch (Hopper+): griddepcontrol.launch_dependents / wait
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None

if triton is not None:
    @triton.jit
    def _attend_span(q, kb, vb, bias, lo, hi, sk_t, HD: tl.constexpr, BLOCK_T: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
        """Online softmax of the (fp32, scaled) query q against the keys / values at positions [lo, hi) of
        one (row, head) of a cache (kb, vb, position stride sk_t), plus bias[t] per key if HAS_BIAS: the
        unnormalized output, the running max and the running sum, in fp32. The loop every attention kernel
        here shares."""
        m_i = tl.full([], -1e30, tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([HD], dtype=tl.float32)
        return _attend_more(q, kb, vb, bias, lo, hi, sk_t, acc, m_i, l_i, HD, BLOCK_T, HAS_BIAS)

    @triton.jit
    def _attend_more(q, kb, vb, bias, lo, hi, sk_t, acc, m_i, l_i, HD: tl.constexpr, BLOCK_T: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
        """_attend_span's loop, continuing from the state (acc, m_i, l_i)."""
        d = tl.arange(0, HD)
        for start in range(lo, hi, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            valid = t < hi
            k = tl.load(kb + t[:, None] * sk_t + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            if HAS_BIAS:
                s += tl.load(bias + t, mask=valid, other=0.0)
            v = tl.load(vb + t[:, None] * sk_t + d[None, :], mask=valid[:, None], other=0.0)
            acc, m_i, l_i = _attend_block(s, v, valid, acc, m_i, l_i)
        return acc, m_i, l_i

    @triton.jit
    def _attend_block(s, v, valid, acc, m_i, l_i):
        """One block of the online softmax: scores s (BLOCK_T,) fp32 of the keys `valid`, values v (BLOCK_T, HD)."""
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        return acc, m_new, l_i

    @triton.jit
    def _stamp(Tr, i):
        """Diagnostic (StepTrace): the global timer in ns at Tr[i], stored by the program's threads."""
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [tl.full([], 0, tl.int32)], dtype=tl.int64,
                                      is_pure=False, pack=1)
        tl.store(Tr + i, t)

    @triton.jit
    def _prefetch_l2(P, nbytes):
        """Ask L2 for bytes [0, nbytes) from P (a multiple of 16, 16-byte aligned): 16 bulk prefetches, none past
        the end."""
        lane = tl.arange(0, 16)
        piece = tl.maximum((tl.cdiv(nbytes, 16) + 15) // 16 * 16, 16)
        off = tl.minimum(lane.to(tl.int64) * piece, tl.maximum(nbytes - piece, 0))
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;", "=r,l,r",
                                  [P.to(tl.pointer_type(tl.int8)) + off, tl.full([16], piece, tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _attn_dependent_start(K, V, kv_off, n_keys, sk_t, ELT: tl.constexpr, EARLY: tl.constexpr = False):
        """A programmatic-dependent attention kernel's start: ask L2 for this program's keys and values (positions
        [0, n_keys) from kv_off, written by earlier steps or the request's setup, never by the previous kernel),
        wait for the previous kernel, then let the next kernel launch (EARLY: before all that, _gemv_kernel's)."""
        if EARLY:
            gdc_launch_dependents()
        if n_keys > 0:
            _prefetch_l2(K + kv_off, n_keys * sk_t * ELT)
            _prefetch_l2(V + kv_off, n_keys * sk_t * ELT)
        gdc_wait()
        if not EARLY:
            gdc_launch_dependents()

    @triton.jit
    def _decode_attn_kernel(Q, K, V, O, Bias, Pos, KN, VN, sq_r, sq_h, sk_r, sk_h, sk_t, so_r, so_h, sb_r,
                            skn_r, skn_h, n_static, scale, HD: tl.constexpr, BLOCK_T: tl.constexpr,
                            SELF: tl.constexpr, HAS_BIAS: tl.constexpr, TRIGGER: tl.constexpr = False,
                            PDL: tl.constexpr = False, ELT: tl.constexpr = 2, EARLY: tl.constexpr = False):
        """One query per (row, head) against a KV cache, online softmax in fp32. SELF: the keys are the
        cache's positions [0, pos) plus the new key/value (KN, VN), which are also written at `pos`.
        Otherwise (cross-attention) the keys are [0, n_static) with an additive bias per row. TRIGGER: let a
        programmatic-dependent next kernel launch now (_gemv_kernel's PDL). PDL (cross-attention): launched as a
        programmatic dependent, the text's keys / values asked of L2 before the wait (_attn_dependent_start)."""
        r = tl.program_id(0)
        h = tl.program_id(1)
        if PDL:
            _attn_dependent_start(K, V, r * sk_r + h * sk_h, n_static, sk_t, ELT, EARLY)
        elif TRIGGER:
            gdc_launch_dependents()
        d = tl.arange(0, HD)
        q = tl.load(Q + r * sq_r + h * sq_h + d).to(tl.float32) * scale
        kb = K + r * sk_r + h * sk_h
        vb = V + r * sk_r + h * sk_h
        if SELF:
            pos = tl.load(Pos)
            n = pos
        else:
            n = n_static
        acc, m_i, l_i = _attend_span(q, kb, vb, Bias + r * sb_r, 0, n, sk_t, HD=HD, BLOCK_T=BLOCK_T,
                                     HAS_BIAS=HAS_BIAS)
        if SELF:
            kn = tl.load(KN + r * skn_r + h * skn_h + d)
            vn = tl.load(VN + r * skn_r + h * skn_h + d)
            s1 = tl.sum(kn.to(tl.float32) * q, axis=0)
            m_new = tl.maximum(m_i, s1)
            alpha = tl.exp(m_i - m_new)
            p1 = tl.exp(s1 - m_new)
            l_i = l_i * alpha + p1
            acc = acc * alpha + p1 * vn.to(tl.float32)
            tl.store(kb + pos * sk_t + d, kn)
            tl.store(vb + pos * sk_t + d, vn)
        tl.store(O + r * so_r + h * so_h + d, (acc / l_i).to(O.dtype.element_ty))


    @triton.jit
    def _split_partial(Q, K, V, Part, Pos, r, h, sp, nh, sq_r, sq_h, sk_r, sk_h, sk_t, scale, HD: tl.constexpr,
                       BLOCK_T: tl.constexpr, NSPLIT: tl.constexpr):
        """Flash-decoding, first half, for (row r, head h, split sp) of nh heads: attend to this split's share of
        the cache [0, pos) and write (acc, max, sum) to Part[r, h, sp]. Returns the scaled query, the (row, head)
        key and value bases, pos and the (row, head) index, for the merge."""
        d = tl.arange(0, HD)
        q = tl.load(Q + r * sq_r + h * sq_h + d).to(tl.float32) * scale
        kb, vb, n, lo, hi = _split_span(K, V, Pos, r, h, sp, sk_r, sk_h, BLOCK_T, NSPLIT)
        acc, m_i, l_i = _attend_span(q, kb, vb, Q, lo, hi, sk_t, HD=HD, BLOCK_T=BLOCK_T, HAS_BIAS=False)
        rh = r * nh + h
        _store_partial(Part, rh, sp, acc, m_i, l_i, HD, NSPLIT)
        return q, kb, vb, n, rh

    @triton.jit
    def _split_span(K, V, Pos, r, h, sp, sk_r, sk_h, BLOCK_T: tl.constexpr, NSPLIT: tl.constexpr):
        """Split sp's share [lo, hi) of the cache [0, pos) of (row r, head h), in whole blocks, and the (row, head)
        key / value bases."""
        n = tl.load(Pos)
        chunk = tl.cdiv(tl.cdiv(n, NSPLIT), BLOCK_T) * BLOCK_T
        lo = sp * chunk
        return K + r * sk_r + h * sk_h, V + r * sk_r + h * sk_h, n, lo, tl.minimum(lo + chunk, n)

    @triton.jit
    def _store_partial(Part, rh, sp, acc, m_i, l_i, HD: tl.constexpr, NSPLIT: tl.constexpr):
        base = Part + (rh * NSPLIT + sp) * (HD + 2)
        tl.store(base + tl.arange(0, HD), acc)
        tl.store(base + HD, m_i)
        tl.store(base + HD + 1, l_i)

    @triton.jit
    def _split_partial_preloaded(Q, K, V, Part, Pos, r, h, sp, nh, sq_r, sq_h, sk_r, sk_h, sk_t, scale,
                                 HD: tl.constexpr, BLOCK_T: tl.constexpr, NSPLIT: tl.constexpr, ELT: tl.constexpr,
                                 EARLY: tl.constexpr = False, Tr=None, TRACE: tl.constexpr = False):
        """_split_partial as a programmatic dependent: the split's first block of keys and values (written by
        earlier steps, never by the previous kernel) is loaded into registers before the wait, the rest of its
        span (only past NSPLIT * BLOCK_T positions) asked of L2; after the wait only the query is read before
        the scores. Same sums in the same order as _split_partial. EARLY: the next kernel may launch at once
        (_gemv_kernel's EARLY), else once past the wait. TRACE: the global timer past the wait at Tr (StepTrace)."""
        if EARLY:
            gdc_launch_dependents()
        d = tl.arange(0, HD)
        kb, vb, n, lo, hi = _split_span(K, V, Pos, r, h, sp, sk_r, sk_h, BLOCK_T, NSPLIT)
        t = lo + tl.arange(0, BLOCK_T)
        valid = t < hi
        k = tl.load(kb + t[:, None] * sk_t + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(vb + t[:, None] * sk_t + d[None, :], mask=valid[:, None], other=0.0)
        if hi - lo > BLOCK_T:
            _prefetch_l2(kb + (lo + BLOCK_T) * sk_t, (hi - lo - BLOCK_T) * sk_t * ELT)
            _prefetch_l2(vb + (lo + BLOCK_T) * sk_t, (hi - lo - BLOCK_T) * sk_t * ELT)
        gdc_wait()
        if not EARLY:
            gdc_launch_dependents()
        if TRACE:
            _stamp(Tr, 0)
        q = tl.load(Q + r * sq_r + h * sq_h + d).to(tl.float32) * scale
        acc, m_i, l_i = _attend_block(tl.sum(k.to(tl.float32) * q[None, :], axis=1), v, valid,
                                      tl.zeros([HD], dtype=tl.float32), tl.full([], -1e30, tl.float32),
                                      tl.full([], 0.0, tl.float32))
        acc, m_i, l_i = _attend_more(q, kb, vb, Q, lo + BLOCK_T, hi, sk_t, acc, m_i, l_i, HD, BLOCK_T, False)
        rh = r * nh + h
        _store_partial(Part, rh, sp, acc, m_i, l_i, HD, NSPLIT)
        return q, kb, vb, n, rh

    @triton.jit
    def _merge_splits(Part, rh, q, kn, vn, HD: tl.constexpr, NSPLIT: tl.constexpr, VOLATILE: tl.constexpr):
        """Flash-decoding, second half: the NSPLIT partial results of (row, head) rh merged with the new key /
        value (kn, vn, not yet in the cache): the attention output in fp32. VOLATILE: the partials were written
        by other programs of this launch."""
        d = tl.arange(0, HD)
        j = tl.arange(0, NSPLIT)
        pb = Part + rh * NSPLIT * (HD + 2)
        m = tl.load(pb + j * (HD + 2) + HD, volatile=VOLATILE)
        l = tl.load(pb + j * (HD + 2) + HD + 1, volatile=VOLATILE)
        a = tl.load(pb + j[:, None] * (HD + 2) + d[None, :], volatile=VOLATILE)
        s1 = tl.sum(kn.to(tl.float32) * q, axis=0)
        mx = tl.maximum(tl.max(m, axis=0), s1)
        w = tl.exp(m - mx)
        p1 = tl.exp(s1 - mx)
        den = tl.sum(l * w, axis=0) + p1
        return (tl.sum(a * w[:, None], axis=0) + p1 * vn.to(tl.float32)) / den

    @triton.jit
    def _self_attn_partial_kernel(Q, K, V, Part, Pos, sq_r, sq_h, sk_r, sk_h, sk_t, scale, HD: tl.constexpr,
                                  BLOCK_T: tl.constexpr, NSPLIT: tl.constexpr):
        """Flash-decoding, pass 1: program (row, head, split) runs _split_partial."""
        _split_partial(Q, K, V, Part, Pos, tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(1),
                       sq_r, sq_h, sk_r, sk_h, sk_t, scale, HD, BLOCK_T, NSPLIT)

    @triton.jit
    def _self_attn_combine_kernel(Part, Q, KN, VN, K, V, O, Pos, sq_r, sq_h, skn_r, skn_h, sk_r, sk_h, sk_t,
                                  so_r, so_h, scale, HD: tl.constexpr, NSPLIT: tl.constexpr):
        """Flash-decoding, pass 2: merge the splits with the new key/value, write the output, then write the
        new key/value into the cache at `pos` (after pass 1 has read the cache)."""
        r = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, HD)
        q = tl.load(Q + r * sq_r + h * sq_h + d).to(tl.float32) * scale
        kn = tl.load(KN + r * skn_r + h * skn_h + d)
        vn = tl.load(VN + r * skn_r + h * skn_h + d)
        out = _merge_splits(Part, r * tl.num_programs(1) + h, q, kn, vn, HD, NSPLIT, VOLATILE=False)
        tl.store(O + r * so_r + h * so_h + d, out.to(O.dtype.element_ty))
        pos = tl.load(Pos)
        tl.store(K + r * sk_r + h * sk_h + pos * sk_t + d, kn)
        tl.store(V + r * sk_r + h * sk_h + pos * sk_t + d, vn)

    @triton.jit
    def _layer_norm_kernel(X, W, B, Y, sx, sy, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * sy + cols, (xc * tl.rsqrt(var + eps) * w + b).to(Y.dtype.element_ty), mask=mask)


def _triton_attend(q, kc, vc, out, *, pos=None, kn=None, vn=None, bias=None, n=0, nsplit=8, trigger=False,
                   pdl=False, early=False):
    """q, kn, vn, out: (rows, H, hd) views with unit last stride; kc, vc: (rows, H, T, hd).
    Self-attention (pos given): split over the cache in `nsplit` programs per head (flash-decoding), then
    merged with the new key/value, which is written at `pos`. Cross-attention: one program per head."""
    rows, H, hd = q.shape
    self_attn = pos is not None
    if self_attn and nsplit > 1:
        part = torch.empty(rows, H, nsplit, hd + 2, device=q.device, dtype=torch.float32)
        _self_attn_partial_kernel[(rows, H, nsplit)](
            q, kc, vc, part, pos, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), hd ** -0.5,
            HD=hd, BLOCK_T=64, NSPLIT=nsplit, num_warps=4)
        _self_attn_combine_kernel[(rows, H)](
            part, q, kn, vn, kc, vc, out, pos, q.stride(0), q.stride(1), kn.stride(0), kn.stride(1),
            kc.stride(0), kc.stride(1), kc.stride(2), out.stride(0), out.stride(1), hd ** -0.5,
            HD=hd, NSPLIT=nsplit, num_warps=2)
        return out
    _decode_attn_kernel[(rows, H)](
        q, kc, vc, out, bias if bias is not None else q, pos if self_attn else q,
        kn if self_attn else q, vn if self_attn else q, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1),
        kc.stride(2), out.stride(0), out.stride(1), bias.stride(0) if bias is not None else 0,
        kn.stride(0) if self_attn else 0, kn.stride(1) if self_attn else 0, n, hd ** -0.5,
        HD=hd, BLOCK_T=64, SELF=self_attn, HAS_BIAS=bias is not None, TRIGGER=trigger, PDL=pdl and not self_attn,
        ELT=kc.element_size(), EARLY=early and pdl and not self_attn, num_warps=4,
        **({"launch_pdl": True} if pdl and not self_attn else {}))
    return out


def _triton_layer_norm(x, w, b, eps):
    y = torch.empty_like(x)
    n = x.shape[-1]
    _layer_norm_kernel[(x.shape[0],)](x, w, b, y, x.stride(0), y.stride(0), n, eps,
                                      BLOCK=triton.next_power_of_2(n), num_warps=8)
    return y


if triton is not None:
    @triton.jit
    def _gemv_kernel(X, W, Y, R, LW, LB, PF, Tr, M, N, K, sx, sy, sr, eps, pf_chunk, pf_last,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     LN: tl.constexpr, GELU: tl.constexpr, RES: tl.constexpr, PREFETCH: tl.constexpr,
                     ONE_PASS: tl.constexpr = False, PDL: tl.constexpr = False, SOFTMAX: tl.constexpr = False,
                     GROUP: tl.constexpr = 1, LATE: tl.constexpr = False, LNSTAT_D: tl.constexpr = 0,
                     LNSTAT_BD: tl.constexpr = 1, EARLY: tl.constexpr = False, TRACE: tl.constexpr = False):
        """Y[m, n] = sum_k x[m, k] W[n, k] for a few rows m (decode: the CFG pair), reading W once, row-major
        (N, K), 16-byte loads along K. LN: x = layer_norm(X) computed here (per-row stats in fp32, rounded to
        X's dtype as the separate layer norm would). GELU: exact erf GELU of the (rounded) product.
        RES: Y = R + product, added in fp32, rounded once (as addmm). PREFETCH: first, each thread asks L2 for
        one `pf_chunk`-byte piece of the next kernel's weights (PF, byte offsets up to `pf_last`), so that HBM
        stays busy through the launch gap and the next kernel's first wave reads from L2.
        ONE_PASS (BLOCK_K covers K): every load is issued up front (W tile, x, the norm's weights, the residual)
        and the layer norm's statistics come from the x already loaded: one memory round trip instead of a chain
        of four (x for the mean, x for the variance, x and W, then R). The same sums in the same order.
        PDL: launched as a programmatic dependent of the previous kernel (Hopper+): it asks for its W tile (in
        several K steps, the first step's) and the norm's weights (which no kernel of the step writes) before it
        waits for the previous kernel's results, so that its launch and its weights' latency overlap that kernel;
        once past the wait it lets the next kernel launch (one kernel waiting at a time; EARLY: at its start).
        SOFTMAX (ONE_PASS, one row): x is fp32 scores of consecutive groups of GROUP keys (one group per head); the
        program adds LW[k % GROUP] (the keys' additive mask) and takes the softmax of each group before the product:
        the output half of the folded cross-attention (_fold_cross_attention).
        LATE (with PDL): a dependent that reads nothing the previous kernel writes (it reads what the kernel before
        that wrote, complete once the previous kernel passed its own wait, which is when this one launches): it
        lets the next kernel launch at once, computes, and waits for the previous kernel only at its end, so that
        the kernel after it still follows both. It runs alongside the previous kernel instead of after it.
        LNSTAT_D (with SOFTMAX): the scores arrive without their layer norm (_fold_cross_attention's fold_r): the
        program takes the statistics of the D = LNSTAT_D values at R (the normed row, which is also the residual)
        and makes them scores * rstd + LB[k] (fold_b) before the softmax.
        EARLY (with PDL): the next kernel reads nothing before its wait but constants (a GEMV's weights): it may
        launch at once, before this one's wait, and ask for its weights while this one's are still arriving (a
        chain of such GEMVs streams weights two or more kernels ahead).
        TRACE (diagnostic, StepTrace): the program stores the global timer at Tr[3 pid] (its start), Tr[3 pid + 1]
        (past its wait) and Tr[3 pid + 2] (its end)."""
        pid = tl.program_id(0)
        if TRACE:
            _stamp(Tr, 3 * pid)
        if PDL and EARLY:
            gdc_launch_dependents()
        if PREFETCH:
            lane = pid * 128 + tl.arange(0, 128)
            off = tl.minimum(lane.to(tl.int64) * pf_chunk, pf_last)
            tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;", "=r,l,r",
                                      [PF.to(tl.pointer_type(tl.int8)) + off, tl.full([128], pf_chunk, tl.int32)],
                                      dtype=tl.int32, is_pure=False, pack=1)
        m = tl.arange(0, BLOCK_M)
        mmask = m < M
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        if ONE_PASS:
            km = kk < K
            w = tl.load(W + n[:, None] * K + kk[None, :], mask=km[None, :], other=0.0, eviction_policy="evict_first")
            if LN:
                lw = tl.load(LW + kk, mask=km, other=0.0).to(tl.float32)
                lb = tl.load(LB + kk, mask=km, other=0.0).to(tl.float32)
            if SOFTMAX:
                bias = tl.load(LW + kk % GROUP)
                if LNSTAT_D > 0:
                    sbias = tl.load(LB + kk, mask=km, other=0.0)
            if PDL:
                if not LATE:
                    gdc_wait()
                if not EARLY:
                    gdc_launch_dependents()
            if TRACE:
                _stamp(Tr, 3 * pid + 1)
            xm = mmask[:, None] & km[None, :]
            x = tl.load(X + m[:, None] * sx + kk[None, :], mask=xm, other=0.0)
            if RES:
                r = tl.load(R + m[:, None] * sr + n[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
            if LN:
                x = _layer_norm_rows(x, xm, lw, lb, K, eps)
            if SOFTMAX:
                if LNSTAT_D > 0:
                    x = x * _row_rstd(R, LNSTAT_D, LNSTAT_BD, eps) + sbias[None, :]
                x = _group_softmax(x, km, bias, BLOCK_M, BLOCK_K, GROUP)
            out = tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            _gemv_epilogue(out, r if RES else out, Y, m, n, mmask[:, None], sy, GELU, RES)
        else:  # K in several steps
            if PDL:  # the first step's W tile asked for before the wait, as in the one-pass form
                w0 = tl.load(W + n[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0,
                             eviction_policy="evict_first")
                if not LATE:
                    gdc_wait()
                if not EARLY:
                    gdc_launch_dependents()
            if TRACE:
                _stamp(Tr, 3 * pid + 1)
            if LN:
                s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    k = k0 + kk
                    xm = mmask[:, None] & (k[None, :] < K)
                    x = tl.load(X + m[:, None] * sx + k[None, :], mask=xm, other=0.0).to(tl.float32)
                    s1 += tl.sum(x, axis=1)
                mean = s1 / K
                s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    k = k0 + kk
                    xm = mmask[:, None] & (k[None, :] < K)
                    x = tl.load(X + m[:, None] * sx + k[None, :], mask=xm, other=0.0).to(tl.float32)
                    xc = tl.where(xm, x - mean[:, None], 0.0)
                    s2 += tl.sum(xc * xc, axis=1)
                rstd = tl.rsqrt(s2 / K + eps)
            else:
                mean = tl.zeros([BLOCK_M], dtype=tl.float32)
                rstd = mean
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            k_first = 0
            if PDL:
                acc = _gemv_k_step(acc, w0, X, LW, LB, m, mmask, kk, K, sx, mean, rstd, EVEN_K, LN)
                k_first = BLOCK_K
            for k0 in range(k_first, K, BLOCK_K):
                k = k0 + kk
                if EVEN_K:
                    w = tl.load(W + n[:, None] * K + k[None, :], eviction_policy="evict_first")
                else:
                    w = tl.load(W + n[:, None] * K + k[None, :], mask=k[None, :] < K, other=0.0, eviction_policy="evict_first")
                acc = _gemv_k_step(acc, w, X, LW, LB, m, mmask, k, K, sx, mean, rstd, EVEN_K, LN)
            if RES:
                r = tl.load(R + m[:, None] * sr + n[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
            _gemv_epilogue(acc, r if RES else acc, Y, m, n, mmask[:, None], sy, GELU, RES)
        if LATE:
            gdc_wait()
        if TRACE:
            _stamp(Tr, 3 * pid + 2)

    @triton.jit
    def _row_rstd(R, D: tl.constexpr, BD: tl.constexpr, eps):
        """1 / sqrt(var + eps) of the D values at R, as (1, 1): a layer norm's statistics (_row_stats)."""
        d = tl.arange(0, BD)[None, :]
        dm = d < D
        x = tl.load(R + d, mask=dm, other=0.0).to(tl.float32)
        return _row_stats(x, dm, D, eps)[1][:, None]

    @triton.jit
    def _gemv_k_step(acc, w, X, LW, LB, m, mmask, k, K, sx, mean, rstd, EVEN_K: tl.constexpr, LN: tl.constexpr):
        """One K step of _gemv_kernel's loop: acc + x[:, k] (layer-normed if LN) times the W tile w (k's columns)."""
        if EVEN_K:
            x = tl.load(X + m[:, None] * sx + k[None, :], mask=mmask[:, None], other=0.0)
        else:
            x = tl.load(X + m[:, None] * sx + k[None, :], mask=mmask[:, None] & (k[None, :] < K), other=0.0)
        if LN:
            lw = tl.load(LW + k, mask=k < K, other=0.0).to(tl.float32)
            lb = tl.load(LB + k, mask=k < K, other=0.0).to(tl.float32)
            x = ((x.to(tl.float32) - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]).to(X.dtype.element_ty)
        return acc + tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

    @triton.jit
    def _gemv_epilogue(out, r, Y, m, n, omask, sy, GELU: tl.constexpr, RES: tl.constexpr):
        """Y[m, n] = out where omask (GELU: exact erf GELU of the product rounded to Y's dtype; RES: + r in fp32),
        rounded once."""
        if GELU:
            out = out.to(Y.dtype.element_ty).to(tl.float32)
            out = 0.5 * out * (1.0 + tl.math.erf(out * 0.7071067811865476))
        if RES:
            out += r
        tl.store(Y + m[:, None] * sy + n[None, :], out.to(Y.dtype.element_ty), mask=omask)

    @triton.jit
    def _layer_norm_rows(x, xm, lw, lb, K, eps):
        """Layer norm of the rows of x (BLOCK_M, BLOCK_K; the values where xm, K of them per row) with weights lw,
        lb (fp32): statistics in fp32, rounded to x's dtype as a separate layer norm kernel would."""
        xf = x.to(tl.float32)
        mean, rstd = _row_stats(xf, xm, K, eps)
        return ((xf - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]).to(x.dtype)

    @triton.jit
    def _row_stats(xf, xm, K, eps):
        """Per row of xf (fp32; its K values where xm): the mean and 1 / sqrt(var + eps), two passes in registers."""
        mean = tl.sum(xf, axis=1) / K
        xc = tl.where(xm, xf - mean[:, None], 0.0)
        return mean, tl.rsqrt(tl.sum(xc * xc, axis=1) / K + eps)

    @triton.jit
    def _group_softmax(x, km, bias, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        """Softmax of each group of GROUP consecutive scores of x (BLOCK_M, BLOCK_K; valid where km) plus bias (the
        keys' additive mask). Padding past K gets a finite score, so that a padded group's softmax stays finite (the
        matrix it multiplies is 0 there)."""
        sc = tl.where(km[None, :], x.to(tl.float32) + bias[None, :], -1e30)
        sc = tl.reshape(sc, (BLOCK_M, BLOCK_K // GROUP, GROUP))
        e = tl.exp(sc - tl.max(sc, axis=2)[:, :, None])
        return tl.reshape(e / tl.sum(e, axis=2)[:, :, None], (BLOCK_M, BLOCK_K))

    @triton.jit
    def _self_attn_fused_kernel(Q, K, V, Part, Cnt, O, Pos, KN, VN, Tr, sq_r, sq_h, sk_r, sk_h, sk_t, skn_r,
                                skn_h, so_r, so_h, scale, HD: tl.constexpr, BLOCK_T: tl.constexpr,
                                NSPLIT: tl.constexpr, TRIGGER: tl.constexpr = False, PDL: tl.constexpr = False,
                                ELT: tl.constexpr = 2, EARLY: tl.constexpr = False, TRACE: tl.constexpr = False):
        """Flash-decoding in one launch: program (row, head, split) runs _split_partial; the last split of a
        (row, head) to finish (atomic counter) merges them with the new key/value, writes the output, writes
        the new key/value at `pos` and resets the counter. TRIGGER: as _decode_attn_kernel's. PDL: launched as a
        programmatic dependent, the split's first block of keys / values in registers before the wait
        (_split_partial_preloaded; the cache below `pos` was written by earlier steps, and `pos` advanced by the
        previous step). TRACE: as _gemv_kernel's, program (row, head, split) at 3 ((row H + head) NSPLIT + split)."""
        r = tl.program_id(0)
        h = tl.program_id(1)
        tp = Tr + 3 * ((r * tl.num_programs(1) + h) * NSPLIT + tl.program_id(2))
        if TRACE:
            _stamp(tp, 0)
        if PDL:
            q, kb, vb, n, rh = _split_partial_preloaded(Q, K, V, Part, Pos, r, h, tl.program_id(2),
                                                        tl.num_programs(1), sq_r, sq_h, sk_r, sk_h, sk_t, scale,
                                                        HD, BLOCK_T, NSPLIT, ELT, EARLY, tp + 1, TRACE)
        else:
            if TRIGGER:
                gdc_launch_dependents()
            q, kb, vb, n, rh = _split_partial(Q, K, V, Part, Pos, r, h, tl.program_id(2), tl.num_programs(1), sq_r,
                                              sq_h, sk_r, sk_h, sk_t, scale, HD, BLOCK_T, NSPLIT)
        tl.debug_barrier()  # every thread's partial stored before the program's one atomic releases them
        done = tl.atomic_add(Cnt + rh, 1, sem="acq_rel")
        if done == NSPLIT - 1:
            d = tl.arange(0, HD)
            kn = tl.load(KN + r * skn_r + h * skn_h + d)
            vn = tl.load(VN + r * skn_r + h * skn_h + d)
            out = _merge_splits(Part, rh, q, kn, vn, HD, NSPLIT, VOLATILE=True)
            tl.store(O + r * so_r + h * so_h + d, out.to(O.dtype.element_ty))
            tl.store(kb + n * sk_t + d, kn)
            tl.store(vb + n * sk_t + d, vn)
            tl.atomic_xchg(Cnt + rh, 0)
        if TRACE:
            _stamp(tp, 2)

    @triton.jit
    def _embed_kernel(Cur, Emb, Pe, Pos, Hout, bb, V1, D, sh, KCB: tl.constexpr, BLOCK: tl.constexpr,
                      TRIGGER: tl.constexpr = False):
        """Row r of the decoder input (at Hout + r * sh): sum over codebooks of the embedding of cur[r % bb, k]
        (fp32 sum, rounded), plus the position embedding at kv_pos (added in fp32, rounded)."""
        if TRIGGER:  # as _decode_attn_kernel's
            gdc_launch_dependents()
        _embed_row(Cur, Emb, Pe, Pos, Hout, tl.program_id(0), bb, V1, D, sh, KCB, BLOCK)

    @triton.jit
    def _embed_row(Cur, Emb, Pe, Pos, Hout, r, bb, V1, D, sh, KCB: tl.constexpr, BLOCK: tl.constexpr):
        """_embed_kernel's row r."""
        b = r % bb
        c = tl.arange(0, BLOCK)
        cm = c < D
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(KCB):
            tok = tl.load(Cur + b * KCB + k)
            acc += tl.load(Emb + (tok + k * V1) * D + c, mask=cm, other=0.0).to(tl.float32)
        pos = tl.load(Pos)
        pe = tl.load(Pe + pos * D + c, mask=cm, other=0.0).to(tl.float32)
        e = acc.to(Hout.dtype.element_ty).to(tl.float32)
        tl.store(Hout + r * sh + c, (e + pe).to(Hout.dtype.element_ty), mask=cm)

    @triton.jit
    def _sample_kernel(L, Noise, NoiseI, Delay, Col, Seq, Cur, Scale, Temp, TopK, bb, KCB, V, sl, sn_c, sd_b, sd_k,
                       CFG: tl.constexpr, USE_TEMP: tl.constexpr, USE_TOPK: tl.constexpr, BLOCK_V: tl.constexpr,
                       PDL: tl.constexpr = False):
        """One (batch, codebook) row: CFG mix of the fp32 logits, / temperature, top-k (k-th largest kept,
        ties too), softmax, exponential race with this step's noise row, delay mask, write seq and cur.
        PDL: launched as a programmatic dependent of the heads' GEMV: the noise row and the delay mask's value
        (written by the previous step's counters and the host's noise draw, never in this step) are read before
        the wait, the logits after it."""
        j = tl.program_id(0)
        b = j // KCB
        kc = j % KCB
        v = tl.arange(0, BLOCK_V)
        vm = v < V
        ni = tl.load(NoiseI)
        noise = tl.load(Noise + ni * sn_c + j * V + v, mask=vm, other=1.0)
        col = tl.load(Col)
        forced = tl.load(Delay + b * sd_b + kc * sd_k + col)
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        lg = tl.load(L + b * sl + kc * V + v, mask=vm, other=0.0).to(tl.float32)
        if CFG:
            un = tl.load(L + (b + bb) * sl + kc * V + v, mask=vm, other=0.0).to(tl.float32)
            lg = un + (lg - un) * tl.load(Scale)
        if USE_TEMP:
            lg = lg / tl.load(Temp)
        lg = tl.where(vm, lg, float("-inf"))
        if USE_TOPK:
            srt = tl.sort(lg, descending=True)
            kth = tl.max(tl.where(v == tl.load(TopK) - 1, srt, float("-inf")), axis=0)
            lg = tl.where(lg < kth, float("-inf"), lg)
        mx = tl.max(lg, axis=0)
        e = tl.exp(lg - mx)
        p = e / tl.sum(e, axis=0)
        noise = tl.maximum(noise, 1.1754943508222875e-38)
        ratio = tl.where(vm, p / noise, -1.0)
        tok = tl.argmax(ratio, axis=0, tie_break_left=True)
        new = tl.where(forced == -1, tok.to(tl.int64), forced)
        tl.store(Seq + b * sd_b + kc * sd_k + col, new)
        tl.store(Cur + j, new)

    @triton.jit
    def _advance_kernel(A, B, C, Z, ZERO: tl.constexpr = False, PDL: tl.constexpr = False):
        """The step's counters + 1; ZERO: the persistent step's barrier count back to 0. PDL: launched as a
        programmatic dependent of the sampling kernel (which reads the counters): it waits for it first."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        tl.store(A, tl.load(A) + 1)
        tl.store(B, tl.load(B) + 1)
        tl.store(C, tl.load(C) + 1)
        if ZERO:
            tl.store(Z, 0)


# (BLOCK_N, BLOCK_K, num_warps) for 16-bit weights at 1-2 rows (one request, with or without CFG), per (N, K) of the
# decode step's matrices (qkv, out, fc1, fc2, heads of small / medium / large; the folded cross-attention's two at 16
# and 32 text tokens, one row): the fastest in bench/gemv_sweep.py's chains of programmatic dependents, each matrix
# with its prologue / epilogue as in the step, on an H100 (results/gemv-sweep-h100-pdl.txt); fc2 of medium and large
# (whose first K step is asked for before the wait too) and the 16-token fold chosen in the step itself
# (bench/step_ablation.py). Whole-K steps where K fits: each program then has all its bytes in flight at once, which
# is what a latency-bound GEMV needs; as dependents, wider tiles (more of W asked for before the wait) won on most.
GEMV_CONFIGS: dict = {
    (3072, 1024): (8, 1024, 4), (1024, 1024): (8, 1024, 4), (4096, 1024): (16, 1024, 4), (1024, 4096): (4, 4096, 4),
    (8192, 1024): (4, 1024, 4), (512, 1024): (8, 1024, 4), (1024, 512): (8, 512, 4), (256, 1024): (8, 1024, 4),
    (1024, 256): (8, 256, 4),
    (4608, 1536): (8, 2048, 4), (1536, 1536): (8, 2048, 4), (6144, 1536): (8, 2048, 4), (1536, 6144): (2, 2048, 4),
    (8192, 1536): (8, 2048, 4), (768, 1536): (8, 2048, 4), (1536, 768): (8, 1024, 4), (384, 1536): (8, 2048, 4),
    (1536, 384): (8, 512, 4),
    (6144, 2048): (4, 2048, 4), (2048, 2048): (4, 2048, 4), (8192, 2048): (8, 2048, 4), (2048, 8192): (2, 2048, 4),
    (1024, 2048): (8, 2048, 4), (2048, 1024): (4, 1024, 4), (512, 2048): (8, 2048, 4), (2048, 512): (8, 512, 4),
}


def _gemv_config(M, N, K, elt):
    if elt == 2 and M <= 2:
        cfg = GEMV_CONFIGS.get((N, K))
        if cfg is not None:
            return cfg
        # other shapes: the same pattern (K in one or two steps of up to 2048, 4 rows of W per program when wide)
        return (4 if N >= 4096 else 2), min(triton.next_power_of_2(K), 2048), 4
    return _gemv_config_k_steps(M, N, K, elt)


def _gemv_config_k_steps(M, N, K, elt):
    """Wider rows, fp32 (and every shape until session 4): 1024-wide K steps that divide K (bench/gemv_sweep.py,
    session 1), 2 rows of W per program up to N = 2048, else 4096 elements of W per step; 4 warps."""
    bm = triton.next_power_of_2(M)
    bk = 1024 * 2 // elt
    while bk > 64 and (K % bk or bm * bk > 2048):
        bk //= 2
    bn = 2 if N <= 2048 else max(2, 4096 // bk)
    while bn > 1 and bm * bn * bk > 16384:
        bn //= 2
    return bn, bk, 4


GEMV_PDL = True  # the fused step's GEMVs as programmatic dependents where supported (_gemv_kernel's PDL; step_variants)
ATTN_PDL = True  # with GEMV_PDL, the attention kernels as programmatic dependents too (bench/step_variants.py)
# with GEMV_PDL, a GEMV followed by a GEMV lets it launch at its own start (_gemv_kernel's EARLY): the weights of
# the next kernel and the one after are asked for while this one waits
GEMV_EARLY = True
# with GEMV_EARLY, the same for these kernels ("qkv": the qkv GEMV, whose next kernel, the self-attention, asks for
# the cache below pos before its wait; "heads": the heads' GEMV, whose next kernel, the sampling, reads the counters
# and the noise; "attn": the attention kernels) in models at least ATTN_EARLY_MIN_D wide. Safe because no kernel of a
# step launches before the previous step's last one has finished: a step is a CUDA graph of its own, whose first
# kernel, the embedding, is a normal launch (eagerly too). Measured on an H100 (30 s clips, same run,
# bench/results/musicgen-h100-session9-ablation.txt): all three made large 1.2% faster (2.865 -> 2.825 ms per step),
# small 3% and medium 1.5% slower; "attn" alone gave most of large's gain and cost medium 0.6%
ATTN_EARLY = ("qkv", "attn", "heads")
ATTN_EARLY_MIN_D = 2048
GEMV_ONE_PASS = True  # _gemv_kernel's ONE_PASS where BLOCK_K covers K (bench/step_variants.py compares it off)
PREFETCH_OK = None  # whether the L2 bulk prefetch compiles and runs here (checked once, on first use)


def _prefetch_ok(device) -> bool:
    global PREFETCH_OK
    if PREFETCH_OK is None:
        try:
            x = torch.randn(2, 256, device=device, dtype=torch.float16)
            w = torch.randn(64, 256, device=device, dtype=torch.float16)
            y = _gemv(x, w, prefetch=(w, w.numel() * 2))
            torch.cuda.synchronize(device)
            PREFETCH_OK = bool(torch.allclose(y.float(), x.float() @ w.float().t(), rtol=1e-2, atol=1e-2))
        except Exception:  # pragma: no cover (an older GPU or Triton): run without
            PREFETCH_OK = False
    return PREFETCH_OK


def _gemv(x, w, *, ln=None, eps=1e-5, gelu=False, res=None, out=None, config=None, prefetch=None, pdl=False,
          softmax=None, lnstat=None, late=False, early=False):
    """x (M, K) rows with unit last stride, w (N, K) contiguous -> (M, N), see _gemv_kernel.
    prefetch: (tensor, nbytes) to pull into L2 for the next kernel (contiguous from its start).
    softmax: (bias (group,) fp32, group): x (1, K) are scores, softmax-ed per group of keys with the bias added.
    lnstat (with softmax): (K,) fp32: the scores are x * rstd(res) + lnstat (_gemv_kernel's LNSTAT_D).
    late (with pdl): reads nothing the previous kernel writes (_gemv_kernel's LATE).
    early (with pdl): the next kernel reads only constants before its wait (_gemv_kernel's EARLY; GEMV_EARLY)."""
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bn, bk, nw = config or _gemv_config(M, N, K, w.element_size())
    if softmax is not None:  # needs the one-pass form: every score in registers
        assert M == 1 and ln is None and K % softmax[1] == 0
        bk = triton.next_power_of_2(K)
        bn = min(bn, max(1, 8192 // bk))  # a W tile of at most 8192 values in registers
    lw, lb = ln if ln is not None else (w, w)
    if softmax is not None:
        lw = softmax[0]
    if lnstat is not None:
        assert softmax is not None and res is not None and res.shape[0] == 1
        lb = lnstat
    r = res if res is not None else out
    grid = triton.cdiv(N, bn)
    trace = STEP_TRACE is not None
    tr = STEP_TRACE.take(f"gemv {N}x{K}" + " ln" * (ln is not None) + " gelu" * gelu + " softmax" * (softmax is not None)
                         + " late" * late, grid) if trace else out
    pf, chunk, last = w, 16, 0
    if prefetch is not None and prefetch[1] >= 16:
        pf, nbytes = prefetch
        nbytes = min(nbytes, pf.numel() * pf.element_size()) // 16 * 16
        chunk = max(16, nbytes // (grid * 128) // 16 * 16)
        last = nbytes - chunk
    _gemv_kernel[(grid,)](
        x, w, out, r, lw, lb, pf, tr, M, N, K, x.stride(0), out.stride(0), r.stride(0), eps, chunk, last,
        BLOCK_M=triton.next_power_of_2(M), BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0, LN=ln is not None,
        GELU=gelu, RES=res is not None, PREFETCH=prefetch is not None and prefetch[1] >= 16,
        ONE_PASS=(GEMV_ONE_PASS or softmax is not None) and bk >= K, PDL=pdl, SOFTMAX=softmax is not None,
        GROUP=softmax[1] if softmax is not None else 1, LATE=late and pdl,
        LNSTAT_D=res.shape[1] if lnstat is not None else 0,
        LNSTAT_BD=triton.next_power_of_2(res.shape[1]) if lnstat is not None else 1,
        EARLY=early and pdl and GEMV_EARLY and not late, TRACE=trace, num_warps=nw,
        **({"launch_pdl": True} if pdl else {}))
    return out


def _self_attend_fused(q, kc, vc, out, pos, kn, vn, cnt, nsplit=8, trigger=False, pdl=False, block_t=64,
                       num_warps=4, early=False):
    rows, H, hd = q.shape
    part = torch.empty(rows, H, nsplit, hd + 2, device=q.device, dtype=torch.float32)
    trace = STEP_TRACE is not None and pdl  # the wait's stamp is in the preloading (PDL) form only
    tr = STEP_TRACE.take("self-attention", rows * H * nsplit) if trace else out
    _self_attn_fused_kernel[(rows, H, nsplit)](
        q, kc, vc, part, cnt, out, pos, kn, vn, tr, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1),
        kc.stride(2), kn.stride(0), kn.stride(1), out.stride(0), out.stride(1), hd ** -0.5,
        HD=hd, BLOCK_T=block_t, NSPLIT=nsplit, TRIGGER=trigger, PDL=pdl, ELT=kc.element_size(), EARLY=early and pdl,
        TRACE=trace, num_warps=num_warps,
        **({"launch_pdl": True} if pdl else {}))
    return out


class StepTrace:
    """Diagnostic (bench/trace_step.py; off unless STEP_TRACE is set before a FastMusicgen captures its graphs): the
    fused step's GEMV and self-attention programs store the global timer (ns) at their start, once past their wait
    and at their end. `launches` lists the last step's traced launches in order as (name, offset, programs); program
    i's three stamps are buf[offset + 3 i : offset + 3 i + 3]. A replayed graph writes where its capture did."""

    def __init__(self, device, capacity: int = 1 << 21):
        self.buf = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.launches: list = []
        self.used = 0

    def reset(self):
        self.launches, self.used = [], 0

    def take(self, name: str, programs: int) -> torch.Tensor:
        off, self.used = self.used, self.used + 3 * programs
        assert self.used <= self.buf.numel(), "StepTrace buffer too small"
        self.launches.append((name, off, programs))
        return self.buf[off:]


STEP_TRACE: StepTrace | None = None


def _pdl_ok(device) -> bool:
    """Programmatic dependent launch: compute capability 9.0+ and a Triton that exposes it."""
    return (triton is not None and gdc_wait is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


# ------------------------------------------------------------------------------------------------ weights
@dataclass
class _Layer:
    ln1: tuple
    wqkv: torch.Tensor  # (3D, D) fused q, k, v
    wo: torch.Tensor
    ln3: tuple
    fc1: torch.Tensor
    fc2: torch.Tensor
    ln2: tuple | None = None  # cross-attention (text-conditioned MusicGen only)
    wq_c: torch.Tensor | None = None
    wkv_c: torch.Tensor | None = None  # (2D, D): K/V of the conditioning, used once per request
    wo_c: torch.Tensor | None = None


@dataclass
class _Slot:
    """Static buffers for one (batch bucket, conditioning bucket): what the graphs read and write."""
    rows: int
    cond_len: int
    max_len: int
    k: torch.Tensor  # (L, rows, H, max_len, hd)
    v: torch.Tensor
    ck: torch.Tensor | None  # (L, rows, H, cond_len, hd)
    cv: torch.Tensor | None
    cmask: torch.Tensor | None  # (rows, 1, 1, cond_len) bool
    cbias: torch.Tensor | None  # (rows, cond_len) fp32 additive mask (0 / -1e30) for the Triton kernel
    seq: torch.Tensor  # (Bb, K, max_len) token columns (delay-masked)
    delay: torch.Tensor  # (Bb, K, max_len) -1 = sample here, else the forced value
    cur: torch.Tensor  # (Bb, K) the last written column: the next step's input
    noise: torch.Tensor  # (chunk, Bb*K, V) fp32
    kv_pos: torch.Tensor  # (1,) kv index of the current input token
    col: torch.Tensor  # (1,) sequence column being predicted
    noise_i: torch.Tensor  # (1,) row of `noise` for this step
    scale: torch.Tensor  # () fp32 CFG scale
    temp: torch.Tensor  # () fp32
    top_k: torch.Tensor  # (1,) long
    top_p_thr: torch.Tensor  # () fp32: 1 - top_p
    cnt: torch.Tensor | None = None  # (rows * H,) int32 zeros: the fused self-attention's split counters
    fold_q: torch.Tensor | None = None  # (L, H * cond_len, D), fold_o: (L, D, H * cond_len): the folded
    fold_o: torch.Tensor | None = None  # cross-attention of the one conditioned row (_fold_cross_attention)
    fold_r: torch.Tensor | None = None  # (L, H * cond_len, 2 D) and fold_b (L, H * cond_len) fp32: the scores
    fold_b: torch.Tensor | None = None  # before the layer norm's statistics (CROSS_LN_FOLD, _fold_cross_attention)
    graphs: dict = field(default_factory=dict)


def _fold_cross_attention(k, v, wq, wo, fold_q, fold_o, ln=None, wo_self=None, fold_r=None, fold_b=None):
    """Cross-attention of one row against fixed text keys / values, folded into two matrices (fused step).
    k, v (H, S, hd): the row's cached text keys / values; wq, wo (D, D): the layer's query / output projections.
    fold_q (H*S, D) = per head, k_h @ wq_h / sqrt(hd): the GEMV of the normed hidden state with it gives every
    head's scores at once; fold_o (D, H*S) = per head, wo_h @ v_h^T: the GEMV of the softmax-ed scores with it
    gives the output projection of the attention. Two GEMVs (_gemv, the second with softmax=) then replace the
    query GEMV, the attention kernel and the output GEMV, and read H*S*D weights each instead of D*D: fewer bytes
    while S < hd, as many at S = hd (the conditions are in FastMusicgen._folds).
    fold_r, fold_b (CROSS_LN_FOLD): the scores GEMV moved before the layer norm, so that it needs no kernel of its
    own. With LN(h) = (h - mean) * rstd * g + b: scores = fold_q @ LN(h) = rstd * (A_c @ h) + fold_q @ b, where
    A = fold_q * g (columns) and A_c = A minus its row means (A_c @ h = A @ (h - mean), no cancellation after the
    sum). And h = h_in + wo_self @ attn (the self-attention's out projection), so A_c @ h = [A_c @ wo_self | A_c] @
    [attn | h_in]: fold_r (H*S, 2D) = [A_c @ wo_self | A_c], a GEMV of inputs that exist before that projection
    runs; fold_b = fold_q @ b. The softmax GEMV then takes rstd from h (_gemv_kernel's LNSTAT_D)."""
    H, S, hd = k.shape
    D = wq.shape[1]
    fq = torch.matmul(k, wq.view(H, hd, D)).mul_(hd ** -0.5).view(H * S, D)
    fold_q.copy_(fq)
    fold_o.view(D, H, S).copy_(torch.matmul(v, wo.view(D, H, hd).permute(1, 2, 0)).permute(2, 0, 1))
    if fold_r is not None:  # in fp32, rounded once
        fq = fq.float()
        a = fq * ln[0].float()
        a -= a.mean(dim=1, keepdim=True)
        fold_r[:, :D].copy_(a @ wo_self.float())
        fold_r[:, D:].copy_(a)
        fold_b.copy_(fq @ ln[1].float())


# the fused step's self-attention: programs per (row, head), keys per block, warps (bench/step_ablation.py, 30 s clips
# on an H100, the first block loaded before the wait: 8 x 128 (one block per program up to 1024 positions) was 0.3-3%
# faster than 16 x 128 and 5-9% faster than 32 x 64; 8 warps were slower)
SELF_ATTN_SPLIT = (8, 128, 4)
CROSS_FOLD = True  # the fused step's cross-attention as two GEMVs (_fold_cross_attention) where it applies
# with CROSS_FOLD, the scores GEMV before the layer norm, alongside the out projection (fold_r): 6 dependent kernels
# per layer instead of 7, for models up to CROSS_LN_FOLD_MAX_D wide. Measured on an H100 (30 s clips, same run,
# bench/results/musicgen-h100-session7-ablation.txt): small (1024) 0.71 -> 0.69 ms per step; medium (1536) and large
# (2048) 2% slower (2.24 -> 2.29, 2.94 -> 2.99): their scores GEMVs (2.4 / 4.2 MB, twice fold_q's bytes) beside the
# out projection cost more than the dependent kernel they save
CROSS_LN_FOLD = True
CROSS_LN_FOLD_MAX_D = 1024
# the text encoder (T5) as a CUDA graph per text-length bucket (FastMusicgen._text_graph): eagerly, its few hundred
# small launches took 10-22 ms per request on an H100 (it moves with the host), replayed 1.9-2.1 ms
# (bench/results/musicgen-h100-session8*.json, text_states_eager_s / _graph_s)
TEXT_GRAPHS = True
# the sampling kernel and the counters launched as programmatic dependents (_sample_kernel's PDL; small 0.5% faster
# per step, medium and large within noise: bench/results/musicgen-h100-session9-ablation.txt), and the sampling
# kernel's warps
SAMPLE_PDL = True
SAMPLE_WARPS = 8
# the fused step of one request as one persistent kernel (lib/musicgen_persistent.py): off, it was slower on an H100
# (bench/README.md, session 6: 1.03 against 0.71 ms per step for small, 4.1 against 2.9 for large)
PERSISTENT_STEP = False


class FastMusicgen:
    """A fast MusicGen decoder built from a transformers MusicgenForConditionalGeneration or
    MusicgenMelodyForConditionalGeneration. The text encoder (T5) and the projections stay the model's own
    modules (run once per request); the decoder weights are copied, fused, to `device` / `dtype`."""

    def __init__(self, model, device=None, dtype=None, *, kv_block: int = 256, cond_block: int = 32,
                 noise_chunk: int = 64, max_inflight: int = 16, use_cuda_graphs: bool | None = None,
                 attn: str | None = None, fused_step: bool | None = None, prefetch_bytes: int = 0):
        self.model = model
        lm = model.decoder  # MusicgenForCausalLM / MusicgenMelodyForCausalLM
        dec = lm.model.decoder
        cfg = lm.config
        self.device = torch.device(device) if device is not None else next(lm.parameters()).device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.cuda = self.device.type == "cuda"
        self.graphs = self.cuda if use_cuda_graphs is None else (use_cuda_graphs and self.cuda)
        self.melody = hasattr(model.config, "chroma_length")
        self.K, self.channels = cfg.num_codebooks, cfg.audio_channels
        self.k_ch = self.K // self.channels
        self.V, self.D, self.H = cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads
        self.hd = self.D // self.H
        gen = model.generation_config
        self.start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else cfg.decoder_start_token_id
        self.kv_block, self.cond_block = kv_block, cond_block
        self.noise_chunk = noise_chunk if self.cuda else 1
        self.max_inflight = max_inflight
        # decode attention: "triton" (fused KV write, no mask tensors, reads only the filled cache) on CUDA
        # when Triton is there; "sdpa" (torch SDPA over a KV-length bucket) elsewhere, e.g. on the CPU
        self.attn = attn or ("triton" if self.cuda and triton is not None else "sdpa")
        self.fused = self.attn == "triton"
        # the decode step as fused Triton GEMV / attention / sampling kernels (False: cuBLAS + Triton attention)
        self.fused_step = self.fused if fused_step is None else (fused_step and self.fused)
        # fused step: each weight GEMV asks L2 for the first `prefetch_bytes` of the next one (0: off; on an
        # H100 8 MB and 24 MB made medium/large 7-11% slower, bench/README.md)
        self.prefetch_bytes = prefetch_bytes
        # the fused GEMV is tuned for the CFG pair (2 rows); at 8 and 16 rows it ran 2-7x slower than cuBLAS
        # (bench/README.md), so batched requests keep the cuBLAS step
        self.fused_max_rows = 2
        from transformers.activations import ACT2FN

        self.act = ACT2FN[cfg.activation_function]
        if cfg.activation_function != "gelu":  # the fused fc1 epilogue is the exact (erf) GELU
            self.fused_step = False
        self.eps = dec.layer_norm.eps

        def buf(*shape):
            return torch.empty(shape, device=self.device, dtype=self.dtype)

        # the decoder weights, fused: allocated here, filled from the model by reload_weights (_weight_pairs
        # is the one description of what goes where)
        D, ffn = self.D, cfg.ffn_dim
        self.emb = buf(self.K * (self.V + 1), D)  # the K embedding tables, stacked
        self.emb_offsets = (torch.arange(self.K, device=self.device) * (self.V + 1))
        # each kind of layer weight stacked over the layers (a layer's are views): the persistent step kernel
        # (lib/musicgen_persistent.py) finds layer i's at a fixed stride
        L = len(dec.layers)
        self.stacked = st = dict(ln1=buf(L, 2, D), wqkv=buf(L, 3 * D, D), wo=buf(L, D, D), ln3=buf(L, 2, D),
                                 fc1=buf(L, ffn, D), fc2=buf(L, D, ffn))
        if not self.melody:
            st.update(ln2=buf(L, 2, D), wq_c=buf(L, D, D), wkv_c=buf(L, 2 * D, D), wo_c=buf(L, D, D))
        self.layers = []
        for i in range(L):
            lay = _Layer(ln1=tuple(st["ln1"][i]), wqkv=st["wqkv"][i], wo=st["wo"][i], ln3=tuple(st["ln3"][i]),
                         fc1=st["fc1"][i], fc2=st["fc2"][i])
            if not self.melody:
                lay.ln2, lay.wq_c, lay.wkv_c, lay.wo_c = tuple(st["ln2"][i]), st["wq_c"][i], st["wkv_c"][i], st["wo_c"][i]
            self.layers.append(lay)
        self.ln_f = tuple(buf(2, D))
        self.heads = buf(self.K * self.V, D)  # (K*V, D)
        self.reload_weights()
        self.n_layers = len(self.layers)
        self._pe = torch.zeros(0, self.D)
        self._slots: dict[tuple, _Slot] = {}
        self.text_graphs = self.graphs and TEXT_GRAPHS
        self._text_graphs: dict[tuple, tuple] = {}  # (B, text bucket) -> the text encoder's graph (_text_graph)
        self._kv: dict[int, tuple] = {}
        self._pool = None
        self.on_logits = None  # optional callback(raw logits (rows, K*V)) per step, for the parity tests
        # the step of one request as one persistent kernel (lib/musicgen_persistent.py) where it applies
        self.persistent = None
        if self.fused_step and PERSISTENT_STEP:
            from .musicgen_persistent import PersistentStep

            self.persistent = PersistentStep(self)

    def _weight_pairs(self):
        """(destination, source) for every decoder weight: each destination is a view into this decoder's
        fused buffers (the K embedding tables stacked, q/k/v and cross k/v concatenated, the K lm heads
        stacked), each source a tensor of `self.model`. The one description of the layout."""
        lm = self.model.decoder
        dec = lm.model.decoder

        def rows(dest, *parts):  # parts stacked along dim 0 of dest
            off = 0
            for part in parts:
                yield dest[off:off + part.shape[0]], part
                off += part.shape[0]
            if off != dest.shape[0]:
                raise ValueError(f"the model's weights fill {off} of {dest.shape[0]} rows of a fused buffer")

        def ln(dest, norm):
            yield dest[0], norm.weight
            yield dest[1], norm.bias

        yield from rows(self.emb, *[e.weight for e in dec.embed_tokens])
        for layer, lay in zip(dec.layers, self.layers, strict=True):
            sa = layer.self_attn
            for lin in (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj, layer.fc1, layer.fc2):
                assert lin.bias is None, "MusicGen decoder linears carry no bias"
            yield from ln(lay.ln1, layer.self_attn_layer_norm)
            yield from rows(lay.wqkv, sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight)
            yield lay.wo, sa.out_proj.weight
            yield from ln(lay.ln3, layer.final_layer_norm)
            yield lay.fc1, layer.fc1.weight
            yield lay.fc2, layer.fc2.weight
            if not self.melody:
                ca = layer.encoder_attn
                yield from ln(lay.ln2, layer.encoder_attn_layer_norm)
                yield lay.wq_c, ca.q_proj.weight
                yield from rows(lay.wkv_c, ca.k_proj.weight, ca.v_proj.weight)
                yield lay.wo_c, ca.out_proj.weight
        yield from ln(self.ln_f, dec.layer_norm)
        yield from rows(self.heads, *[h.weight for h in lm.lm_heads])

    @torch.no_grad()
    def reload_weights(self):
        """Copy the current decoder weights of `self.model` (e.g. a fine-tune swapped into it) into this
        decoder's buffers, in place: CUDA graphs captured on them stay valid. Shapes cannot change."""
        for dest, src in self._weight_pairs():
            if dest.shape != src.shape:
                raise ValueError(f"weight of shape {tuple(src.shape)} for a buffer of {tuple(dest.shape)}")
            dest.copy_(src.detach())

    # ------------------------------------------------------------------------------------------ memory
    def release(self):
        """Free every cache and graph (they are rebuilt on the next request)."""
        self._slots.clear()
        self._kv.clear()
        self._text_graphs.clear()
        self._pool = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _positions(self, n: int) -> torch.Tensor:
        """Sinusoidal position table; graphs read it in place, so growing it drops them."""
        if self._pe.shape[0] < n:
            self._slots.clear()
            self._kv.clear()
            self._pe = sinusoids(max(_round_up(n, 1024), 4096), self.D).to(self.device, self.dtype)
        return self._pe

    def _slot(self, bb: int, rows: int, cond_len: int, need: int) -> _Slot:
        """Static buffers for this batch bucket and conditioning bucket. The KV cache is shared by all slots
        with the same row count and grows (dropping their graphs) when a request needs a longer window."""
        max_len = _round_up(need, self.kv_block)
        kv = self._kv.get(rows)
        if kv is None or kv[0].shape[3] < max_len:
            for key in [key for key in self._slots if key[1] == rows]:
                del self._slots[key]
            self._kv.pop(rows, None)
            kv = None
            if self.cuda:
                torch.cuda.empty_cache()
        dev, dt = self.device, self.dtype
        if kv is None:
            shape = (self.n_layers, rows, self.H, max_len, self.hd)
            kv = self._kv[rows] = (torch.zeros(shape, device=dev, dtype=dt), torch.zeros(shape, device=dev, dtype=dt))
        slot = self._slots.get((bb, rows, cond_len))
        if slot is not None:
            return slot
        max_len = kv[0].shape[3]
        cross = dict(ck=None, cv=None, cmask=None, cbias=None)
        if not self.melody:
            cshape = (self.n_layers, rows, self.H, cond_len, self.hd)
            cross = dict(ck=torch.zeros(cshape, device=dev, dtype=dt), cv=torch.zeros(cshape, device=dev, dtype=dt),
                         cmask=torch.zeros(rows, 1, 1, cond_len, dtype=torch.bool, device=dev),
                         cbias=torch.zeros(rows, cond_len, dtype=torch.float32, device=dev))
        lng = dict(dtype=torch.long, device=dev)
        f32 = dict(dtype=torch.float32, device=dev)
        slot = _Slot(rows=rows, cond_len=cond_len, max_len=max_len, k=kv[0], v=kv[1], **cross,
                     seq=torch.full((bb, self.K, max_len), self.start, **lng),
                     delay=torch.full((bb, self.K, max_len), self.start, **lng),
                     cur=torch.full((bb, self.K), self.start, **lng),
                     noise=torch.ones(self.noise_chunk, bb * self.K, self.V, **f32),
                     kv_pos=torch.zeros(1, **lng), col=torch.zeros(1, **lng), noise_i=torch.zeros(1, **lng),
                     scale=torch.ones((), **f32), temp=torch.ones((), **f32), top_k=torch.ones(1, **lng),
                     top_p_thr=torch.zeros((), **f32),
                     cnt=torch.zeros(rows * self.H, dtype=torch.int32, device=dev))
        if self._folds(bb, rows, cond_len):
            slot.fold_q = torch.empty(self.n_layers, self.H * cond_len, self.D, device=dev, dtype=dt)
            slot.fold_o = torch.empty(self.n_layers, self.D, self.H * cond_len, device=dev, dtype=dt)
            if CROSS_LN_FOLD and self.D <= CROSS_LN_FOLD_MAX_D:
                slot.fold_r = torch.empty(self.n_layers, self.H * cond_len, 2 * self.D, device=dev, dtype=dt)
                slot.fold_b = torch.empty(self.n_layers, self.H * cond_len, device=dev, dtype=torch.float32)
        self._slots[(bb, rows, cond_len)] = slot
        return slot

    def _folds(self, bb: int, rows: int, cond_len: int) -> bool:
        """Whether the fused step runs cross-attention folded (_fold_cross_attention): one conditioned row (batch
        1; with CFG the unconditioned row's cross-attention is exactly 0), text keys in groups of a power of two
        (the GEMV's softmax), and no more bytes than the query and output matrices (H * cond_len <= D)."""
        return (CROSS_FOLD and self.fused_step and not self.melody and bb == 1 and rows <= self.fused_max_rows
                and cond_len & (cond_len - 1) == 0 and 0 < self.H * cond_len <= self.D)

    # ------------------------------------------------------------------------------------------ model
    def _ln(self, x, p):
        if self.fused and x.shape[0] <= 64:
            return _triton_layer_norm(x, p[0], p[1], self.eps)
        return F.layer_norm(x, (self.D,), p[0], p[1], self.eps)

    def _blocks(self, s: _Slot, h: torch.Tensor, start: int | None, kv_len: int | None):
        """Run the layers on h (rows, n, D). Prefill: start = first kv index (a Python int), causal over
        [0, start+n). Decode (n = 1): start None, the position is s.kv_pos and attention reads kv_len keys."""
        rows, n, D = h.shape
        H, hd = self.H, self.hd
        decode = start is None
        if decode and not self.fused:
            kv_mask = (torch.arange(kv_len, device=h.device) <= s.kv_pos).view(1, 1, 1, kv_len)
        h = h.reshape(rows * n, D)
        for i, lay in enumerate(self.layers):
            y = self._ln(h, lay.ln1)
            if decode and self.fused:  # Triton: one kernel writes the new K/V and attends; no copies
                qkv = F.linear(y, lay.wqkv).view(rows, 3, H, hd)
                a = torch.empty(rows, H, hd, device=h.device, dtype=h.dtype)
                _triton_attend(qkv[:, 0], s.k[i], s.v[i], a, pos=s.kv_pos, kn=qkv[:, 1], vn=qkv[:, 2])
                h = torch.addmm(h, a.view(rows, D), lay.wo.t())
                if lay.wq_c is not None:
                    q = F.linear(self._ln(h, lay.ln2), lay.wq_c).view(rows, H, hd)
                    a = torch.empty(rows, H, hd, device=h.device, dtype=h.dtype)
                    _triton_attend(q, s.ck[i], s.cv[i], a, bias=s.cbias, n=s.cond_len)
                    h = torch.addmm(h, a.view(rows, D), lay.wo_c.t())
                y = self._ln(h, lay.ln3)
                h = torch.addmm(h, self.act(F.linear(y, lay.fc1)), lay.fc2.t())
                continue
            qkv = F.linear(y, lay.wqkv).view(rows, n, 3, H, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # (rows, H, n, hd)
            kc, vc = s.k[i], s.v[i]
            if decode:
                kc.index_copy_(2, s.kv_pos, k)
                vc.index_copy_(2, s.kv_pos, v)
                a = self._attend(q, kc[:, :, :kv_len], vc[:, :, :kv_len], kv_mask)
            else:
                kc[:, :, start:start + n] = k
                vc[:, :, start:start + n] = v
                if start == 0:
                    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                else:  # prefill after cached positions (not used today; kept correct)
                    m = torch.ones(n, start + n, dtype=torch.bool, device=h.device).tril(start)
                    a = F.scaled_dot_product_attention(q, kc[:, :, :start + n], vc[:, :, :start + n], attn_mask=m)
            a = a.transpose(1, 2).reshape(rows * n, D)
            h = torch.addmm(h, a, lay.wo.t())
            if lay.wq_c is not None:
                y = self._ln(h, lay.ln2)
                q = F.linear(y, lay.wq_c).view(rows, n, H, hd).transpose(1, 2)
                a = F.scaled_dot_product_attention(q, s.ck[i], s.cv[i], attn_mask=s.cmask)
                a = a.transpose(1, 2).reshape(rows * n, D)
                h = torch.addmm(h, a, lay.wo_c.t())
            y = self._ln(h, lay.ln3)
            h = torch.addmm(h, self.act(F.linear(y, lay.fc1)), lay.fc2.t())
        return self._ln(h, self.ln_f).view(rows, n, D)

    def _attend(self, q, k, v, mask):
        if self.attn == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # "math": two batched GEMVs and a softmax (for decode, q has one position)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.hd ** -0.5)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(v.dtype), v)

    def _embed(self, tokens: torch.Tensor, cfg: bool) -> torch.Tensor:
        """tokens (Bb, K, n) -> summed codebook embeddings (rows, n, D)."""
        e = F.embedding(tokens + self.emb_offsets.view(1, -1, 1), self.emb).sum(1)
        return torch.cat([e, e]) if cfg else e

    def _sample_write(self, s: _Slot, logits: torch.Tensor, cfg: bool, mode: tuple):
        """logits (rows, K*V) -> one token per (batch, codebook), delay-masked, written at column s.col."""
        use_temp, use_topk, use_topp = mode
        bb = s.seq.shape[0]
        if self.on_logits is not None:  # debugging / parity tests (eager only: inside a graph it runs at capture)
            self.on_logits(logits)
        lg = logits.float().view(-1, self.K, self.V)
        if cfg:
            cond, uncond = lg[:bb], lg[bb:]
            lg = uncond + (cond - uncond) * s.scale
        scores = lg.reshape(bb * self.K, self.V)
        if use_temp:
            scores = scores / s.temp
        if use_topk:
            kth = scores.sort(dim=-1, descending=True).values.gather(-1, (s.top_k - 1).expand(scores.shape[0], 1))
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if use_topp:
            sorted_logits, sorted_idx = torch.sort(scores, descending=False)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cum <= s.top_p_thr
            remove[..., -1:] = False
            remove = remove.scatter(1, sorted_idx, remove)
            scores = scores.masked_fill(remove, float("-inf"))
        probs = F.softmax(scores, dim=-1)
        tok = race_sample(probs, s.noise.index_select(0, s.noise_i)[0]).view(bb, self.K, 1)
        forced = s.delay.index_select(2, s.col)
        new = torch.where(forced == -1, tok, forced)
        s.seq.index_copy_(2, s.col, new)
        s.cur.copy_(new[..., 0])
        s.col.add_(1)
        s.noise_i.add_(1)

    def _decode_step_fused(self, s: _Slot, cfg: bool, mode: tuple):
        """One decode step on CUDA in ~8 kernels per layer: layer norms inside the GEMV kernels that follow
        them, residual adds and GELU in their epilogues, self-attention (split + merge + KV write) in one
        launch; embedding sum + position in one kernel; CFG, temperature, top-k, softmax, the race and the
        delay mask in one more (top-p and the on_logits hook take the torch path). Where the slot has them
        (FastMusicgen._folds), cross-attention is the two GEMVs of _fold_cross_attention (7 kernels per layer; 6
        dependent ones where the scores GEMV runs before the norm, CROSS_LN_FOLD).
        With PERSISTENT_STEP (off), the logits of one request come from musicgen_persistent's single kernel."""
        bb = s.seq.shape[0]
        persistent = self.persistent is not None and self.persistent.applies(self, s)
        logits = self.persistent.run(s) if persistent else self._logits_fused(s)
        use_temp, use_topk, use_topp = mode
        if use_topp or self.on_logits is not None:
            self._sample_write(s, logits, cfg, mode)
            s.kv_pos.add_(1)
            if persistent:
                s.pstep["bar"][0].zero_()
            return
        pdl = SAMPLE_PDL and GEMV_PDL and not persistent and _pdl_ok(self.device)
        _sample_kernel[(bb * self.K,)](
            logits, s.noise, s.noise_i, s.delay, s.col, s.seq, s.cur, s.scale, s.temp, s.top_k, bb, self.K,
            self.V, logits.stride(0), s.noise.stride(0), s.delay.stride(0), s.delay.stride(1),
            CFG=cfg, USE_TEMP=use_temp, USE_TOPK=use_topk, BLOCK_V=triton.next_power_of_2(self.V), PDL=pdl,
            num_warps=SAMPLE_WARPS, **({"launch_pdl": True} if pdl else {}))
        _advance_kernel[(1,)](s.col, s.noise_i, s.kv_pos, s.pstep["bar"] if persistent else s.col, ZERO=persistent,
                              PDL=pdl, num_warps=1, **({"launch_pdl": True} if pdl else {}))

    def _logits_fused(self, s: _Slot) -> torch.Tensor:
        """The step's logits (rows, K*V) as ~7-8 kernels per layer (_decode_step_fused)."""
        rows, D, H, hd, eps = s.rows, self.D, self.H, self.hd, self.eps
        bb = s.seq.shape[0]
        new = partial(torch.empty, device=self.device, dtype=self.dtype)
        # CROSS_LN_FOLD: a layer's input h and its attention output side by side in one buffer (rows, 2D), the
        # input of the scores GEMV (fold_r); h after the out projection in rows 1.. of hb, after the cross-attention
        # (row 0 only) in hb's row 0: so hb[0::2] is every row's h after both
        lnfold = s.fold_r is not None
        if STEP_TRACE is not None:
            STEP_TRACE.reset()
        cat = new(rows, 2 * D) if lnfold else None
        h = cat[:, D:] if lnfold else new(rows, D)
        pdl = GEMV_PDL and _pdl_ok(self.device)  # GEMVs launched as programmatic dependents, see _gemv_kernel
        # and the attention kernels, their keys / values asked of L2 before the wait (bulk prefetches take 16-byte
        # multiples: a cache row of hd values must be one)
        attn_pdl = pdl and ATTN_PDL and hd * torch.finfo(self.dtype).bits // 8 % 16 == 0
        _embed_kernel[(rows,)](s.cur, self.emb, self._pe, s.kv_pos, h, bb, self.V + 1, D, h.stride(0), KCB=self.K,
                               BLOCK=triton.next_power_of_2(D), TRIGGER=pdl, num_warps=4)
        early = ATTN_EARLY if GEMV_EARLY and D >= ATTN_EARLY_MIN_D else ()
        pfb = self.prefetch_bytes if self.prefetch_bytes and _prefetch_ok(self.device) else 0
        order = [w for lay in self.layers for w in (lay.wqkv, lay.wo, lay.wq_c, lay.wo_c, lay.fc1, lay.fc2)
                 if w is not None] + [self.heads]
        nxt = {id(a): b for a, b in zip(order, order[1:])}

        def pf(w):  # each GEMV pulls the start of the next one's weights into L2
            return (nxt[id(w)], pfb) if pfb and id(w) in nxt else None

        for i, lay in enumerate(self.layers):
            qkv = _gemv(h, lay.wqkv, ln=lay.ln1, eps=eps, prefetch=pf(lay.wqkv), pdl=pdl,
                        early="qkv" in early).view(rows, 3, H, hd)
            a = cat[:, :D].view(rows, H, hd) if lnfold else new(rows, H, hd)
            _self_attend_fused(qkv[:, 0], s.k[i], s.v[i], a, s.kv_pos, qkv[:, 1], qkv[:, 2], s.cnt, trigger=pdl,
                               pdl=attn_pdl, nsplit=SELF_ATTN_SPLIT[0], block_t=SELF_ATTN_SPLIT[1],
                               num_warps=SELF_ATTN_SPLIT[2], early="attn" in early)
            if lnfold:  # cross-attention of row 0 folded, its scores GEMV beside the out projection (late: it
                # waits for the projection only at its end), the softmax GEMV taking the norm's rstd from hb[1]
                hb = new(rows + 1, D)
                _gemv(cat[:, :D], lay.wo, res=h, out=hb[1:], pdl=pdl)
                sc = torch.empty(1, s.fold_r.shape[1], device=self.device, dtype=torch.float32)
                _gemv(cat[:1], s.fold_r[i], out=sc, pdl=pdl, late=True)
                _gemv(sc, s.fold_o[i], res=hb[1:2], out=hb[:1], softmax=(s.cbias[0], s.cond_len),
                      lnstat=s.fold_b[i], pdl=pdl, early=True)
                h = hb[0::2]
            else:
                # early: the next kernel is a GEMV (the scores, the query or, with no cross-attention, fc1)
                h = _gemv(a.view(rows, D), lay.wo, res=h, prefetch=pf(lay.wo), pdl=pdl, early=True)
                if s.fold_q is not None:  # cross-attention of row 0 as two GEMVs (the unconditioned row's is 0)
                    sc = torch.empty(1, s.fold_q.shape[1], device=self.device, dtype=torch.float32)
                    _gemv(h[:1], s.fold_q[i], ln=lay.ln2, eps=eps, out=sc, pdl=pdl, early=True)
                    _gemv(sc, s.fold_o[i], res=h[:1], out=h[:1], softmax=(s.cbias[0], s.cond_len), pdl=pdl,
                          early=True)
                elif lay.wq_c is not None:
                    # early: the cross-attention asks only for the request's text keys / values before its wait
                    q = _gemv(h, lay.wq_c, ln=lay.ln2, eps=eps, prefetch=pf(lay.wq_c), pdl=pdl,
                              early=True).view(rows, H, hd)
                    a = new(rows, H, hd)
                    _triton_attend(q, s.ck[i], s.cv[i], a, bias=s.cbias, n=s.cond_len, trigger=pdl, pdl=attn_pdl,
                                   early="attn" in early)
                    h = _gemv(a.view(rows, D), lay.wo_c, res=h, prefetch=pf(lay.wo_c), pdl=pdl, early=True)
            f = _gemv(h, lay.fc1, ln=lay.ln3, eps=eps, gelu=True, prefetch=pf(lay.fc1), pdl=pdl, early=True)
            if lnfold and i + 1 < len(self.layers):  # the next layer's input, beside its attention output
                cat = new(rows, 2 * D)
                h = _gemv(f, lay.fc2, res=h, out=cat[:, D:], prefetch=pf(lay.fc2), pdl=pdl, early=True)
            else:  # the next kernel: the next layer's qkv or the heads
                h = _gemv(f, lay.fc2, res=h, prefetch=pf(lay.fc2), pdl=pdl, early=True)
        return _gemv(h, self.heads, ln=self.ln_f, eps=eps, pdl=pdl, early="heads" in early)

    def _decode_step(self, s: _Slot, kv_len: int, cfg: bool, mode: tuple):
        if self.fused and self.fused_step and s.rows <= self.fused_max_rows:
            return self._decode_step_fused(s, cfg, mode)
        h = self._embed(s.cur[..., None], cfg) + self._pe.index_select(0, s.kv_pos)
        h = self._blocks(s, h, None, kv_len)
        self._sample_write(s, F.linear(h[:, -1], self.heads), cfg, mode)
        s.kv_pos.add_(1)

    def _graph(self, s: _Slot, kv_len: int, cfg: bool, mode: tuple):
        key = (kv_len, cfg, mode)
        g = s.graphs.get(key)
        if g is not None:
            return g
        state = [t.clone() for t in (s.cur, s.kv_pos, s.col, s.noise_i)]

        def warm_up():  # a step, then the state it advanced restored
            self._decode_step(s, kv_len, cfg, mode)
            for t, saved in zip((s.cur, s.kv_pos, s.col, s.noise_i), state):
                t.copy_(saved)

        g, _ = self._capture(warm_up, lambda: self._decode_step(s, kv_len, cfg, mode))
        s.graphs[key] = g
        return g

    def _capture(self, warm_up, run):
        """(a CUDA graph of run(), run()'s output inside it), in this decoder's memory pool, after warm_up() (lazy
        initialization, compilation) on a side stream."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            warm_up()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            out = run()
        return g, out

    # ------------------------------------------------------------------------------------------ conditioning
    @torch.inference_mode()
    def _text_states(self, req: CodesRequest):
        """T5 last hidden state, projected to the decoder width (model dtype and device)."""
        te = self.model.text_encoder
        dev = next(te.parameters()).device
        ids, mask = req.input_ids.to(dev), req.attention_mask.to(dev)
        hs = self._text_graph(te, ids, mask) if self.text_graphs and dev == self.device else None
        if hs is None:
            hs = te(input_ids=ids, attention_mask=mask).last_hidden_state
        proj = getattr(self.model, "enc_to_dec_proj", None)
        if proj is not None:
            hs = proj(hs)
        return hs, mask

    def _text_graph(self, te, ids, mask):
        """The text encoder's last hidden state (B, S, ...) from a CUDA graph per (B, text-length bucket), the
        tokens padded with masked zeros (which change no real position's output: every attention masks them).
        None where capture fails (then the encoder runs eagerly from then on)."""
        B, S = ids.shape
        key = (B, _cond_bucket(S, self.cond_block))
        entry = self._text_graphs.get(key)  # (graph, its output, its padded inputs)
        if entry is None:
            pad_ids = torch.zeros(key, dtype=ids.dtype, device=ids.device)
            pad_mask = torch.zeros(key, dtype=mask.dtype, device=ids.device)
        else:
            g, out, pad_ids, pad_mask = entry
        pad_ids.zero_()
        pad_mask.zero_()
        pad_ids[:, :S], pad_mask[:, :S] = ids, mask
        if entry is None:
            def encode():
                return te(input_ids=pad_ids, attention_mask=pad_mask).last_hidden_state

            try:
                g, out = self._capture(encode, encode)
            except torch.cuda.OutOfMemoryError:  # the request fails as any out-of-memory does (generate_codes)
                raise
            except Exception as e:  # pragma: no cover (GPU): an encoder that cannot be captured runs as it is
                warnings.warn(f"MusicGen: the text encoder could not be captured as a CUDA graph ({e}); running it eagerly")
                self._text_graphs.clear()
                self.text_graphs = False
                return None
            self._text_graphs[key] = (g, out, pad_ids, pad_mask)
        g.replay()
        return out[:, :S].clone()

    def _melody_prefix(self, req: CodesRequest, cfg: bool) -> torch.Tensor:
        """(rows, chroma_length + S, D): [projected chroma, text] as MusicgenMelody's generate builds it."""
        model = self.model
        hs, mask = self._text_states(req)
        B = hs.shape[0]
        if cfg:
            hs = torch.cat([hs, torch.zeros_like(hs)])
            mask = torch.cat([mask, torch.zeros_like(mask)])
        hs = hs * mask[..., None]
        chroma = req.chroma
        if chroma is not None:
            chroma = chroma.to(hs.device, model.dtype)
            null = torch.zeros_like(chroma)
        else:
            null = torch.zeros(B, 1, model.config.num_chroma, device=hs.device, dtype=model.dtype)
        null[:, :, 0] = 1
        audio = chroma if chroma is not None else null
        if cfg:
            audio = torch.cat([audio, null])
        proj = getattr(model, "audio_enc_to_dec_proj", None)
        if proj is not None:
            audio = proj(audio)
        n = model.config.chroma_length
        if audio.shape[1] < n:
            audio = audio.repeat(1, int(math.ceil(n / audio.shape[1])), 1)
        audio = audio[:, :n]
        return torch.cat([audio, hs], dim=1)

    def _cross_kv(self, s: _Slot, req: CodesRequest, cfg: bool, B: int, bb: int):
        """Cross-attention K/V of the text, once per request, into the slot's static buffers."""
        hs, mask = self._text_states(req)
        hs = (hs * mask[..., None]).to(self.device, self.dtype)
        mask = mask.to(self.device).bool()
        S = hs.shape[1]
        if bb > B:  # batch padding rows (graphs only): copies of row 0, discarded
            hs = torch.cat([hs, hs[:1].expand(bb - B, -1, -1)])
            mask = torch.cat([mask, mask[:1].expand(bb - B, -1)])
        rows = s.rows
        cond = torch.zeros(rows, s.cond_len, self.D, device=self.device, dtype=self.dtype)
        cond[:bb, :S] = hs  # unconditional rows (CFG) stay zero
        s.cmask.zero_()
        s.cmask[:bb, 0, 0, :S] = mask
        if cfg:
            s.cmask[bb:] = True  # all-zero K/V: the output is exactly 0, as transformers' fully masked row
        s.cbias.copy_(torch.where(s.cmask[:, 0, 0], 0.0, -1e30))
        for i, lay in enumerate(self.layers):
            kv = F.linear(cond, lay.wkv_c).view(rows, s.cond_len, 2, self.H, self.hd).permute(2, 0, 3, 1, 4)
            s.ck[i].copy_(kv[0])
            s.cv[i].copy_(kv[1])
            if s.fold_q is not None:
                lnf = s.fold_r is not None
                _fold_cross_attention(s.ck[i, 0], s.cv[i, 0], lay.wq_c, lay.wo_c, s.fold_q[i], s.fold_o[i],
                                      ln=lay.ln2, wo_self=lay.wo, fold_r=s.fold_r[i] if lnf else None,
                                      fold_b=s.fold_b[i] if lnf else None)

    # ------------------------------------------------------------------------------------------ generate
    def generate_codes(self, req: CodesRequest, generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes (B, K, T0 + new_frames) on `self.device`. `generator`: best a torch.Generator on this device
        (a CPU one works, drawing the noise on the CPU); None = a fresh random seed."""
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.seed()
        try:
            return self._generate(req, generator)
        except torch.cuda.OutOfMemoryError as e:
            self.release()
            # re-raised as an OOM (after freeing our caches) so the service turns it into the one user-facing
            # "try a shorter duration" error, whichever path ran out
            raise torch.cuda.OutOfMemoryError(f"GPU out of memory while generating MusicGen codes (caches freed): {e}") from e

    @torch.inference_mode()
    def _generate(self, req: CodesRequest, generator: torch.Generator) -> torch.Tensor:
        sp = req.sampling
        if sp.temperature is None or sp.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {sp.temperature}")
        B = req.input_ids.shape[0]
        bb = _batch_bucket(B) if self.graphs else B
        cfg = sp.guidance_scale is not None and sp.guidance_scale > 1
        rows = 2 * bb if cfg else bb
        steps = decoding_steps(self.k_ch, req.new_frames)
        t0 = 0 if req.prompt_codes is None else req.prompt_codes.shape[-1]
        L = 1 + t0 + steps  # token columns: start, prompt, generated
        mode = (sp.temperature != 1.0, sp.top_k is not None and sp.top_k > 0,
                sp.top_p is not None and 0 < sp.top_p < 1.0)

        prefix = self._melody_prefix(req, cfg).to(self.device, self.dtype) if self.melody else None
        P = 0 if prefix is None else prefix.shape[1]
        if prefix is not None and bb > B:
            prefix = torch.cat([prefix[:B], prefix[:1].expand(bb - B, -1, -1),
                                prefix[B:], prefix[B:B + 1].expand(bb - B, -1, -1)]) if cfg else \
                torch.cat([prefix, prefix[:1].expand(bb - B, -1, -1)])
        pe = self._positions(P + L)
        cond_len = 0 if self.melody else _cond_bucket(req.input_ids.shape[1], self.cond_block)
        s = self._slot(bb, rows, cond_len, P + L)
        if not self.melody:
            self._cross_kv(s, req, cfg, B, bb)

        # delay pattern (transformers' build_delay_pattern_mask with pad = decoder start token)
        delay = torch.full((bb, self.K, L), -1, dtype=torch.long, device=self.device)
        prompt = None
        if t0:
            prompt = req.prompt_codes.to(self.device, torch.long)
            if bb > B:
                prompt = torch.cat([prompt, prompt[:1].expand(bb - B, -1, -1)])
        for k in range(self.K):
            c = k // self.channels
            if t0:
                delay[:, k, c + 1:c + 1 + t0] = prompt[:, k]
            delay[:, k, :c + 1] = self.start
            delay[:, k, L - self.k_ch + 1 + c:] = self.start
        s.delay.fill_(self.start)
        s.delay[:, :, :L] = delay
        s.seq.fill_(self.start)
        s.seq[:, :, :t0 + 1] = delay[:, :, :t0 + 1]
        s.scale.fill_(float(sp.guidance_scale or 1.0))
        s.temp.fill_(float(sp.temperature))
        s.top_k.fill_(min(int(sp.top_k or 0), self.V) if mode[1] else 1)
        s.top_p_thr.fill_(1 - float(sp.top_p) if mode[2] else 0.0)

        def refill_noise():
            noise = s.noise[:, :B * self.K]
            if generator.device.type == noise.device.type:
                noise.exponential_(generator=generator)
            else:  # a CPU generator for a GPU decode: draw on the CPU (slower, still exact)
                noise.copy_(torch.empty(noise.shape).exponential_(generator=generator))
            s.noise_i.zero_()

        # prefill: [melody prefix] + columns 0..t0, then sample column t0+1
        refill_noise()
        h = self._embed(s.seq[:, :, :t0 + 1], cfg)
        if prefix is not None:
            h = torch.cat([prefix, h], dim=1)
        h = h + pe[:P + t0 + 1]
        h = self._blocks(s, h, 0, None)
        s.col.fill_(t0 + 1)
        self._sample_write(s, F.linear(h[:, -1], self.heads), cfg, mode)
        s.kv_pos.fill_(P + t0 + 1)
        events = []
        self._report(req, 1, steps, events)

        for step in range(1, steps):
            if step % self.noise_chunk == 0:
                refill_noise()
            kv_len = s.max_len if self.fused else min(_round_up(P + t0 + step + 1, self.kv_block), s.max_len)
            if self.graphs:
                self._graph(s, kv_len, cfg, mode).replay()
            else:
                self._decode_step(s, kv_len, cfg, mode)
            self._report(req, step + 1, steps, events)

        if self.persistent is not None and self.persistent.applies(self, s) and self.persistent.failed(s):
            # a barrier of the persistent step timed out (its programs were not all resident): its tokens are
            # wrong. Decode again with the step's separate kernels, and keep to them.
            warnings.warn("MusicGen: the persistent decode kernel could not synchronize; using the per-layer kernels")
            self.persistent = None
            self.release()
            return self._generate(req, generator)

        # de-delay: codebook k (channel-codebook c) holds frames at columns c+1 .. c+t0+new_frames
        n = t0 + req.new_frames
        idx = (torch.arange(self.K, device=self.device) // self.channels + 1)[:, None] + torch.arange(n, device=self.device)
        return s.seq[:B].gather(2, idx.expand(B, -1, -1))

    def _report(self, req: CodesRequest, done: int, total: int, events: list):
        """Progress per step with no per-step sync: `done` counts steps enqueued; on CUDA the host first waits
        for the step `max_inflight` back, so the GPU is never more than that behind what was reported (and a
        cancellation raised by on_step stops the decode within that many steps)."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record()
            events.append(ev)
            if len(events) > self.max_inflight:
                events.pop(0).synchronize()
        if req.on_step is not None:
            req.on_step(done, total)
