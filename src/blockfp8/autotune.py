"""Choosing by measurement: check every candidate against the reference, time the correct ones, rank them.

``tune_cell`` is the one check-then-time loop, shared by ``blockfp8 tune`` (``testing/tuning.py``: backends and
launch configs on random operands) and the online tuning here. A candidate that raises or whose result is off
the reference by more than ``TOLERANCE`` is reported and never timed, so it can never be ranked.

Online tuning (opt-in: ``BLOCKFP8_AUTOTUNE=1``, ``set_autotune(True)``, or ``convert_model(..., tune=True)`` for
the shapes it creates): the first CUDA call of an unseen (device, N, K, M bucket) -- no row of this device's
tables or tuning cache at that bucket -- checks and times every backend that supports it, once, on the call's
own operands (the weight cloned into copies that just exceed L2, the one timer of ``timer.py``), and writes the
ranking into the user's tuning cache (``tuning_cache``): later calls and later processes use it. It never runs
while a CUDA graph is being captured or ``torch.compile`` traces (timing would break the capture, and a traced
program must not depend on a measurement); the dispatcher then uses its static choice and ``explain`` says so.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import tables, tuning_cache
from .backends import Problem, backend_names, get_backend
from .format import empty_scales
from .reference import TOLERANCE, reference_gemm, rel_error
from .status import Status
from .timer import rotated_copies, time_fn

ENV_AUTOTUNE = "BLOCKFP8_AUTOTUNE"
ONLINE_REPS = 5  # graph replays per backend: one first call pays for a few backends, not a benchmark

# (operands supplier) -> (x_fp8 (M, K), x_scale (M, Kb) row-major, w_fp8 (N, K), weight_scale_inv)
Operands = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class Trial:
    """One candidate at one cell: ``status`` is ok, wrong (rel error above tolerance) or crashed (it raised)."""

    config: object  # what was tried: a backend name, a launch config, or a (backend, config) pair
    status: str
    rel_error: float | None = None
    us: float | None = None
    reason: str = ""
    samples: list[float] | None = None  # per-round microseconds when raced (``timer.race``): they pair


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def tune_cell(configs: list, check: Callable[[object], float], measure: Callable[[object], float] | None = None,
              on_bad: Callable[[Trial], None] = lambda t: None, tol: float = TOLERANCE,
              race: Callable[[list], list[list[float] | Exception]] | None = None) -> list[Trial]:
    """Check every candidate (``check(c)`` -> relative error), then time the correct ones: one by one
    (``measure(c)`` -> microseconds) or all together (``race(configs)`` -> each one's paired per-round samples or
    its exception, ``timer.race``). Wrong or failing candidates are never timed; ``on_bad`` hears about each."""
    trials = []
    for c in configs:
        try:
            err = check(c)
        except Exception as e:  # noqa: BLE001 - a candidate the kernel rejects is a result, not a crash
            trial = Trial(c, Status.CRASHED, reason=_first_line(e))
        else:
            trial = Trial(c, Status.OK if err <= tol else Status.WRONG, rel_error=err)
            if trial.status == Status.OK and race is None:
                try:
                    trial.us = measure(c)
                except Exception as e:  # noqa: BLE001
                    trial.status, trial.reason = Status.CRASHED, _first_line(e)
        trials.append(trial)
    if race is not None:
        ok = [t for t in trials if t.status == Status.OK]
        for trial, result in zip(ok, race([t.config for t in ok]) if ok else [], strict=True):
            if isinstance(result, Exception):
                trial.status, trial.reason = Status.CRASHED, _first_line(result)
            else:
                trial.samples, trial.us = result, statistics.median(result)
    for trial in trials:
        if trial.status != Status.OK:
            on_bad(trial)
    return trials


# A candidate replaces the one that runs now only when it is faster by more than this fraction of its time, and
# (raced) wins enough rounds that chance is unlikely (one-sided sign test below SIGNIFICANCE): two tune runs
# then agree, instead of flipping between candidates a few tenths of a microsecond apart.
STICKY_MARGIN = 0.01
SIGNIFICANCE = 0.01


def faster(fast: Trial, slow: Trial, margin: float = STICKY_MARGIN, alpha: float = SIGNIFICANCE) -> bool:
    """Whether ``fast`` beats ``slow`` for sure: by more than ``margin`` of slow's time and, when both were raced
    (paired samples), in enough rounds that a sign test puts chance below ``alpha``. Timed one by one, the
    medians and the margin decide."""
    if fast.us is None or slow.us is None:
        return False
    if not (fast.samples and slow.samples):
        return fast.us < slow.us * (1 - margin)
    n = min(len(fast.samples), len(slow.samples))
    diffs = [b - a for a, b in zip(fast.samples[:n], slow.samples[:n], strict=True)]
    if statistics.median(diffs) <= margin * statistics.median(slow.samples[:n]):
        return False
    wins = sum(d > 0 for d in diffs)
    # P(at least `wins` of n fair coin flips): the chance of winning so often with no real difference.
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n < alpha


def choose_trial(trials: list[Trial], incumbent: object | None) -> Trial | None:
    """The trial to keep: the fastest correct one, unless the ``incumbent`` (what runs now) is correct too and the
    fastest is not ``faster`` than it for sure."""
    fastest = ranked(trials)
    if not fastest:
        return None
    now = next((t for t in fastest if t.config == incumbent), None)
    if now is not None and now is not fastest[0] and not faster(fastest[0], now):
        return now
    return fastest[0]


def ranked(trials: list[Trial]) -> list[Trial]:
    """The correct, timed trials, fastest first."""
    return sorted((t for t in trials if t.status == Status.OK and t.us is not None), key=lambda t: t.us)


# ------------------------------------------------------------------------------------------- online tuning

_enabled: bool | None = None  # None: follow the environment variable (read once)
_shapes: set[tuple[int, int]] = set()  # (N, K) tuned online even when the switch is off (convert_model(tune=True))
_handled: set[tuple] = set()  # (device, N, K, bucket) already tuned, or found in a table, in this process
_skipped: dict[tuple, str] = {}  # (device, N, K, bucket) -> why online tuning did not run there


def set_autotune(enabled: bool | None) -> None:
    """Turn online tuning on or off for every shape (None: follow ``BLOCKFP8_AUTOTUNE`` again)."""
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
    _enabled = enabled


def autotune_enabled() -> bool:
    """Whether online tuning is on for every shape (``set_autotune`` or ``BLOCKFP8_AUTOTUNE=1``)."""
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(ENV_AUTOTUNE, "") == "1"
    return _enabled


def tune_shapes(shapes: set[tuple[int, int]]) -> None:
    """Tune these (N, K) online on their first CUDA call of each M bucket, whatever the global switch says."""
    _shapes.update(shapes)


def wanted(p: Problem) -> bool:
    """Whether online tuning applies to ``p`` (cheap: called on every dispatch when it is on)."""
    return p.device_type == "cuda" and (autotune_enabled() or (p.n, p.k) in _shapes)


def _cell(p: Problem) -> tuple:
    return (p.device_id, p.n, p.k, tables.m_bucket(p.m))


def why_not_now() -> str | None:
    """Why timing must not run at this point of the program (None when it may)."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def skipped_note(p: Problem) -> str | None:
    """Why online tuning did not run for ``p``'s cell, if it was wanted there and could not run."""
    return _skipped.get(_cell(p))


