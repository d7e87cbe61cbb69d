"""ACE-Step 1.5's DiT blocks with their elementwise work fused, for AceStepEngine on CUDA.

diffusers' AceStepTransformerBlock launches ~105 kernels: every RMSNorm is six (upcast, square, mean, rsqrt,
multiply, weight), the AdaLN modulation, the rotary embedding and the gated residuals several each, and q, k, v and
gate, up are separate GEMMs. For 60 s of audio (750 tokens, XL) on an H100 these elementwise kernels take more GPU
time than the GEMMs (15 of 27 ms per DiT call) and their launches make the eager call host-bound (72 ms to issue;
bench/results/ace-step-dit-h100.json). `fused_blocks(transformer)` gives each block a forward of ~20 kernels:
  - q, k, v as one GEMM, cross-attention k, v as one, gate and up as one: `pack_weights` concatenates each group once
    and makes the Linear weights views of the packed buffer (no extra memory; the stock forward reads the same
    values);
  - residual (+ gate) + RMSNorm (+ AdaLN modulation) in one kernel; per-head RMSNorm + rotary embedding in one kernel
    that writes the (batch, head, token, dim) layout SDPA reads; SiLU(gate) * up in one kernel.
The kernels repeat the stock op order and round to the tensor's dtype after every op where the stock ops do, so a
block gives the stock numbers up to the fp32 summation order of the norms' mean square and of the packed GEMMs.
Attention itself is the same SDPA call on the same mask. The torch functions below (`*_reference`) are the stock
expressions: they are what runs off CUDA, what the CPU tests check the block's wiring with, and what
bench/gpu_smoke.py compares the kernels against."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lib.forwards import replaced_forwards
from lib.snake import available, triton  # noqa: F401  (available: whether the kernels run on a device)

if triton is not None:
    import triton.language as tl
    from triton.language.extra import libdevice

    from lib.snake import _round

    # Length-like arguments are not specialized (Triton would compile a variant per divisibility by 16): one
    # compilation, made by the engine's warm-up in setup, serves every duration.
    @triton.jit(do_not_specialize=["L", "mod_stride"])
    def _add_rms_mod_kernel(H, DELTA, GATE, W, SCALE, SHIFT, H_OUT, Y, L, D, mod_stride, eps,
                            HAS_DELTA: tl.constexpr, HAS_GATE: tl.constexpr, NORM: tl.constexpr, MOD: tl.constexpr,
                            ROUND: tl.constexpr, BLOCK: tl.constexpr):
        """One token (row) of contiguous (B, L, D) hidden states: h += delta (* gate), written to H_OUT; then
        y = RMSNorm(h) * w (* (1 + scale) + shift), written to Y. gate/scale/shift are (B, D) rows mod_stride apart."""
        row = tl.program_id(0)
        b = row // L
        d = tl.arange(0, BLOCK)
        m = d < D
        base = row.to(tl.int64) * D
        hd = tl.load(H + base + d, mask=m, other=0.0)
        dt = hd.dtype
        h = hd.to(tl.float32)
        if HAS_DELTA:
            x = tl.load(DELTA + base + d, mask=m, other=0.0).to(tl.float32)
            if HAS_GATE:
                x = x * tl.load(GATE + b * mod_stride + d, mask=m, other=0.0).to(tl.float32)
                if ROUND:
                    x = _round(x, dt)
            h = h + x
            if ROUND:
                h = _round(h, dt)
            tl.store(H_OUT + base + d, h.to(dt), mask=m)
        if NORM:
            r = libdevice.rsqrt(tl.sum(h * h, 0) / D + eps)
            y = h * r
            if ROUND:
                y = _round(y, dt)
            y = y * tl.load(W + d, mask=m, other=0.0).to(tl.float32)
            if ROUND:
                y = _round(y, dt)
            if MOD:
                one_plus = 1.0 + tl.load(SCALE + b * mod_stride + d, mask=m, other=0.0).to(tl.float32)
                if ROUND:
                    one_plus = _round(one_plus, dt)
                y = y * one_plus
                if ROUND:
                    y = _round(y, dt)
                y = y + tl.load(SHIFT + b * mod_stride + d, mask=m, other=0.0).to(tl.float32)
                if ROUND:
                    y = _round(y, dt)
            tl.store(Y + base + d, y.to(dt), mask=m)

    @triton.jit(do_not_specialize=["L", "stride_b"])
    def _head_rms_rope_kernel(X, W, COS, SIN, OUT, L, NH, stride_b, stride_l, eps,
                              ROPE: tl.constexpr, ROUND: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr):
        """Token l of batch b, heads [BH * pid1, +BH) of X (B, L, NH, 2 * HALF; last dim contiguous, heads
        adjacent): RMSNorm over each head's dim, times w, then (ROPE) x * cos + rotate_half(x) * sin; written to
        OUT as contiguous (B, NH, L, 2 * HALF)."""
        row = tl.program_id(0)
        b = row // L
        pos = row % L
        heads = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
        d = tl.arange(0, HALF)[None, :]
        m = (heads < NH) & (d < HALF)
        src = X + b.to(tl.int64) * stride_b + pos.to(tl.int64) * stride_l + heads * (2 * HALF)
        x1d = tl.load(src + d, mask=m, other=0.0)
        dt = x1d.dtype
        x1 = x1d.to(tl.float32)
        x2 = tl.load(src + HALF + d, mask=m, other=0.0).to(tl.float32)
        r = libdevice.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        y1 = x1 * r
        y2 = x2 * r
        if ROUND:
            y1 = _round(y1, dt)
            y2 = _round(y2, dt)
        y1 = y1 * tl.load(W + d).to(tl.float32)
        y2 = y2 * tl.load(W + HALF + d).to(tl.float32)
        if ROUND:
            y1 = _round(y1, dt)
            y2 = _round(y2, dt)
        if ROPE:
            cs = pos * (2 * HALF) + d
            c1 = tl.load(COS + cs).to(tl.float32)
            c2 = tl.load(COS + HALF + cs).to(tl.float32)
            s1 = tl.load(SIN + cs).to(tl.float32)
            s2 = tl.load(SIN + HALF + cs).to(tl.float32)
            # stock: (x.float() * cos + cat(-x2, x1).float() * sin), each product an fp32 tensor, then the sum
            o1 = libdevice.add_rn(libdevice.mul_rn(y1, c1), libdevice.mul_rn(-y2, s1))
            o2 = libdevice.add_rn(libdevice.mul_rn(y2, c2), libdevice.mul_rn(y1, s2))
            y1, y2 = o1, o2
            if ROUND:  # one rounding, as the stock .to(dtype); done here since Triton's own cast may not round so
                y1 = _round(y1, dt)
                y2 = _round(y2, dt)
        dst = OUT + ((b * NH + heads).to(tl.int64) * L + pos) * (2 * HALF)
        tl.store(dst + d, y1.to(dt), mask=m)
        tl.store(dst + HALF + d, y2.to(dt), mask=m)

    @triton.jit
    def _silu_mul_kernel(GU, Y, N, ROUND: tl.constexpr, BLOCK: tl.constexpr):
        """Row r of GU (rows, 2N) = [gate | up]: Y[r] = silu(gate) * up, rounded as F.silu then the product."""
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < N
        gd = tl.load(GU + row * 2 * N + c, mask=m, other=0.0)
        dt = gd.dtype
        g = gd.to(tl.float32)
        u = tl.load(GU + row * 2 * N + N + c, mask=m, other=0.0).to(tl.float32)
        s = libdevice.div_rn(g, 1.0 + libdevice.exp(-g))  # torch's silu: x / (1 + exp(-x)) in fp32
        if ROUND:
            s = _round(s, dt)
        y = s * u
        if ROUND:
            y = _round(y, dt)
        tl.store(Y + row * N + c, y.to(dt), mask=m)


# -- the three fused ops: Triton on CUDA, the stock expressions elsewhere ------------------------------------------

def _fused(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def _rms_norm_reference(x, weight, eps):
    """diffusers' RMSNorm.forward (with a weight) on CUDA and CPU."""
    y = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return y * weight


