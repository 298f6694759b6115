"""Split-K arrival counters are never shared by launches that can run at once (backends/triton/gemm.py).

CPU (Triton interpreter): eight threads launching split-K GEMMs at the same time, and a launch interrupted half way
(an exception raised by a signal handler inside the interpreter) followed by normal calls. GPU: two streams running
different split-K problems concurrently, and two captured CUDA graphs replayed on two streams; every result must be
bit-identical to a serial run.
"""

from __future__ import annotations

import signal
import threading

import pytest
import torch

from blockfp8.backends.triton.configs import TritonConfig
from blockfp8.backends.triton.gemm import triton_gemm
from blockfp8.testing import default_device
from blockfp8.testing.operands import random_problem

DEVICE = default_device()
SPLIT = TritonConfig(16, 64, split_k=4, group_m=1, swap_ab=True)


def _problems(count: int, m: int = 3, n: int = 192, k: int = 1024) -> list[tuple[torch.Tensor, ...]]:
    return [random_problem(m, n + 64 * i, k, seed=10 * i, device=DEVICE)[1:] for i in range(count)]


def test_threads_launching_at_once_get_serial_results():
    problems = _problems(8)
    serial = [triton_gemm(*p, config=SPLIT) for p in problems]
    results: list[torch.Tensor | None] = [None] * len(problems)
    start = threading.Barrier(len(problems))

    def worker(i: int) -> None:
        start.wait()
        results[i] = triton_gemm(*problems[i], config=SPLIT)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (want, got) in enumerate(zip(serial, results, strict=True)):
        assert got is not None and torch.equal(got, want), f"thread {i}"


class _Interrupt(Exception):
    pass


def _caused_by_interrupt(error: BaseException | None) -> bool:
    """Whether ``error`` is the interrupt or wraps it: the interpreter wraps an exception once or twice, depending
    on where it lands, sometimes keeping only its text."""
    while error is not None:
        if isinstance(error, _Interrupt) or "_Interrupt()" in repr(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@pytest.mark.skipif(DEVICE != "cpu" or not hasattr(signal, "setitimer"),
                    reason="interrupts a launch inside the Triton interpreter")
def test_interrupted_launch_does_not_poison_later_calls():
    xq, xs, wq, ws = _problems(1, m=3, n=1024, k=2048)[0]
    want = triton_gemm(xq, xs, wq, ws, config=SPLIT)

    def interrupt(signum, frame):
        raise _Interrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        # The interpreter runs the 16 x 4 programs one after another in Python; stop it part way through, after
        # some programs of a tile have counted their arrival and before the last one resets the counter.
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Exception) as info:  # the interpreter re-raises it wrapped in an InterpreterError
            triton_gemm(xq, xs, wq, ws, config=SPLIT)
        assert _caused_by_interrupt(info.value), info.value
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    for _ in range(2):
        assert torch.equal(triton_gemm(xq, xs, wq, ws, config=SPLIT), want)


@pytest.mark.gpu
def test_two_streams_concurrently_match_serial():
    problems = _problems(2, m=16, n=7168, k=2048)
    serial = [triton_gemm(*p, config=SPLIT) for p in problems]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    for _ in range(20):
        outs = []
        for s, p in zip(streams, problems, strict=True):
            with torch.cuda.stream(s):
                outs.append(triton_gemm(*p, config=SPLIT))
        torch.cuda.synchronize()
        for want, got in zip(serial, outs, strict=True):
            assert torch.equal(got, want)


@pytest.mark.gpu
def test_two_graphs_replayed_on_two_streams_match_serial():
    from blockfp8.testing.timing import capture_graph

    problems = _problems(2, m=16, n=7168, k=2048)
    serial = [triton_gemm(*p, config=SPLIT) for p in problems]
    capture_stream = torch.cuda.Stream()  # both graphs captured on one stream, as a serving engine might
    graphs = [capture_graph(lambda p=p: triton_gemm(*p, config=SPLIT), capture_stream, warmup=1) for p in problems]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    for _ in range(50):
        for s, (graph, _) in zip(streams, graphs, strict=True):
            with torch.cuda.stream(s):
                graph.replay()
        torch.cuda.synchronize()
        for want, (_, out) in zip(serial, graphs, strict=True):
            assert torch.equal(out, want)
