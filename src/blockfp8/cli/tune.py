"""``blockfp8 tune``: measure which backend and which launch config is fastest for each shape x M on this GPU and
keep the result in the user's tuning cache, which the dispatcher reads in every later process (the engine is
``testing.tuning``; ``--verify`` runs ``testing.verify``)."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .. import tables, tuning_cache
from ..backends import backend_names
from ..device import device_id
from ..reference import TOLERANCE
from ..testing import Status
from ..testing.environment import environment
from ..testing.shapes import LinearLayer, Shape, layer_shapes, load_shapes, model_shapes, parse_m_values
from ..testing.tuning import Candidate, CellResult, Trial, TuneRun, tune
from ..testing.verify import POLICIES, TARGETS, cell_rows, summarize, verify
from .common import int_at_least, parse_names, positive_int, refuse_unused

NEEDS_CUDA = ("blockfp8 tune needs a CUDA device: backends and launch configs are measured on the GPU that runs "
              "them, and none was found")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default=None,
                   help="shape sets of data/shapes.json and/or N:K pairs (default: deepseek-v3 without --model)")
    p.add_argument("--model", help="a model folder: its safetensors checkpoint (block-FP8 or float) or, without "
                                   "weights, its transformers config.json")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel ranks: tune the local shapes (q/k/v/gate/up/qkv/gate_up_proj split N, "
                        "o_proj/down_proj split K, other layers whole; default 1)")
    p.add_argument("--fused", action="store_true",
                   help="with --model: also tune the stacked GEMMs hf.fuse_producers builds, so that a fused model "
                        "runs tuned shapes: q+k+v as one qkv_proj (where q's and k's N are multiples of 128) and "
                        "gate+up as one gate_up_proj (where gate's N is); the separate shapes stay for unfused runs "
                        "(--tp 1 only)")
    p.add_argument("--m", default=None, help="token counts M to tune at (default: 1,16,64,128,512,2048,4096)")
    p.add_argument("--backends", default=None, help=f"backends to measure (default: {','.join(backend_names())})")
    p.add_argument("--max-configs", type=int_at_least(0), default=4,
                   help="Triton launch configs per cell, the current one and the heuristic included (0: all; "
                        "default 4)")
    p.add_argument("--gluon-configs", type=int_at_least(0), default=3,
                   help="Gluon launch configs per cell (0: all; default 3)")
    p.add_argument("--reps", type=positive_int, default=20,
                   help="timed rounds per cell, each replaying every candidate's graph once in a shuffled order "
                        "(default 20)")
    p.add_argument("--force", action="store_true", help="measure again the cells the cache already holds")
    p.add_argument("--warm-procs", type=int_at_least(0), default=min(16, os.cpu_count() or 1),
                   help="processes that compile every candidate before timing (0: compile while timing; "
                        "default: min(16, CPU cores), fewer where the free GPU memory holds fewer)")
    p.add_argument("--list", action="store_true", help="print the shapes and cells that would be tuned, then stop")
    p.add_argument("--install", action="store_true",
                   help="also merge this device's tuned rows into the package data (to ship them)")
    p.add_argument("--verify", action="store_true",
                   help="measure the dispatcher against the per-cell oracle, untuned and after tuning into a "
                        "temporary cache (this device's shipped rows hidden; the user's cache untouched)")
    p.add_argument("--verify-reps", type=positive_int, default=20, help="graph replays per op in --verify (default 20)")
    p.add_argument("--json", help="write the results (tuned cells, or the --verify report) to this JSON file")


def _shapes(args: argparse.Namespace) -> list[Shape]:
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    if args.fused and not args.model:
        raise ValueError("--fused adds the stacked q/k/v and gate/up shapes of a model's layers: name the model "
                         "with --model DIR")
    shapes = model_shapes(args.model, args.tp, stacked=args.fused) if args.model else []
    if args.shapes or not args.model:
        named = load_shapes(args.shapes or "deepseek-v3")
        shapes += [Shape(n, k, s.name if (n, k) == (s.n, s.k) else f"{s.name} (TP{args.tp})")
                   for s in named for n, k in layer_shapes(LinearLayer(s.name, s.n, s.k), args.tp)]
    unique: dict[tuple[int, int], Shape] = {}
    for s in shapes:
        unique.setdefault((s.n, s.k), s)
    return list(unique.values())


def _short(c: Candidate | None) -> str:
    if c is None:
        return "-"
    if c.config is None:
        return c.backend
    d = asdict(c.config)
    extra = "".join(f" {flag}" for flag in ("swap_ab", "tma", "pair_k") if d.get(flag))
    split = f" split{d['split_k']}" if d.get("split_k", 1) > 1 else ""
    return (f"{c.backend} {d['block_m']}x{d['block_n']}{split} w{d['num_warps']} "
            f"s{d.get('num_stages', d.get('stages'))}{extra}")


def _tune_table(results: list[CellResult]) -> Table:
    t = Table(title="tuned cells (time per call, L2-cold)", title_justify="left")
    for h in ("shape", "N", "K", "M", "ok/wrong/crashed", "before tuning", "us", "tuned", "us", "gain"):
        t.add_column(h, justify="left" if h in ("shape", "before tuning", "tuned") else "right")
    for r in results:
        counts = "/".join(str(sum(tr.status == s for tr in r.trials))
                          for s in (Status.OK, Status.WRONG, Status.CRASHED))
        best, default = r.chosen, r.default_trial
        base_us = default.us if default and default.status == Status.OK else None
        gain = f"{base_us / best.us:.2f}x" if best and base_us else "-"
        t.add_row(r.name, str(r.n), str(r.k), str(r.m), counts, _short(r.default), f"{base_us:.1f}" if base_us else "-",
                  _short(best.config) if best else "[bold red]none correct[/]", f"{best.us:.1f}" if best else "-", gain)
    return t


def _install(dev) -> list[str]:
    """Merge this device's cached rows into the package data; returns the files written."""
    found = tuning_cache.load(dev)
    written = []
    for kind, (name, _) in tables.KINDS.items():
        if found and found.tables[kind]:
            tables.merge_table_file(tables.data_path(name), {dev.name: found.tables[kind]}, kind)
            written.append(name)
    path = tables.data_path(tables.DEVICES_FILE)
    devices = json.loads(path.read_text())
    devices[dev.name] = {"capability": list(dev.arch), "sms": dev.sms}
    tuning_cache.write_atomic(path, json.dumps(devices, indent=1) + "\n")
    return [*written, tables.DEVICES_FILE]