def add_rms_modulate_reference(h, delta, gate, weight, eps, scale, shift):
    if delta is not None:
        h = (h + delta * gate).type_as(h) if gate is not None else h + delta
    if weight is None:
        return h, None
    y = _rms_norm_reference(h, weight, eps)
    if scale is not None:
        y = (y * (1 + scale) + shift).type_as(h)
    return h, y


def add_rms_modulate(h: torch.Tensor, delta: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                     weight: Optional[torch.Tensor], eps: float, scale: Optional[torch.Tensor] = None,
                     shift: Optional[torch.Tensor] = None):
    """(h + delta * gate, or h + delta, or h) and RMSNorm(that) * weight (* (1 + scale) + shift), as the stock block
    computes them. h, delta: (B, L, D); gate, scale, shift: (B, 1, D) rows of the block's modulation."""
    if not _fused(h):
        return add_rms_modulate_reference(h, delta, gate, weight, eps, scale, shift)
    B, L, D = h.shape
    h_out = torch.empty_like(h) if delta is not None else h
    y = torch.empty_like(h) if weight is not None else None
    mods = [t for t in (gate, scale, shift) if t is not None]
    stride = mods[0].stride(0) if mods and mods[0].shape[0] > 1 else 0  # one row for every batch entry: stride 0
    assert h.is_contiguous() and (delta is None or delta.is_contiguous())
    assert all(t.stride(-1) == 1 and t.shape[-1] == D and t.shape[0] in (1, B) for t in mods)
    assert all(t.stride(0) == stride or t.shape[0] == 1 for t in mods)
    _add_rms_mod_kernel[(B * L,)](h, delta if delta is not None else h, gate if gate is not None else h,
                                  weight if weight is not None else h, scale if scale is not None else h,
                                  shift if shift is not None else h, h_out, y if y is not None else h, L, D,
                                  stride, eps, HAS_DELTA=delta is not None, HAS_GATE=gate is not None,
                                  NORM=weight is not None, MOD=scale is not None, ROUND=h.dtype != torch.float32,
                                  BLOCK=triton.next_power_of_2(D), num_warps=8)
    return h_out, y


