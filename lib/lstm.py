"""EnCodec's decoder LSTM (two layers, 1024 wide in MusicGen's 32 kHz EnCodec) as one Triton launch per layer.

Why: cuDNN runs an LSTM over T frames as a few kernels per frame and layer, launched one after another. Decoding 30 s
(1,500 frames) is ~6,000 launches: 54 ms of wall time for 25 ms of GPU work (bench/encodec_decode.py, session 5).
Here the input's gate pre-activations for every frame are one GEMM per layer, then one persistent kernel walks the
frames: each program keeps its hidden units' four rows of W_hh in registers, and a grid barrier
(musicgen_persistent._grid_sync) separates one frame from the next. The cell state stays in registers; the hidden
state goes through a double buffer in fp32 (programs still reading frame t - 1 never see frame t's writes).

On the CPU (Triton's interpreter: programs run one after another) each frame is its own launch, without barriers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .forwards import replaced_forwards
from .musicgen_persistent import COOPERATIVE, INTERPRET, triton, tl

if triton is not None:
    from .musicgen_persistent import _grid_sync

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _gate(pre, gate, k):
        """Gate k's pre-activations (BLOCK_B, U) out of pre (BLOCK_B, 4, U)."""
        return tl.sum(tl.where(gate[None, :, None] == k, pre, 0.0), axis=1)

    # the frame range is not specialized on (Triton would compile another variant for a clip of a multiple of 16
    # frames, mid-service)
    @triton.jit(do_not_specialize=["t_lo", "t_hi"])
    def _lstm_layer_kernel(XG, Whh, Y, Hbuf, Cbuf, Bar, Err, B, t_lo, t_hi, sxg_t, sy_t, C: tl.constexpr,
                           U: tl.constexpr, BC: tl.constexpr, BLOCK_B: tl.constexpr, SYNC: tl.constexpr):
        """Frames t_lo .. t_hi - 1 of one LSTM layer for hidden units [pid * U, (pid + 1) * U). XG (T, B, 4C) fp32:
        x_t @ W_ih^T + b_ih + b_hh; Whh (4C, C), gates in PyTorch's order (i, f, g, o); Y (T, B, C) the hidden
        states; Hbuf (2, B, C) fp32 the previous hidden state (frame t reads Hbuf[t % 2]); Cbuf (B, C) fp32 the
        cell state between launches."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        units = pid * U + tl.arange(0, U)
        um = units < C
        gate = tl.arange(0, 4)
        rows = gate[:, None] * C + units[None, :]  # (4, U)
        kk = tl.arange(0, BC)
        km = kk < C
        w = tl.load(Whh + rows[:, :, None] * C + kk[None, None, :], mask=um[None, :, None] & km[None, None, :],
                    other=0.0).to(tl.float32)
        b = tl.arange(0, BLOCK_B)
        bm = b < B
        su = bm[:, None] & um[None, :]
        c = tl.load(Cbuf + b[:, None] * C + units[None, :], mask=su, other=0.0)
        g_off = b[:, None, None] * 4 * C + rows[None, :, :]  # (BLOCK_B, 4, U)
        g_mask = bm[:, None, None] & um[None, None, :]
        xg = tl.load(XG + t_lo * sxg_t + g_off, mask=g_mask, other=0.0)
        dead = tl.load(Err)
        for t in range(t_lo, t_hi):
            h = tl.load(Hbuf + (t % 2) * B * C + b[:, None] * C + kk[None, :], mask=bm[:, None] & km[None, :],
                        other=0.0, cache_modifier=".cg")
            t_next = tl.minimum(t + 1, t_hi - 1)  # the last frame asks for itself again: in bounds, unused
            xg_next = tl.load(XG + t_next * sxg_t + g_off, mask=g_mask, other=0.0)
            pre = xg + tl.sum(h[:, None, None, :] * w[None, :, :, :], axis=3)
            c = _sigmoid(_gate(pre, gate, 1)) * c + _sigmoid(_gate(pre, gate, 0)) * (
                2.0 * _sigmoid(2.0 * _gate(pre, gate, 2)) - 1.0)
            hn = _sigmoid(_gate(pre, gate, 3)) * (2.0 * _sigmoid(2.0 * c) - 1.0)
            tl.store(Hbuf + ((t + 1) % 2) * B * C + b[:, None] * C + units[None, :], hn, mask=su)
            tl.store(Y + t * sy_t + b[:, None] * C + units[None, :], hn.to(Y.dtype.element_ty), mask=su)
            _grid_sync(Bar, Err, (t - t_lo + 1) * nprog, dead, SYNC)
            xg = xg_next
        tl.store(Cbuf + b[:, None] * C + units[None, :], c, mask=su)


def applies(lstm: torch.nn.LSTM, x: torch.Tensor) -> bool:
    """The kernel covers what EnCodec's LSTM is: unidirectional, biased, sequence-first, no projection; inference."""
    return (triton is not None and (x.is_cuda or INTERPRET) and not torch.is_grad_enabled() and lstm.bias
            and not lstm.bidirectional and not lstm.batch_first and lstm.proj_size == 0
            and lstm.input_size == lstm.hidden_size)


