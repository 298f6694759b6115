"""The one timer of GPU kernels, timing them the way a model runs them (the library's online tuning, ``blockfp8
tune``, ``bench`` and the tests all use it).

Method (CUDA): the callable is warmed up first (JIT compilation, autotuning and lazily built caches happen
here, and the first call's wall time is reported as ``jit_s``), then ONE CUDA graph is captured that calls
it once per *copy* of its arguments, in sequence. The copies differ only in the weight tensors, and there
are enough of them to exceed 4x the L2 cache, so every call streams its weight from HBM as a layer of a real
model does (a weight is touched once per forward pass, with far more than L2 of other weights in between).
The graph is replayed ``reps`` times between CUDA events; each replay's time divided by the number of copies
is one sample, and the result is the median with the 10th/90th percentiles. Graph replay removes the CPU
launch overhead, as CUDA-graph decoding does in serving engines. The secondary L2-hot number calls the op
repeatedly on the same copy.

When capture fails for a callable (it synchronizes, or allocates in a way capture forbids), the same calls are
timed with CUDA events around eager launches and the result says ``method="events"``. On CPU a wall-clock
timer stands in (``method="wall"``) so the commands run end to end; its numbers mean nothing about GPUs.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .device import as_device, cuda_identity

H100_L2_BYTES = 50 * 1024**2  # fallback when the device does not report its L2 size
COLD_FACTOR = 4  # the rotated copies together exceed this many L2 sizes
MAX_COPY_BYTES = 8 * 1024**3  # memory budget for all copies of one operand set
MAX_COPIES = 256  # tiny weights: more copies only lengthen the graph
HOT_REPS_MIN = 5


@dataclass(frozen=True)
class Timing:
    """Per-call time of one op. ``method`` is "graph" (CUDA-graph replay), "events" (eager launches between
    CUDA events, capture failed) or "wall" (CPU wall clock); ``copies`` is the number of calls per replay
    (the weight copies when L2-cold); ``jit_s`` the wall time of the first call."""

    median_us: float
    p10_us: float
    p90_us: float
    l2_hot_us: float | None
    jit_s: float
    method: str
    copies: int

    def to_json(self) -> dict:
        return asdict(self)


def l2_cache_bytes(device: torch.device | str | int | None = None) -> int:
    """L2 size reported by the device (the H100 value when the property is missing)."""
    return cuda_identity(as_device(device).index).l2_bytes or H100_L2_BYTES


def cold_copies(bytes_per_copy: int, l2_bytes: int, free_bytes: int | None = None,
                factor: float = COLD_FACTOR) -> int:
    """How many copies of an operand set of ``bytes_per_copy`` bytes to rotate through so that together they
    exceed ``factor`` x L2 (``COLD_FACTOR`` unless told): at least 2, and within ``MAX_COPY_BYTES`` and half the
    free memory. Tuning passes ``factor=1``: copies that just exceed L2 already stream every weight from HBM,
    and fewer copies make each measurement shorter."""
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy must be positive, got {bytes_per_copy}")
    want = math.ceil(factor * l2_bytes / bytes_per_copy) + 1  # +1: the call itself must not fit either
    budget = MAX_COPY_BYTES if free_bytes is None else min(MAX_COPY_BYTES, free_bytes // 2)
    return max(2, min(want, MAX_COPIES, budget // bytes_per_copy))


def rotated_copies(tensors: tuple[torch.Tensor, ...], copies: int | None = None, factor: float = COLD_FACTOR
                   ) -> list[tuple[torch.Tensor, ...]]:
    """``tensors`` and clones of them to rotate through for L2-cold timing: ``copies`` in all, by default enough
    that together they exceed ``factor`` x L2 (``cold_copies``; one off CUDA, where there is no L2 to beat)."""
    if copies is None:
        first = tensors[0]
        if first.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(first.device)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            copies = cold_copies(nbytes, l2_cache_bytes(first.device), free, factor)
        else:
            copies = 1
    return [tuple(tensors)] + [tuple(t.clone() for t in tensors) for _ in range(copies - 1)]


def _arg_sets(rotate: Sequence[tuple] | Callable[[int], tuple], copies: int | None) -> list[tuple]:
    if callable(rotate):
        if copies is None or copies < 1:
            raise ValueError(f"copies must be a positive int when rotate is a callable, got {copies!r}")
        return [tuple(rotate(i)) for i in range(copies)]
    sets = [tuple(a) for a in rotate]
    if not sets:
        raise ValueError("rotate must hold at least one argument set, got an empty sequence")
    return sets


def _device_of(sets: list[tuple]) -> torch.device:
    for a in sets[0]:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _summary(samples: list[float], hot: float | None, jit_s: float, method: str, copies: int) -> Timing:
    s = sorted(samples)

    def pct(q: float) -> float:
        return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]

    return Timing(statistics.median(s), pct(0.1), pct(0.9), hot, jit_s, method, copies)


def time_fn(
    fn: Callable[..., object],
    *,
    rotate: Sequence[tuple] | Callable[[int], tuple],
    copies: int | None = None,
    l2_cold: bool = True,
    reps: int = 20,
    warmup: int = 1,
    hot: bool = True,
) -> Timing:
    """Per-call time of ``fn(*args)`` with ``args`` rotating over ``rotate`` (a list of argument tuples, or a
    callable ``i -> args`` with ``copies`` given). See the module docstring for the method.

    ``l2_cold=False`` times repeated calls on the first argument set only (its L2-hot time). ``hot=False``
    skips the secondary L2-hot measurement (``l2_hot_us`` is then None).
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    sets = _arg_sets(rotate, copies)
    if _device_of(sets).type != "cuda":
        return _time_wall(fn, sets, reps, warmup)
    return _time_cuda(fn, sets, l2_cold, reps, warmup, hot)