def maybe_tune(p: Problem, operands: Operands) -> bool:
    """Tune ``p``'s cell now if online tuning wants it and nothing has measured it; True when a new ranking was
    written (the dispatcher then forgets its cached choices)."""
    cell = _cell(p)
    if cell in _handled:
        return False
    dev, n, k, bucket = cell
    row = tables.lookup("dispatch", dev, n, k, bucket)
    if row is not None and row.m == bucket:
        _handled.add(cell)
        return False
    blocked = why_not_now()
    if blocked:
        # Not marked handled: the next eager call tunes the cell.
        _skipped[cell] = blocked
        return False
    _handled.add(cell)
    _skipped.pop(cell, None)
    trials = measure_backends(p, *operands())
    best = ranked(trials)
    if not best:
        return False
    order = [t.config for t in best]
    record = {"source": "online", "m": p.m, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "us": {t.config: t.us for t in best}, "bad": {t.config: t.reason or t.status for t in trials
                                                             if t.status != Status.OK}}
    try:
        tuning_cache.save(dev, {"dispatch": {f"{n},{k}": {str(bucket): order}}}, {f"{n},{k},{bucket}": record})
    except OSError as e:
        # A read-only home must not break a forward pass: keep the ranking for this process only.
        warnings.warn(f"blockfp8: cannot write the tuning cache ({type(e).__name__}: {e}); the ranking measured "
                      f"for N={n} K={k} M<={bucket} is used in this process only", stacklevel=4)
        tables.record("dispatch", dev.name, n, k, bucket, order)
    tables.invalidate()
    return True


def measure_backends(p: Problem, x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor,
                     weight_scale_inv: torch.Tensor, reps: int = ONLINE_REPS) -> list[Trial]:
    """Check and time every backend (but the reference) that supports ``p`` on these operands, L2-cold."""
    ref = reference_gemm(x_fp8, x_scale, w_fp8, weight_scale_inv, out_dtype=torch.float32)
    col = empty_scales(x_fp8.shape[0], x_scale.shape[1], "col", x_fp8.device)
    col.copy_(x_scale)
    scales = {"row": x_scale.contiguous(), "col": col}
    copies = rotated_copies((w_fp8, weight_scale_inv), factor=1)
    names = [b for b in backend_names() if b != "reference" and get_backend(b).supports(p)]

    def check(name: str) -> float:
        be = get_backend(name)
        return rel_error(be.run(x_fp8, scales[be.scale_layout], w_fp8, weight_scale_inv, None, p.out_dtype), ref)

    def measure(name: str) -> float:
        be = get_backend(name)
        xs = scales[be.scale_layout]
        return time_fn(lambda w, s: be.run(x_fp8, xs, w, s, None, p.out_dtype), rotate=copies, reps=reps,
                       hot=False).median_us

    return tune_cell(names, check, measure)


def forget() -> None:
    """Forget which cells were handled in this process (after the cache or the tables changed)."""
    _handled.clear()
    _skipped.clear()
