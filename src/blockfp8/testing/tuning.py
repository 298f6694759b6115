"""Tuning the Triton GEMM's launch configs on the device (the engine of ``blockfp8 tune``).

For each shape x M, the heuristic config (what runs untuned) and up to ``max_configs`` - 1 candidates from
``backends.triton.configs.candidate_configs`` are each checked against the reference first -- a config that
fails or gives a wrong result is reported and discarded -- then timed with L2-cold CUDA-graph replay
(``timing.py``). The fastest correct config of each cell goes into a table in the ``data/triton_configs.json``
layout (device name -> "N,K" -> str(M) -> config), which the Triton backend reads for the bucket of M values
up to each tuned M.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..backends import get_backend
from ..backends.triton.configs import candidate_configs, heuristic_config
from ..backends.triton.gemm import triton_gemm
from ..reference import TOLERANCE, rel_error
from . import Status
from .operands import make_operands
from .timing import time_fn


@dataclass
class Trial:
    """One config at one cell: ``status`` is ok, wrong (rel error above tolerance) or crashed (it raised)."""

    config: object  # TritonConfig
    status: str
    rel_error: float | None = None
    us: float | None = None
    reason: str = ""


@dataclass
class CellResult:
    name: str
    n: int
    k: int
    m: int
    trials: list[Trial]  # trials[0] is the heuristic config

    @property
    def best(self) -> Trial | None:
        ok = [t for t in self.trials if t.status == Status.OK and t.us is not None]
        return min(ok, key=lambda t: t.us) if ok else None

    @property
    def baseline(self) -> Trial | None:
        return self.trials[0] if self.trials else None


def select_candidates(m: int, n: int, k: int, max_configs: int, num_sms: int = 132,
                      incumbent: object | None = None) -> list:
    """The heuristic config first, then the ``incumbent`` (the config the shipped table holds for this cell,
    if any, so a re-tune never ends slower than what ships), then up to ``max_configs`` minus those
    distinct candidates spread evenly over ``candidate_configs(m, n, k)`` (its order sweeps tile shape,
    split and stages, so even spacing samples every kind). ``max_configs <= 0`` keeps all candidates."""
    base = heuristic_config(m, n, k, num_sms)
    head = list(dict.fromkeys([base] + ([incumbent] if incumbent is not None else [])))
    rest = list(dict.fromkeys(c for c in candidate_configs(m, n, k, num_sms) if c not in head))
    room = len(rest) if max_configs <= 0 else max(0, max_configs - len(head))
    if room < len(rest):
        if room == 0:
            rest = []
        elif room == 1:
            rest = [rest[len(rest) // 2]]
        else:
            step = (len(rest) - 1) / (room - 1)
            rest = [rest[round(i * step)] for i in range(room)]
    return [*head, *rest]


def tune_cell(configs: list, check: Callable[[object], float], measure: Callable[[object], float],
              on_bad: Callable[[Trial], None] = lambda t: None, tol: float = TOLERANCE) -> list[Trial]:
    """Check every config (``check(c)`` -> relative error), then time the correct ones (``measure(c)`` ->
    microseconds). Wrong or failing configs are never timed; ``on_bad`` hears about each."""
    trials = []
    for c in configs:
        try:
            err = check(c)
        except Exception as e:  # noqa: BLE001 - a config the kernel rejects is a result, not a crash
            trial = Trial(c, Status.CRASHED, reason=f"{type(e).__name__}: {e}".splitlines()[0][:200])
        else:
            trial = Trial(c, Status.OK if err <= tol else Status.WRONG, rel_error=err)
            if trial.status == Status.OK:
                try:
                    trial.us = measure(c)
                except Exception as e:  # noqa: BLE001
                    trial.status, trial.reason = Status.CRASHED, f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if trial.status != Status.OK:
            on_bad(trial)
        trials.append(trial)
    return trials


def tuned_table(results: list[CellResult], device: str) -> dict:
    """device -> "N,K" -> str(M) -> best config as a dict (cells with no correct config are left out)."""
    table: dict = {}
    for r in results:
        best = r.best
        if best is not None:
            table.setdefault(device, {}).setdefault(f"{r.n},{r.k}", {})[str(r.m)] = best.config.to_json()
    return table


def tune_triton_cell(weights, m: int, configs: list, reps: int, on_bad: Callable[[Trial], None]) -> list[Trial]:
    """Check and time every Triton config in ``configs`` at M=``m`` on ``weights`` (L2-cold copies)."""
    ops = make_operands(weights, m)
    ref = ops.reference()
    xs = ops.scales(get_backend("triton").scale_layout)  # the layout the backend hands the kernel
    arg_sets = [(ops.x_fp8, xs, w, s) for w, s in ops.weights]

    def check(c) -> float:
        out = triton_gemm(ops.x_fp8, xs, *ops.weights[0], config=c)
        return rel_error(out, ref)

    def measure(c) -> float:
        def fn(xq, xsc, w, s):
            return triton_gemm(xq, xsc, w, s, config=c)

        return time_fn(fn, rotate=arg_sets, reps=reps, hot=False).median_us

    return tune_cell(configs, check, measure, on_bad)