def _progress(err: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=err)


def run(args: argparse.Namespace) -> int:
    console, err = Console(), Console(stderr=True)
    if not console.is_terminal:
        console = Console(width=200)
    shapes = _shapes(args)
    ms = parse_m_values(args.m)
    backends = parse_names(args.backends, backend_names(), backend_names(), "--backends")
    if args.list:
        refuse_unused("--list (it prints the cells and stops)", verify=args.verify, install=args.install,
                      force=args.force, json=bool(args.json))
        for s in shapes:
            console.print(f"{s.name}: N={s.n} K={s.k}")
        console.print(f"{len(shapes)} shapes x {len(ms)} M values (M = {', '.join(map(str, ms))}) = "
                      f"{len(shapes) * len(ms)} cells")
        return 0
    if not torch.cuda.is_available():
        raise ValueError(NEEDS_CUDA)
    device = torch.device("cuda", torch.cuda.current_device())
    if args.verify:
        return _run_verify(args, shapes, ms, device, console, err)

    def on_bad(t: Trial) -> None:
        why = f"rel error {t.rel_error:.3g} > {TOLERANCE}" if t.status == Status.WRONG else t.reason
        err.print(Text(f"DISCARDED {t.status.upper()} {t.config.label}: {why}", style="bold red"))

    t0 = time.perf_counter()
    try:
        with _progress(err) as progress:
            task = progress.add_task("tune", total=None)
            result = tune(shapes, ms, device, backends=backends, max_configs=args.max_configs,
                          gluon_configs=args.gluon_configs, reps=args.reps, force=args.force,
                          warm_procs=args.warm_procs,
                          on_plan=lambda total: progress.update(task, total=total, description="compiling candidates"),
                          on_cell=lambda s: (progress.update(task, description=s), progress.advance(task)),
                          on_bad=on_bad)
    except OSError as e:
        raise OSError(f"cannot write the tuning cache in {tuning_cache.cache_dir()}: {e} (set "
                      f"{tuning_cache.ENV_DIR} to a writable folder); the shapes finished before are kept") from e
    total_s = time.perf_counter() - t0
    return _report_tune(args, result, total_s, device, console)