def lstm_layers(lstm: torch.nn.LSTM, seq: torch.Tensor) -> torch.Tensor:
    """lstm(seq)[0] for seq (T, B, C) through the kernel, layer by layer."""
    T, B, C = seq.shape
    dev = seq.device
    sms = 4 if INTERPRET or not seq.is_cuda else torch.cuda.get_device_properties(dev).multi_processor_count
    U = triton.next_power_of_2(-(-C // sms))
    grid = (-(-C // U),)
    inp = seq
    for layer in range(lstm.num_layers):
        w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
        bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        xg = F.linear(inp, w_ih, bias).float().contiguous()  # (T, B, 4C): every frame's input gates at once
        out = torch.empty(T, B, C, device=dev, dtype=seq.dtype)
        hbuf = torch.zeros(2, B, C, device=dev, dtype=torch.float32)
        cbuf = torch.zeros(B, C, device=dev, dtype=torch.float32)
        bar = torch.zeros(2, device=dev, dtype=torch.int32)  # (barrier count, error flag)
        args = (xg, w_hh.contiguous(), out, hbuf, cbuf, bar[0:], bar[1:], B)
        meta = dict(C=C, U=U, BC=triton.next_power_of_2(C), BLOCK_B=triton.next_power_of_2(B))
        if INTERPRET or not seq.is_cuda:
            for t in range(T):
                _lstm_layer_kernel[grid](*args, t, t + 1, xg.stride(0), out.stride(0), SYNC=False, **meta)
        else:
            extra = {"launch_cooperative_grid": True} if COOPERATIVE else {}
            _lstm_layer_kernel[grid](*args, 0, T, xg.stride(0), out.stride(0), SYNC=True, num_warps=8, **meta,
                                     **extra)
            if int(bar[1]):  # a barrier timed out (programs not all resident): this layer's output is wrong
                return None
        inp = out
    return inp


def _encodec_lstm_forward(self, hidden_states):
    """transformers' EncodecLSTM.forward (the LSTM over (B, C, T) plus the skip) with the kernel where it applies."""
    seq = hidden_states.permute(2, 0, 1)
    out = lstm_layers(self.lstm, seq) if applies(self.lstm, seq) else None
    if out is None:
        out = self.lstm(seq)[0]
    return (out + seq).permute(1, 2, 0)


def fused_lstm(module: torch.nn.Module):
    """Within the block, every EnCodec LSTM under `module` runs lstm_layers (else the stock forward); the stock
    forward is restored on exit. Yields how many."""
    from transformers.models.encodec.modeling_encodec import EncodecLSTM

    lstms = [m for m in module.modules() if type(m) is EncodecLSTM] if triton is not None else []
    return replaced_forwards((m, _encodec_lstm_forward) for m in lstms)
