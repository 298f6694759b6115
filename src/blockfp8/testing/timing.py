"""Timing for the commands and tests: the one CUDA-graph timer (``blockfp8.timer``, re-exported here), the
step timer, copy bandwidth and the hardware ceilings to compare against. See ``blockfp8.timer`` for the
method."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..device import as_device
from ..timer import Timing, capture_graph, cold_copies, l2_cache_bytes, race, time_fn

__all__ = ["Ceilings", "Timing", "capture_graph", "cold_copies", "copy_time", "host_time_us", "l2_cache_bytes",
           "measure_ceilings", "race", "synchronize", "time_fn", "time_steps"]


@dataclass(frozen=True)
class Ceilings:
    """Measured limits of the device: device-to-device copy bandwidth and dense FP8 tensor-core throughput."""

    copy_gbps: float | None
    fp8_tflops: float | None
    l2_bytes: int | None
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device | str) -> None:
    """Wait for ``device`` (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], object], device: torch.device | str, warmup: int, steps: int) -> list[float]:
    """Seconds per call of ``fn`` for ``steps`` calls after ``warmup`` untimed ones, each call synchronized on
    both ends so a step's time is its full latency, host launch work included (a decode step as a user sees
    it; per-kernel device time is ``time_fn``'s job)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def host_time_us(fn: Callable[[], object], device: torch.device | str, calls: int = 2000, runs: int = 5) -> float:
    """Host microseconds per call of ``fn``: the median over ``runs`` of (``calls`` back-to-back calls, then one
    synchronize) / ``calls``. A call whose device work is shorter than its host work (decode-size GEMMs in eager
    mode) is measured by its host time, as a Python loop calling it sees it."""
    for _ in range(max(10, calls // 40)):
        fn()
    synchronize(device)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def copy_time(nbytes: int, device: torch.device | str | None = None, l2_cold: bool = True, reps: int = 20) -> Timing:
    """Per-copy time of a device-to-device copy of ``nbytes`` (bytes moved: 2 x ``nbytes``, read + written),
    L2-cold over rotated buffers or repeated on one."""
    device = as_device(device)
    copies = cold_copies(nbytes, l2_cache_bytes(device)) if l2_cold else 1
    srcs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(copies)]
    dsts = [torch.empty_like(s) for s in srcs]
    return time_fn(lambda d, s: d.copy_(s), rotate=list(zip(dsts, srcs, strict=True)), l2_cold=l2_cold, reps=reps,
                   hot=False)


COPY_BYTES = 1024**3
FP8_SIZE = 8192


def measure_ceilings(device: torch.device | str | None = None, reps: int = 20) -> Ceilings:
    """Copy bandwidth (a 1 GiB device-to-device copy; bytes read + written over time) and dense FP8
    throughput (``torch._scaled_mm`` tensorwise on 8192^3 e4m3 with scalar fp32 scales, bf16 out), measured
    now on ``device``. Off CUDA both are None."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return Ceilings(None, None, None, "no CUDA device: no ceilings")
    copy_gbps = 2 * COPY_BYTES / (copy_time(COPY_BYTES, device, l2_cold=False, reps=reps).median_us * 1e3)
    s = FP8_SIZE
    a = torch.randn(s, s, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(s, s, device=device).to(torch.float8_e4m3fn).t()  # column-major, as cuBLAS wants
    one = torch.ones((), device=device)
    t = time_fn(lambda a, b: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), rotate=[(a, b)],
                l2_cold=False, reps=reps)
    fp8_tflops = 2 * s**3 / (t.median_us * 1e6)
    del a, b
    torch.cuda.empty_cache()
    return Ceilings(copy_gbps, fp8_tflops, l2_cache_bytes(device),
                    f"copy {COPY_BYTES >> 20} MiB d2d; _scaled_mm tensorwise {s}^3 e4m3 -> bf16; median of {reps}")
