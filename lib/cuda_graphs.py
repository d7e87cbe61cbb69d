"""A module's forward replayed as CUDA graphs: the denoiser that a diffusion loop calls every step (lib.diffusion's
engines, lib.mbd's band U-Nets). One call is hundreds of kernels; replaying them as a graph takes the host's launch
time out of every step, with the same kernels on the same inputs."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.utils._pytree as pytree


class DenoiserGraphs:
    """Replays a module's forward (the denoiser a diffusion loop calls every step) as CUDA graphs, one per call
    signature (each tensor's shape, dtype and strides plus every other argument's value), for one request: a step's
    hundreds of kernel launches become one replay, with the same kernels on the same inputs.

    Used as `with DenoiserGraphs(module).installed(): ...` (the module's forward is overridden on the instance and
    restored on exit). A new signature runs the forward eagerly (that result is returned) and is then captured;
    later calls copy their tensors into the captured inputs, replay, and return a copy of the captured outputs
    (the next replay overwrites them). Falls back to the eager forward for tensors not on CUDA, under autograd,
    for arguments it can't key, once `max_captures` signatures were captured (an argument that changes every step),
    and for the rest of the request once a capture fails. At most `max_graphs` graphs are kept (least recently used
    dropped); all are freed on exit, whether the block ends normally, with an error, or out of memory."""

    def __init__(self, module: torch.nn.Module, max_graphs: int = 4, max_captures: int = 8,
                 log: Optional[Callable[[str], None]] = None):
        self.module, self.forward = module, module.forward  # the bound class forward
        self.max_graphs, self.max_captures, self.log = max_graphs, max_captures, log
        self.graphs: "OrderedDict[tuple, tuple]" = OrderedDict()  # key -> (graph, static input tensors, static out)
        self.captures = self.replays = 0
        self.disabled: Optional[str] = None

    @contextlib.contextmanager
    def installed(self):
        self.module.forward = self
        try:
            yield self
        finally:
            self.module.__dict__.pop("forward", None)
            self.graphs.clear()  # frees the graphs' memory pools (the caller empties the allocator's cache on OOM)

    def summary(self) -> str:
        return (f"cuda graphs: {self.captures} captured, {self.replays} replays" +
                (f" ({self.disabled})" if self.disabled else ""))

    # -- the call ------------------------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        if self.disabled is not None or torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = self._key(leaves, spec)
        if key is None:
            return self.forward(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            graph, static_inputs, static_out = entry
            for buf, x in zip(static_inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
                buf.copy_(x)
            graph.replay()
            self.replays += 1
            return _clone_tensors(static_out)
        if self.captures >= self.max_captures:
            self.disabled = f"eager after {self.captures} captures: the call signature keeps changing"
            return self.forward(*args, **kwargs)
        return self._capture(key, leaves, spec)

    def _key(self, leaves, spec) -> Optional[tuple]:
        parts = []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                if not self._usable(x):
                    return None
                parts.append((tuple(x.shape), x.dtype, x.stride(), x.device))
            else:
                try:
                    hash(x)
                except TypeError:
                    return None
                parts.append((type(x), x))
        return repr(spec), tuple(parts)

    def _capture(self, key, leaves, spec):
        static = [torch.empty_like(x).copy_(x) if isinstance(x, torch.Tensor) else x for x in leaves]

        def call():
            args, kwargs = pytree.tree_unflatten(static, spec)
            return self.forward(*args, **kwargs)

        self.captures += 1
        result = self._warm_up(call)  # eager, on these inputs: this call's answer
        try:
            graph, static_out = self._record(call)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # an op that can't be captured: eager from now on, this request
            self.disabled = f"capture failed, eager: {type(e).__name__}: {e}"[:300]
            if self.log:
                self.log(self.disabled)
            return result
        self.graphs[key] = (graph, [x for x in static if isinstance(x, torch.Tensor)], static_out)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return result

    # -- the CUDA parts (tests replace these three to check the bookkeeping on CPU) --------------------------------

    @staticmethod
    def _usable(x: torch.Tensor) -> bool:
        return x.is_cuda

    @staticmethod
    def _warm_up(call):
        """One eager run on a side stream (lazy initialisations happen outside the capture), its outputs copied on
        the current stream."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = call()
        torch.cuda.current_stream().wait_stream(side)
        return _clone_tensors(out)

    @staticmethod
    def _record(call):
        graph = torch.cuda.CUDAGraph()
        # thread_local: a capture here does not make other threads' CUDA calls (another model's request) fail
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = call()
        return graph, out


def _clone_tensors(tree):
    return pytree.tree_map_only(torch.Tensor, torch.clone, tree)
