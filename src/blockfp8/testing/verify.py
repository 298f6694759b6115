"""Is the dispatcher right on this device? The engine of ``blockfp8 tune --verify``.

One run, one process, on this GPU as a new user meets it: no shipped row for this device (the rows of other
devices stay), and an empty tuning cache in a temporary folder (the user's own cache is not touched).

1. Per cell (shape x M; gemm mode: fp8 activation and scales in, bf16 out), before tuning: the dispatched op
   ``blockfp8.gemm`` under the static rules alone (no table of any device: ``static``), and as a new user of
   this device gets it (the rules, and rows of other devices of its family through the nearest-shape lookup:
   ``untuned``); every backend with the launch config it runs untuned.
2. ``blockfp8 tune`` over every cell (``tuning.tune``, into the temporary cache), its wall time measured.
3. Every backend again, now with its tuned launch config, and the dispatched op (``tuned``).

A cell's oracle is the fastest correct backend time of steps 1 and 3. A policy's score at a cell is oracle time
/ dispatched time (0 when the dispatched op failed or was wrong); the summary gives the geomean over the decode
cells (M <= 64) and over the prefill cells, and the worst cell. Every time is the bench's L2-cold CUDA-graph
measurement (``bench.measure``) with the same number of replays.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .. import dispatch, tables, tuning_cache
from ..autotune import set_autotune
from ..device import device_key
from ..format import is_decode
from . import Status
from .bench import Record, gpu_backends, measure
from .methods import methods_for
from .operands import make_operands, make_weight_copies
from .shapes import Shape
from .tuning import TuneRun, tune

POLICIES = ("static", "untuned", "tuned")
# The acceptance of the dispatcher (issue #19): policy -> (least geomean per phase, least single cell or None).
TARGETS = {"tuned": (0.98, 0.90), "untuned": (0.95, None), "static": (0.95, None)}


@contextmanager
def fresh_cache() -> Iterator[str]:
    """A temporary, empty tuning cache for the duration (the user's cache folder is left as it was), with online
    tuning off (it would measure the cells the dispatched op is timed on)."""
    before = os.environ.get(tuning_cache.ENV_DIR)
    with tempfile.TemporaryDirectory(prefix="blockfp8-verify-") as folder:
        os.environ[tuning_cache.ENV_DIR] = folder
        set_autotune(False)
        dispatch.clear_caches()
        try:
            yield folder
        finally:
            if before is None:
                os.environ.pop(tuning_cache.ENV_DIR, None)
            else:
                os.environ[tuning_cache.ENV_DIR] = before
            set_autotune(None)
            tables.exclude()
            dispatch.clear_caches()


def use_policy(policy: str, device_name: str) -> None:
    """Make the dispatcher see the tables ``policy`` allows (see the module docstring)."""
    if policy == "static":
        tables.exclude(sources=("shipped", "cache", "recorded", "override"))
    else:
        tables.exclude(sources=("recorded", "override"), shipped_of=(device_name,))
    dispatch.clear_caches()


def _measure_pass(shapes: list[Shape], ms: list[int], device: torch.device, reps: int, policies: tuple[str, ...],
                  cells: dict, step: str, on_cell: Callable[[str], None]) -> None:
    """Time every backend and, under each of ``policies``, the dispatched op, at every cell."""
    name = device_key(device)
    methods = methods_for(list(gpu_backends()), [], dispatched=True)
    backends, dispatched = methods[:-1], methods[-1]
    for shape in shapes:
        weights = make_weight_copies(shape.n, shape.k, device)
        for m in ms:
            on_cell(f"{step}: {shape.name} M={m}")
            ops = make_operands(weights, m)
            ref = ops.reference()
            cell = cells.setdefault((shape.name, shape.n, shape.k, m), {"backends": {}})
            for policy in policies:
                use_policy(policy, name)
                cell[policy] = measure(dispatched, "gemm", ops, ref, shape, reps=reps, l2_cold=True)
            for method in backends:
                cell["backends"][f"{method.name} ({step})"] = measure(method, "gemm", ops, ref, shape, reps=reps,
                                                                      l2_cold=True)
            del ops, ref
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()


def oracle(cell: dict) -> Record | None:
    """The fastest correct backend record of a cell."""
    ok = [r for r in cell["backends"].values() if r.status == Status.OK and r.us]
    return min(ok, key=lambda r: r.us) if ok else None


def score(cell: dict, policy: str) -> float:
    """oracle time / dispatched time under ``policy`` (0 when the dispatched op was not correct)."""
    best, got = oracle(cell), cell.get(policy)
    if best is None or got is None or got.status != Status.OK or not got.us:
        return 0.0
    return best.us / got.us


def summarize(cells: dict) -> dict:
    """Per policy and phase: geomean and worst score, the worst cell, and whether the targets are met."""
    out: dict = {}
    for policy in POLICIES:
        least_geo, least_cell = TARGETS[policy]
        out[policy] = {"pass": True}
        for phase in ("decode", "prefill"):
            scored = [(score(c, policy), key) for key, c in cells.items() if policy in c and is_decode(key[3]) ==
                      (phase == "decode")]
            if not scored:
                continue
            geo = math.exp(sum(math.log(max(s, 1e-9)) for s, _ in scored) / len(scored))
            worst, worst_key = min(scored)
            ok = geo >= least_geo and (least_cell is None or worst >= least_cell)
            out[policy][phase] = {"geomean": geo, "worst": worst, "worst_cell": list(worst_key), "cells": len(scored)}
            out[policy]["pass"] = out[policy]["pass"] and ok
    return out


def cell_rows(cells: dict) -> list[dict]:
    """One JSON-ready row per cell: the oracle and each policy's choice, time and score."""
    rows = []
    for (name, n, k, m), cell in cells.items():
        best = oracle(cell)
        row = {"shape": name, "n": n, "k": k, "m": m, "oracle": best.method if best else None,
               "oracle_us": best.us if best else None,
               "backends": {label: r.us if r.status == Status.OK else r.status
                            for label, r in cell["backends"].items()}}
        for policy in POLICIES:
            rec = cell.get(policy)
            row[policy] = {"choice": rec.label.replace("blockfp8->", "") if rec else None,
                           "us": rec.us if rec else None, "status": rec.status if rec else None,
                           "score": score(cell, policy)}
        rows.append(row)
    return rows


def verify(shapes: list[Shape], ms: list[int], device: torch.device, *, reps: int = 20, tune_reps: int = 20,
           max_configs: int = 4, gluon_configs: int = 3, warm_procs: int = 0,
           on_plan: Callable[[int], None] = lambda total: None,
           on_cell: Callable[[str], None] = lambda s: None) -> tuple[dict, TuneRun]:
    """Run the three steps of the module docstring; returns (cells, the tune run)."""
    cells: dict = {}
    with fresh_cache():
        on_plan(2 * len(shapes) * len(ms))
        _measure_pass(shapes, ms, device, reps, ("static", "untuned"), cells, "untuned", on_cell)
        use_policy("untuned", device_key(device))
        run = tune(shapes, ms, device, max_configs=max_configs, gluon_configs=gluon_configs, reps=tune_reps,
                   force=True, warm_procs=warm_procs)
        use_policy("tuned", device_key(device))
        _measure_pass(shapes, ms, device, reps, ("tuned",), cells, "tuned", on_cell)
    return cells, run