def race(fns: Sequence[Callable[..., object]], *, rotate: Sequence[tuple] | Callable[[int], tuple],
         copies: int | None = None, rounds: int = 20, warmup: int = 1, seed: int = 0) -> list[list[float] | Exception]:
    """Per-call microseconds of each of ``fns`` on the same argument sets, measured interleaved: each fn gets one
    CUDA graph over every set (L2-cold, as ``time_fn``), then ``rounds`` rounds replay every graph once, in an
    order shuffled per round (``seed``). Drift of clocks, temperature or a neighbour's load lands on every fn
    alike, and sample r of every fn comes from round r, so two fns' samples pair (``autotune.faster``): what
    tells 0.2 us apart at decode, where timing candidates one after the other did not.

    Returns, per fn, its ``rounds`` samples, or the exception that stopped it (raised by one of its calls before
    capture; a fn whose capture fails is launched eagerly between events instead). Off CUDA, wall clock.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    sets = _arg_sets(rotate, copies)
    cuda = _device_of(sets).type == "cuda"
    runners: list[Callable[[], None] | Exception] = []
    graphs: list[torch.cuda.CUDAGraph] = []
    # One memory pool for every graph: only the timing of a replay matters, never its output, so the graphs may
    # reuse each other's memory, and many candidates at a large M fit.
    pool = torch.cuda.graph_pool_handle() if cuda else None
    stream = torch.cuda.Stream() if cuda else None
    for fn in fns:
        def body(fn: Callable = fn) -> None:
            for args in sets:
                fn(*args)  # the output is dropped at once, so its memory is reused by the next call

        try:
            runners.append(_race_runner(body, cuda, warmup, stream, pool, graphs))
        except Exception as e:  # noqa: BLE001 - a candidate that fails is a result, not a crash of the race
            runners.append(e)
    try:
        return _race_rounds(runners, rounds, len(sets), cuda, seed)
    finally:
        for graph in graphs:
            graph.reset()


def _race_runner(body: Callable[[], None], cuda: bool, warmup: int, stream: torch.cuda.Stream | None,
                 pool: object, graphs: list) -> Callable[[], None]:
    """What one round launches for ``body``: a replay of its graph (kept in ``graphs``), or ``body`` itself off
    CUDA or when capture fails."""
    if not cuda:
        for _ in range(1 + warmup):
            body()
        return body
    with torch.cuda.stream(stream):
        for _ in range(1 + warmup):
            body()
    torch.cuda.synchronize()
    try:
        graph, _ = capture_graph(body, stream, pool=pool)
    except Exception:  # noqa: BLE001 - timed from eager launches instead, like time_fn's "events"
        torch.cuda.synchronize()
        return body
    graphs.append(graph)
    graph.replay()  # the first replay uploads the graph; not timed
    return graph.replay


def _race_rounds(runners: list, rounds: int, calls: int, cuda: bool, seed: int) -> list[list[float] | Exception]:
    live = [i for i, r in enumerate(runners) if not isinstance(r, Exception)]
    samples: dict[int, list[float]] = {i: [] for i in live}
    order = list(live)
    rng = random.Random(seed)
    pending = []
    for _ in range(rounds):
        rng.shuffle(order)
        for i in order:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                runners[i]()
                end.record()
                pending.append((i, start, end))
            else:
                t0 = time.perf_counter()
                runners[i]()
                samples[i].append((time.perf_counter() - t0) * 1e6 / calls)
    if cuda:
        torch.cuda.synchronize()
        for i, start, end in pending:
            samples[i].append(start.elapsed_time(end) * 1e3 / calls)
    return [samples[i] if i in samples else runners[i] for i in range(len(runners))]


def _time_wall(fn: Callable, sets: list[tuple], reps: int, warmup: int) -> Timing:
    t0 = time.perf_counter()
    fn(*sets[0])
    jit_s = time.perf_counter() - t0
    for _ in range(warmup):
        for args in sets:
            fn(*args)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for args in sets:
            fn(*args)
        samples.append((time.perf_counter() - t0) * 1e6 / len(sets))
    return _summary(samples, None, jit_s, "wall", len(sets))


def _time_cuda(fn: Callable, sets: list[tuple], l2_cold: bool, reps: int, warmup: int, hot: bool) -> Timing:
    # Warm-up and capture share one side stream: libraries that create per-stream state (cuBLAS workspaces)
    # then create it before capture, not inside the graph.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        t0 = time.perf_counter()
        fn(*sets[0])
        torch.cuda.synchronize()
        jit_s = time.perf_counter() - t0
        for _ in range(warmup):
            for args in sets:  # every copy once: per-weight caches (padded scales) fill outside the graph
                fn(*args)
        torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(stream)

    hot_sets = [sets[0]] * max(len(sets), 8)
    cold_sets = sets if l2_cold else hot_sets
    hot_reps = max(HOT_REPS_MIN, reps // 4)
    try:
        samples = _graph_samples(fn, cold_sets, reps, stream)
        hot_samples = _graph_samples(fn, hot_sets, hot_reps, stream) if l2_cold and hot else samples
        method = "graph"
    except Exception:  # noqa: BLE001 - any capture failure falls back to eager timing, flagged in the result
        torch.cuda.synchronize()
        samples = _event_samples(fn, cold_sets, reps)
        hot_samples = _event_samples(fn, hot_sets, hot_reps) if l2_cold and hot else samples
        method = "events"
    hot_us = statistics.median(hot_samples) if hot or not l2_cold else None
    return _summary(samples, hot_us, jit_s, method, len(cold_sets))


def capture_graph(fn: Callable[[], object], stream: torch.cuda.Stream | None = None, warmup: int = 0,
                  pool: object | None = None, thread_local: bool = False,
                  keep_graph: bool = False) -> tuple[torch.cuda.CUDAGraph, object]:
    """The one CUDA-graph capture: ``warmup`` calls of ``fn`` on a side stream (lazy initialization such as JIT
    compilation or workspace allocation must not happen during capture), then one call captured, into ``pool``
    (a ``torch.cuda.graph_pool_handle()`` shared with other graphs) when given. ``thread_local``: other threads'
    CUDA work during the capture is not an error (a library capturing for its caller cannot know about them).
    ``keep_graph``: the graph keeps its captured ``cudaGraph_t`` (readable through ``raw_cuda_graph``) and is
    instantiated here all the same.

    Returns the graph and what the captured call returned (its tensors live in the graph's memory pool and
    are rewritten by every replay). capture_begin/capture_end rather than the ``torch.cuda.graph`` context
    manager, which runs gc.collect() and empty_cache() on every entry: hundreds of captures per benchmark
    would spend most of their time there.
    """
    if stream is None:
        stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=True) if keep_graph else torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local" if thread_local else "global")
        try:
            out = fn()
        finally:
            graph.capture_end()
    if keep_graph:
        graph.instantiate()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out


def _graph_samples(fn: Callable, sets: list[tuple], reps: int, stream: torch.cuda.Stream) -> list[float]:
    def body() -> None:
        for args in sets:
            fn(*args)  # the output is dropped at once, so its memory is reused by the next call

    graph, _ = capture_graph(body, stream)
    try:
        graph.replay()  # the first replay uploads the graph; not timed
        return _timed(graph.replay, reps, len(sets))
    finally:
        graph.reset()


def _event_samples(fn: Callable, sets: list[tuple], reps: int) -> list[float]:
    def once() -> None:
        for args in sets:
            fn(*args)

    once()
    return _timed(once, reps, len(sets))


def _timed(launch: Callable[[], None], reps: int, calls: int) -> list[float]:
    """Per-call microseconds of ``reps`` launches, each between two CUDA events on the current stream."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        launch()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e3 / calls for start, end in events]


