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
* **Input**: a graph reads the memory of the tensors it was captured with. An eager linear's activation is read
  by one kernel only, the quantizer, so the set's first capture reads the caller's activation in place and,
  before each later replay, points that kernel's argument at the call's own activation (``graph_args``: a
  driver call that enqueues nothing, where a copy would be a launch of its own). The rebinding is proven once,
  on other data, against a direct launch, bit for bit; where it cannot be used (no driver entry points, a
  graph whose activation is read by more than one argument, ``gemm``'s fp8 inputs), a graph reading one address
  in place is captured once ``STREAK`` calls in a row have come from it (a decode loop whose allocations repeat
  step after step; at most ``IN_PLACE`` per set), and other calls copy their inputs into the set's input
  buffers and replay a graph captured on those.
* **Captures** cost about half a millisecond each (a device synchronize, a warm-up launch, the capture and its
  instantiation: 0.47 ms measured inside generate() on an H100), so they are bought as a rental is: a set
  captures once the launches it made without a graph have cost about as much as the capture would. A direct
  launch costs about 50 us more than a replay, so a set's first ``HOT - 1`` calls launch directly and the next
  captures (the rebound graph, else the copying one; a shape called a few times, such as one prompt's prefill,
  never costs a capture); a copy costs about 10 us, so a graph reading an address in place is captured after
  ``STREAK`` calls in a row from it. A set makes at most ``CAPTURES`` in its life. transformers' generate()
  with a growing cache moves its activations between steps, yet a prefill's addresses repeat from one call to
  the next: with a set capturing on its second call and in place after two calls in a row, three timed 32-token
  calls of a 4-layer model made 49 captures (23 ms, 0.24 ms per token).

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

from . import graph_args
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

    def __init__(self, device: torch.device, out_shape: tuple[int, ...], out_dtype: torch.dtype, stream: int) -> None:
        # Normal tensors even when the first call runs under inference_mode: the input buffer is copied into
        # outside it later, which an inference tensor refuses.
        with torch.inference_mode(False):
            self.out = torch.empty(out_shape, dtype=out_dtype, device=device)
        self.storage = self.out.untyped_storage()._cdata  # (an output from a replay is an alias of this storage)
        self._idle = _use_count(self.storage)  # the count while no alias of ``out`` is alive
        self.in_place: dict[tuple[int, ...], torch.cuda.CUDAGraph] = {}
        self.last: tuple[int, ...] = ()  # the addresses of the previous call
        self.streak = 0  # calls in a row from ``last``
        self.calls = 0
        self.copy_graph: torch.cuda.CUDAGraph | None = None
        self.copy_inputs: tuple[torch.Tensor, ...] = ()
        self.captures = 0
        self.tried_rebinding = False
        self.moving: graph_args.PointerArg | None = None  # the rebound input of ``moving_graph``
        self.moving_graph: torch.cuda.CUDAGraph | None = None
        self.moving_launch: Callable[[], None] | None = None  # its replay, through the driver where it can be
        self._where = (device.index, stream)

    def __call__(self, inputs: tuple[torch.Tensor, ...], run: Callable[..., torch.Tensor],
                 operands: tuple) -> torch.Tensor | None:
        if _use_count(self.storage) != self._idle:
            return None  # the last output is still held: a replay would overwrite it
        if self.moving is not None and self.moving.point_at(inputs[0].data_ptr()):
            self.moving_launch()
            return self.out.detach()
        ptrs = tuple(t.data_ptr() for t in inputs)
        graph = self.in_place.get(ptrs)
        if graph is None:
            self.streak = self.streak + 1 if ptrs == self.last else 1
            self.last = ptrs
            self.calls += 1
            if self.calls < self.HOT:
                return None
            graph = (self._rebindable(ptrs, inputs, run, operands) or self._in_place(ptrs, inputs, run, operands)
                     or self._copying(inputs, run, operands))
            if graph is None:
                return None
        graph.replay()
        return self.out.detach()

    def _rebindable(self, ptrs: tuple[int, ...], inputs: tuple[torch.Tensor, ...], run: Callable,
                    operands: tuple) -> torch.cuda.CUDAGraph | None:
        """The set's first capture, where one input can be rebound (``graph_args``): a graph reading the caller's
        activation in place whose one kernel reading it (the quantizer, or a fused producer) is pointed at each
        later call's activation before its replay. Proven
        on other data first (``_rebinds``); a graph that fails the proof is kept as an in-place graph."""
        if (self.tried_rebinding or len(inputs) != 1 or self.captures >= self.CAPTURES
                or not graph_args.keeps_graphs()):
            return None
        self.tried_rebinding = True
        graph = self._capture(inputs, run, operands, keep_graph=True)
        if graph is None:
            return None
        arg = graph_args.PointerArg.find(graph, ptrs[0])
        launch = graph_args.launcher(graph, self._where[1]) or graph.replay
        if arg is not None and self._rebinds(launch, arg, inputs[0], run, operands):
            self.moving, self.moving_graph, self.moving_launch = arg, graph, launch
        elif arg is not None and arg.address != ptrs[0]:
            return None  # the proof moved the argument and could not move it back: the graph is unusable
        else:
            self.in_place[ptrs] = graph
        return graph

    def _rebinds(self, launch: Callable[[], None], arg: graph_args.PointerArg, x: torch.Tensor, run: Callable,
                 operands: tuple) -> bool:
        """Whether the graph ``launch`` replays, with ``arg`` pointed at another activation, gives that
        activation's output bit for bit (a direct launch's), and an output other than ``x``'s; ``arg`` points at
        ``x`` again afterwards."""
        with torch.inference_mode(False), torch.no_grad():
            at_x = self.out.clone()  # the capture's warm-up call wrote x's output there
            rng = torch.Generator(x.device).manual_seed(0)  # not the caller's generator: its sequence is theirs
            other = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
            other.copy_(torch.randn(x.shape, generator=rng, dtype=x.dtype, device=x.device))
            want = torch.empty_like(self.out)
            run(other, *operands, out=want)
            proven = arg.point_at(other.data_ptr())
            if proven:
                launch()
                proven = torch.equal(self.out, want) and not torch.equal(want, at_x)
            return arg.point_at(x.data_ptr()) and proven

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

    def _capture(self, inputs: tuple[torch.Tensor, ...], run: Callable, operands: tuple,
                 keep_graph: bool = False) -> torch.cuda.CUDAGraph | None:
        self.captures += 1
        pool, members = self._pool()
        with torch.inference_mode(False), torch.no_grad():
            try:
                # The warm-up call compiles and fills every cache outside the capture.
                graph, _ = capture_graph(lambda: run(*inputs, *operands, out=self.out), warmup=1, pool=pool,
                                         thread_local=True, keep_graph=keep_graph)
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
