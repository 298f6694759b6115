"""Eager decode calls replayed from CUDA graphs, with no copy in and no copy out where the caller allows it.

An eager decode step is host-bound: launching a quantizer and a GEMM from Python, with their allocations,
costs more host time than replaying one CUDA graph (docs/performance.md). So an eager call of a decode-size
plan (``ops.LinearPlan``) replays a graph of it. Two copies would make such a replay safe for any caller --
the input copied into the graph's own buffer, the output copied out before the next replay overwrites it --
and on a host-bound step they cost about as much as the launches they replace. ``EagerGraphs`` avoids both:

* **Output**: the graph writes into one output tensor allocated outside any graph pool, and the call returns an
  alias of it (``detach()``: the same memory, a tensor of its own). Before a replay, the storage's use count
  says whether any alias (or a view of one) is still alive; if one is, the replay would overwrite a tensor the
  caller holds, so the call launches its kernels directly instead. Code that drops a layer's output before
  calling the layer again -- every decode loop -- always replays.
* **Input**: a graph reads the memory of the tensors it was captured with, so a graph captured on the caller's
  own activation replays correctly for any later activation at that address with that layout (it is alive
  during the call). Once ``STREAK`` calls in a row have come from one address (a decode loop whose allocations
  repeat step after step), a graph reading it in place is captured (at most ``IN_PLACE`` per set). Other calls
  copy the activation into the set's input buffer and replay a graph captured on that.
* **Captures** cost about half a millisecond each (a device synchronize, a warm-up launch, the capture and its
  instantiation: 0.47 ms measured inside generate() on an H100), so they are bought as a rental is: a set
  captures once the launches it made without a graph have cost about as much as the capture would. A direct
  launch costs about 50 us more than a replay, so a set's first ``HOT - 1`` calls launch directly and the next
  captures the copying graph (a shape called a few times, such as one prompt's prefill, never costs a
  capture); a copy costs about 10 us, so a graph reading an address in place is captured after ``STREAK`` calls
  in a row from it. A set makes at most ``CAPTURES`` in its life. transformers' generate() with a growing cache
  moves its activations between steps, yet a prefill's addresses repeat from one call to the next: with a set
  capturing on its second call and in place after two calls in a row, three timed 32-token calls of a 4-layer
  model made 49 captures (23 ms, 0.24 ms per token).

The caller's contract is PyTorch's own for freed memory: once an output is dropped on one stream, work on
another stream must not still be reading it unless the streams are synchronized (the caching allocator would
hand that memory out again too; ``record_stream`` does not protect these outputs). ``BLOCKFP8_EAGER_GRAPHS=0``
launches directly.

A set belongs to one (plan, stream, thread, input layout) and to the weight tensors' memory it was captured
with: ``ops.LinearPlan`` rebuilds it when a weight gets new storage. Graphs of one (device, stream) share one
memory pool for their temporaries, which are dead once a replay ends (replays on one stream never overlap);
outputs and input buffers live outside the pool, so no graph's temporaries can overwrite them.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable

import torch

from .timer import capture_graph

_use_count = torch._C._storage_Use_Count


class EagerGraphs:
    """The CUDA graphs of one plan's eager calls on one (stream, thread, input layout): ``self(inputs, run,
    operands)`` returns the output, or None when the call must launch directly. ``run(*inputs, *operands,
    out=)`` launches the plan's kernels into ``out``."""

    HOT = 8  # the call of a set that makes its first capture (earlier ones launch directly)
    STREAK = 48  # calls in a row from one address before a graph reading it in place is captured
    IN_PLACE = 2  # most graphs reading a caller's tensors where they are, per set
    CAPTURES = 3  # most captures in the life of one set (an address-hopping caller stops costing captures)

    # BLOCKFP8_EAGER_GRAPHS=0 launches directly; cleared for the process after a capture fails (see _capture).
    enabled = os.environ.get("BLOCKFP8_EAGER_GRAPHS", "1") != "0"
    _pools: dict[tuple[int, int], tuple[object, weakref.WeakSet]] = {}

    def __init__(self, device: torch.device, out_shape: tuple[int, ...], out_dtype: torch.dtype, stream: int,
                 ptrs: tuple[int, ...]) -> None:
        self.ptrs = ptrs
        # Normal tensors even when the first call runs under inference_mode: the input buffer is copied into
        # outside it later, which an inference tensor refuses.
        with torch.inference_mode(False):
            self.out = torch.empty(out_shape, dtype=out_dtype, device=device)
        self._storage = self.out.untyped_storage()._cdata
        self._idle = _use_count(self._storage)  # the count while no alias of ``out`` is alive
        self.in_place: dict[tuple[int, ...], torch.cuda.CUDAGraph] = {}
        self.last: tuple[int, ...] = ()  # the addresses of the previous call
        self.streak = 0  # calls in a row from ``last``
        self.calls = 0
        self.copy_graph: torch.cuda.CUDAGraph | None = None
        self.copy_inputs: tuple[torch.Tensor, ...] = ()
        self.captures = 0
        self._where = (device.index, stream)

    def __call__(self, inputs: tuple[torch.Tensor, ...], run: Callable[..., torch.Tensor],
                 operands: tuple) -> torch.Tensor | None:
        if _use_count(self._storage) != self._idle:
            return None  # the last output is still held: a replay would overwrite it
        ptrs = tuple(t.data_ptr() for t in inputs)
        graph = self.in_place.get(ptrs)
        if graph is None:
            self.streak = self.streak + 1 if ptrs == self.last else 1
            self.last = ptrs
            self.calls += 1
            if self.calls < self.HOT:
                return None
            graph = self._in_place(ptrs, inputs, run, operands) or self._copying(inputs, run, operands)
            if graph is None:
                return None
        graph.replay()
        return self.out.detach()

    def _in_place(self, ptrs: tuple[int, ...], inputs: tuple[torch.Tensor, ...], run: Callable,
                  operands: tuple) -> torch.cuda.CUDAGraph | None:
        """A graph reading ``inputs`` where they are, captured once ``STREAK`` calls in a row have come from their
        address (a loop with stable addresses captures once; addresses that move between calls -- a growing
        cache's allocations -- do not cost captures)."""
        if self.streak < self.STREAK or len(self.in_place) >= self.IN_PLACE or self.captures >= self.CAPTURES:
            return None
        graph = self._capture(inputs, run, operands)
        if graph is not None:
            self.in_place[ptrs] = graph
        return graph

    def _copying(self, inputs: tuple[torch.Tensor, ...], run: Callable,
                 operands: tuple) -> torch.cuda.CUDAGraph | None:
        """The graph reading the set's input buffers, with ``inputs`` copied into them."""
        if self.copy_graph is not None:
            for buf, t in zip(self.copy_inputs, inputs, strict=True):
                buf.copy_(t)
            return self.copy_graph
        if self.captures >= self.CAPTURES:
            return None
        with torch.inference_mode(False):
            bufs = tuple(torch.empty_like(t).copy_(t) for t in inputs)
        graph = self._capture(bufs, run, operands)
        if graph is not None:
            self.copy_graph, self.copy_inputs = graph, bufs
        return graph

    def _pool(self) -> tuple[object, weakref.WeakSet]:
        """The shared pool of this set's (device, stream) and the sets holding graphs captured into it. A pool
        lives as long as a graph captured into it: once every such graph is freed (their layers gone, or their
        set replaced), torch releases the pool and its handle must not be captured into again, so a new one is
        made. Looked up at each capture, not when the set is made: a set replacing another is made while the
        old one (and its graphs) still live."""
        pool, members = self._pools.get(self._where, (None, None))
        if not members:
            pool, members = torch.cuda.graph_pool_handle(), weakref.WeakSet()
            self._pools[self._where] = (pool, members)
        return pool, members

    def _capture(self, inputs: tuple[torch.Tensor, ...], run: Callable,
                 operands: tuple) -> torch.cuda.CUDAGraph | None:
        self.captures += 1
        pool, members = self._pool()
        with torch.inference_mode(False), torch.no_grad():
            try:
                # The warm-up call compiles and fills every cache outside the capture.
                graph, _ = capture_graph(lambda: run(*inputs, *operands, out=self.out), warmup=1, pool=pool,
                                         thread_local=True)
            except RuntimeError as e:
                # A failed capture can leave torch's CUDA state (its RNG's capture bookkeeping) unusable for
                # further captures: stop trying for the rest of the process and say so once.
                EagerGraphs.enabled = False
                warnings.warn(f"blockfp8: capturing an eager linear into a CUDA graph failed ({type(e).__name__}: "
                              f"{e}); eager calls launch their kernels directly from now on", RuntimeWarning,
                              stacklevel=3)
                return None
        members.add(self)  # only a set holding a graph keeps the pool alive
        return graph