def _report_tune(args: argparse.Namespace, result: TuneRun, total_s: float, device: torch.device,
                 console: Console) -> int:
    if result.results:
        console.print(_tune_table(result.results))
    if result.skipped:
        console.print(f"{len(result.skipped)} cells already in the cache were skipped (--force measures them again)")
    for cell, labels in result.warm_failures.items():
        console.print(f"[dim]compiling at M={cell[0]} N={cell[1]} K={cell[2]} failed for: {', '.join(labels)}[/]")
    console.print(f"tuned {len(result.results)} cells in {total_s:.1f} s (compiling {result.warm_s:.1f} s, measuring "
                  f"{result.measure_s:.1f} s)")
    dev = device_id(device)
    path = result.path or str(tuning_cache.cache_path(tuning_cache.cache_key(dev)))
    console.print(f"tuning cache: {path} (read by the dispatcher in every process on this device and software)")
    if args.install:
        console.print(f"merged into the package data: {', '.join(_install(dev))}")
    if args.json:
        found = tuning_cache.load(dev)
        cells = found.cells if found else {}
        report = {"environment": environment(device), "total_s": total_s, "warm_s": result.warm_s,
                  "measure_s": result.measure_s, "cache": path,
                  "cells": {key: cells.get(key) for key in (f"{r.n},{r.k},{r.m}" for r in result.results)}}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        console.print(f"results written to {args.json}")
    return 1 if any(r.best is None for r in result.results) else 0


def _verify_table(rows: list[dict]) -> Table:
    t = Table(title="dispatched gemm vs the per-cell oracle (oracle us / dispatched us)", title_justify="left")
    for h in ("shape", "N", "K", "M", "oracle", "us", *POLICIES):
        t.add_column(h, justify="left" if h in ("shape", "oracle", *POLICIES) else "right")
    for r in rows:
        cols = []
        for policy in POLICIES:
            d = r[policy]
            mark = "red" if d["score"] < 0.9 else ("yellow" if d["score"] < 0.98 else "green")
            cols.append(f"{d['choice'] or '-'} {d['us'] or 0:.1f} [{mark}]{d['score']:.2f}[/]")
        t.add_row(r["shape"], str(r["n"]), str(r["k"]), str(r["m"]), r["oracle"] or "-",
                  f"{r['oracle_us']:.1f}" if r["oracle_us"] else "-", *cols)
    return t


def _run_verify(args: argparse.Namespace, shapes: list[Shape], ms: list[int], device: torch.device,
                console: Console, err: Console) -> int:
    t0 = time.perf_counter()
    with _progress(err) as progress:
        task = progress.add_task("verify", total=None)
        cells, run = verify(shapes, ms, device, reps=args.verify_reps, tune_reps=args.reps,
                            max_configs=args.max_configs, gluon_configs=args.gluon_configs,
                            warm_procs=args.warm_procs,
                            on_plan=lambda total: progress.update(task, total=total),
                            on_cell=lambda s: (progress.update(task, description=s), progress.advance(task)))
    rows = cell_rows(cells)
    summary = summarize(cells)
    tune_s = run.warm_s + run.measure_s
    console.print(_verify_table(rows))
    console.print(f"tune: {len(run.results)} cells in {tune_s:.1f} s (compiling {run.warm_s:.1f} s, measuring "
                  f"{run.measure_s:.1f} s); whole verification {time.perf_counter() - t0:.0f} s")
    for policy in POLICIES:
        s = summary[policy]
        least_geo, least_cell = TARGETS[policy]
        target = f">= {least_geo} geomean per phase" + (f", every cell >= {least_cell}" if least_cell else "")
        parts = [f"{phase} {s[phase]['geomean']:.3f} (worst {s[phase]['worst']:.2f} at "
                 f"{s[phase]['worst_cell'][0]} M={s[phase]['worst_cell'][3]})" for phase in ("decode", "prefill")
                 if phase in s]
        verdict = "[green]PASS[/]" if s["pass"] else "[bold red]FAIL[/]"
        console.print(f"{policy:8s} {'; '.join(parts)}  target {target}: {verdict}")
    if args.json:
        report = {"environment": environment(device), "arguments": {k: v for k, v in vars(args).items()},
                  "tune_s": tune_s, "warm_s": run.warm_s, "measure_s": run.measure_s, "targets": TARGETS,
                  "summary": summary, "cells": rows}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        console.print(f"report written to {args.json}")
    return 0 if all(summary[p]["pass"] for p in POLICIES) else 1