def head_rms_rope_reference(x, weight, eps, cos=None, sin=None):
    dtype = x.dtype
    y = _rms_norm_reference(x, weight, eps)
    if cos is not None:  # diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-2, sequence_dim=1)
        y1, y2 = y.unflatten(-1, (2, -1)).unbind(-2)
        rotated = torch.cat([-y2, y1], dim=-1)
        y = (y.float() * cos[None, :, None, :] + rotated.float() * sin[None, :, None, :]).to(dtype)
    return y.transpose(1, 2)


def head_rms_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: Optional[torch.Tensor] = None,
                  sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-head RMSNorm * weight of x (B, L, heads, dim), then the rotary embedding (cos, sin: (L, dim)) if given;
    returned as (B, heads, L, dim), contiguous on CUDA (a transposed view elsewhere)."""
    B, L, NH, Dh = x.shape
    if not _fused(x) or Dh & (Dh - 1):  # the kernel takes power-of-two head dims
        return head_rms_rope_reference(x, weight, eps, cos, sin)
    assert x.stride(-1) == 1 and x.stride(-2) == Dh and Dh % 2 == 0
    out = torch.empty(B, NH, L, Dh, device=x.device, dtype=x.dtype)
    bh = 8
    rope = cos is not None
    if rope:
        assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == (L, Dh)
    _head_rms_rope_kernel[(B * L, triton.cdiv(NH, bh))](x, weight, cos if rope else x, sin if rope else x, out, L, NH,
                                                          x.stride(0), x.stride(1), eps, ROPE=rope,
                                                          ROUND=x.dtype != torch.float32, HALF=Dh // 2, BH=bh,
                                                          num_warps=4)
    return out


def silu_mul_reference(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up = [gate | up] (..., 2N)."""
    if not _fused(gate_up):
        return silu_mul_reference(gate_up)
    assert gate_up.is_contiguous()
    n = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * n)
    y = torch.empty(*gate_up.shape[:-1], n, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, y, n, ROUND=gate_up.dtype != torch.float32,
                                                    BLOCK=block, num_warps=4)
    return y


# -- packed projections ----------------------------------------------------------------------------------------

def _adjacent(weights) -> bool:
    first = weights[0]
    if not all(w.is_contiguous() and w.dtype == first.dtype and w.shape[1:] == first.shape[1:] for w in weights):
        return False
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for w in weights:
        if w.untyped_storage().data_ptr() != storage or w.storage_offset() != offset:
            return False
        offset += w.numel()
    return True


def packed_weight(linears) -> torch.Tensor:
    """One (sum of out_features, in_features) weight for Linears that read the same input, as a view over their
    weights (packing them first if they are not already adjacent in one buffer: see pack_weights)."""
    weights = [lin.weight for lin in linears]
    if not _adjacent(weights):
        _pack(linears)
        weights = [lin.weight for lin in linears]
    first = weights[0]
    rows = sum(w.shape[0] for w in weights)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())


def _pack(linears) -> None:
    with torch.inference_mode(False), torch.no_grad():
        buffer = torch.cat([lin.weight.detach() for lin in linears])
        for lin, piece in zip(linears, buffer.split([lin.out_features for lin in linears])):
            lin.weight = torch.nn.Parameter(piece, requires_grad=lin.weight.requires_grad)


def _groups(block):
    a, c, mlp = block.self_attn, getattr(block, "cross_attn", None), block.mlp
    groups = [(a.to_q, a.to_k, a.to_v), (mlp.gate_proj, mlp.up_proj)]
    if c is not None:
        groups.append((c.to_k, c.to_v))
    return groups


