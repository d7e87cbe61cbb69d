"""Group normalization with its statistics as reductions spread over the whole GPU.

PyTorch's group-norm kernel reduces each (sample, group) row in one thread block: with one to four groups and
audio-length rows (10^6-10^7 elements) that is a handful of blocks for the whole GPU. It measured 83% of an MBD
U-Net call and most of a Dance Diffusion step on an H100 (bench/results/mbd-h100.md, bench/README.md). Same
function as nn.GroupNorm: statistics in fp32, normalized in fp32, rounded once to the input dtype."""
from __future__ import annotations

from typing import Optional

import torch


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float) -> torch.Tensor:
    """x (B, C, *) -> group-normalized x, with the per-channel affine (weight, bias) if given."""
    b, c = x.shape[:2]
    g = x.reshape(b, num_groups, -1)
    n = g.shape[-1]
    if x.dtype == torch.float32:
        var, mean = torch.var_mean(g, dim=-1, correction=0)
    else:  # fp32 accumulation without an fp32 copy of the activation
        mean = g.sum(-1, dtype=torch.float32) / n
        var = (torch.linalg.vector_norm(g, 2, dim=-1, dtype=torch.float32) ** 2 / n - mean ** 2).clamp_(min=0)
    per = c // num_groups
    shape = (b, c) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(var + eps).repeat_interleave(per, dim=1)  # (b, c)
    shift = -mean.repeat_interleave(per, dim=1) * scale
    if weight is not None:
        scale = scale * weight.float()
        shift = shift * weight.float() + bias.float()
    return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)
