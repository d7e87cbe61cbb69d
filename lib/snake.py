"""The Snake activation of the Oobleck VAE (ACE-Step, Stable Audio Open) as one CUDA kernel.

diffusers' Snake1d computes `x + 1 / (exp(beta) + 1e-9) * sin(exp(alpha) * x) ** 2` as five full-size
elementwise kernels, each reading and writing the whole activation; in the VAE's last decoder block that is
128 channels at the audio rate (60 s of ACE-Step: 2 x 128 x 2.88 M values per pass). `fused_snake` replaces them
with one read and one write. The kernel repeats the stock op order and rounds to the tensor's dtype after every op
as the separate kernels do, so the output is the stock one (bench/diffusion.py measures the difference)."""
from __future__ import annotations

import torch

from lib.forwards import replaced_forwards

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: the stock Snake1d runs
    triton = None

if triton is not None:
    @triton.jit
    def _round(v, dt: tl.constexpr):
        """v (fp32) rounded to the nearest value of dtype dt (ties to even), kept in fp32. For bf16 by bit
        arithmetic, so that no compiler simplification of a down-and-up cast can skip it."""
        if dt == tl.bfloat16:
            b = v.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            return b.to(tl.float32, bitcast=True)
        else:
            return v.to(dt).to(tl.float32)

    @triton.jit(do_not_specialize=["T"])  # one compilation for every length
    def _snake_kernel(X, Y, A, IB, C, T, ROUND: tl.constexpr, BLOCK: tl.constexpr):
        """Row (b, c) of a contiguous (B, C, T) tensor, BLOCK samples: y = x + ib[c] * sin(a[c] * x)^2, each op
        rounded to X's dtype when ROUND (the stock kernels' rounding), else in fp32."""
        row = tl.program_id(0)
        t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = t < T
        base = row.to(tl.int64) * T
        xd = tl.load(X + base + t, mask=m, other=0.0)
        dt = xd.dtype
        x = xd.to(tl.float32)
        a = tl.load(A + row % C).to(tl.float32)
        ib = tl.load(IB + row % C).to(tl.float32)
        ax = a * x
        if ROUND:
            ax = _round(ax, dt)
        s = libdevice.sin(ax)  # __nv_sinf, the sinf torch's kernel calls (tl.sin may be an approximation)
        if ROUND:
            s = _round(s, dt)
        p = s * s
        if ROUND:
            p = _round(p, dt)
        q = ib * p
        if ROUND:
            q = _round(q, dt)
        y = x + q
        if ROUND:
            y = _round(y, dt)
        tl.store(Y + base + t, y.to(Y.dtype.element_ty), mask=m)


def _snake_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    x = hidden_states
    if not (x.is_cuda and x.dim() == 3 and x.is_contiguous() and x.dtype == self.alpha.dtype) or torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    # the per-channel factors exactly as the stock forward makes them (same ops, same dtype)
    a = torch.exp(self.alpha) if self.logscale else self.alpha
    b = torch.exp(self.beta) if self.logscale else self.beta
    ib = (b + 1e-9).reciprocal()
    y = torch.empty_like(x)
    B, C, T = x.shape
    block = 2048
    _snake_kernel[(B * C, triton.cdiv(T, block))](x, y, a.reshape(-1).contiguous(), ib.reshape(-1).contiguous(), C, T,
                                                 ROUND=x.dtype != torch.float32, BLOCK=block, num_warps=8)
    return y


def available(device: torch.device) -> bool:
    return triton is not None and torch.device(device).type == "cuda"


def fused_snake(module: torch.nn.Module):
    """Within the block, every diffusers Snake1d under `module` runs the fused kernel on contiguous CUDA tensors
    (others, and autograd, take the stock forward); the stock forward is restored on exit. Yields how many."""
    from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

    snakes = [m for m in module.modules() if type(m) is Snake1d] if triton is not None else []
    return replaced_forwards((m, _snake_forward) for m in snakes)