def pack_weights(transformer: torch.nn.Module) -> int:
    """Makes each block's q/k/v, cross-attention k/v and gate/up weights views of one buffer per group (same values,
    no extra memory once the old tensors are freed). Returns how many groups were packed now."""
    n = 0
    for block in transformer.layers:
        for group in _groups(block):
            if not _adjacent([lin.weight for lin in group]):
                _pack(group)
                n += 1
    return n


# -- the block ---------------------------------------------------------------------------------------------------

def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unflatten(-1, (n, -1))


def _sdpa(attn, q, k, v, mask):
    """q (B, H, L, dim), k and v (B, KV, S, dim) -> (B, L, H * dim): the call diffusers' native backend makes."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                         enable_gqa=attn.heads != attn.kv_heads)
    return out.transpose(1, 2).flatten(2, 3)


def _self_attention(attn, x, rotary, mask):
    qkv = F.linear(x, packed_weight((attn.to_q, attn.to_k, attn.to_v)))
    nq, nk = attn.heads * attn.head_dim, attn.kv_heads * attn.head_dim
    q, k, v = qkv.split([nq, nk, nk], dim=-1)
    cos, sin = rotary
    q = head_rms_rope(_heads(q, attn.heads), attn.norm_q.weight, attn.norm_q.eps, cos, sin)
    k = head_rms_rope(_heads(k, attn.kv_heads), attn.norm_k.weight, attn.norm_k.eps, cos, sin)
    v = _heads(v, attn.kv_heads).transpose(1, 2)
    return attn.to_out[0](_sdpa(attn, q, k, v, mask))


def _cross_attention(attn, x, context):
    q = head_rms_rope(_heads(attn.to_q(x), attn.heads), attn.norm_q.weight, attn.norm_q.eps)
    k, v = F.linear(context, packed_weight((attn.to_k, attn.to_v))).chunk(2, dim=-1)
    k = head_rms_rope(_heads(k, attn.kv_heads), attn.norm_k.weight, attn.norm_k.eps)
    v = _heads(v, attn.kv_heads).transpose(1, 2)
    return attn.to_out[0](_sdpa(attn, q, k, v, None))


def _native_attention(attn) -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.transformers.ace_step_transformer import (AceStepAttnProcessor2_0,
                                                                   _get_current_attention_backend)

    return (type(attn.processor) is AceStepAttnProcessor2_0 and not (attn.training and attn.dropout)
            and attn.to_q.bias is None and _get_current_attention_backend(attn.processor) == AttentionBackendName.NATIVE)


def _block_forward(self, hidden_states, position_embeddings, temb, attention_mask=None, encoder_hidden_states=None,
                   encoder_attention_mask=None):
    """AceStepTransformerBlock.forward, same arguments and result, fused (see the module docstring). Falls back to
    the stock forward for what it does not cover: autograd, another attention backend, a cross-attention mask."""
    cross = self.use_cross_attention and encoder_hidden_states is not None
    if (torch.is_grad_enabled() or encoder_attention_mask is not None
            or not all(_native_attention(a) for a in ((self.self_attn, self.cross_attn) if cross else (self.self_attn,)))):
        return type(self).forward(self, hidden_states, position_embeddings, temb, attention_mask,
                                  encoder_hidden_states, encoder_attention_mask)
    h = hidden_states.contiguous()
    shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + temb).chunk(6, dim=1)
    eps = self.self_attn_norm.eps

    _, x = add_rms_modulate(h, None, None, self.self_attn_norm.weight, eps, scale, shift)
    out = _self_attention(self.self_attn, x, position_embeddings, attention_mask)
    if cross:
        h, x = add_rms_modulate(h, out, gate, self.cross_attn_norm.weight, self.cross_attn_norm.eps)
        out = _cross_attention(self.cross_attn, x, encoder_hidden_states)
        h, x = add_rms_modulate(h, out, None, self.mlp_norm.weight, self.mlp_norm.eps, c_scale, c_shift)
    else:
        h, x = add_rms_modulate(h, out, gate, self.mlp_norm.weight, self.mlp_norm.eps, c_scale, c_shift)
    mlp = self.mlp
    out = mlp.down_proj(silu_mul(F.linear(x, packed_weight((mlp.gate_proj, mlp.up_proj)))))
    h, _ = add_rms_modulate(h, out, c_gate, None, eps)
    return h


def fused_blocks(transformer: torch.nn.Module):
    """Within the block, every AceStepTransformerBlock of `transformer` runs the fused forward (its weights packed
    first if they are not); the stock forward is restored on exit. Yields how many blocks."""
    pack_weights(transformer)
    return replaced_forwards((block, _block_forward) for block in transformer.layers)
