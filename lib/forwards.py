"""Instance forward overrides, undone on exit: how the CUDA rewrites (lib.snake's fused Snake, lib.ace_step_dit's
fused blocks, Dance Diffusion's UNet1D rewrites in lib.diffusion) replace some modules' forward for one request."""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterable

import torch


@contextlib.contextmanager
def replaced_forwards(pairs: Iterable[tuple[torch.nn.Module, Callable]]):
    """Within the block, the module of each (module, fn) pair runs fn(module, ...) as its forward (an instance
    attribute over the class's); all are removed on exit, however the block ends. Yields how many modules."""
    changed = []
    try:
        for module, fn in pairs:
            module.forward = types.MethodType(fn, module)
            changed.append(module)
        yield len(changed)
    finally:
        for module in changed:
            module.__dict__.pop("forward", None)
