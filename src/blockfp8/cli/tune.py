"""``blockfp8 tune``: search launch configs of blockfp8's Triton GEMM on this GPU and write a config table
(the engine is ``testing.tuning``)."""

from __future__ import annotations

import argparse
import json
from importlib import resources

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..backends.triton.configs import lookup
from ..device import cuda_identity, device_key
from ..reference import TOLERANCE
from ..tables import merge_table_file
from ..testing import Status
from ..testing.operands import make_weight_copies
from ..testing.shapes import load_shapes, parse_m_values
from ..testing.tuning import CellResult, Trial, select_candidates, tune_triton_cell, tuned_table

NEEDS_CUDA = ("this command needs a CUDA device: Triton launch configs are tuned on the GPU that runs them, "
              "and none was found")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="deepseek-v3", help="shape sets and/or N:K pairs (as for bench)")
    p.add_argument("--m", default=None, help="token counts M to tune at (default: the m_sweep of shapes.json)")
    p.add_argument("--max-configs", type=int, default=12,
                   help="configs timed per cell, the heuristic one included (0: all candidates; default 12)")
    p.add_argument("--reps", type=int, default=10, help="timed graph replays per config (default 10)")
    p.add_argument("--out", help="merge the tuned table into this JSON file (use it with BLOCKFP8_TRITON_CONFIGS)")
    p.add_argument("--install", action="store_true",
                   help="merge the tuned table into the package's data/triton_configs.json")


def _print_summary(console, results: list[CellResult]) -> None:
    t = Table(title="Triton launch configs (time per call, L2-cold)", title_justify="left")
    for h in ("shape", "N", "K", "M", "ok/wrong/crashed", "heuristic us", "best us", "gain", "best config"):
        t.add_column(h, justify="left" if h in ("shape", "best config") else "right")
    for r in results:
        counts = [sum(tr.status == s for tr in r.trials) for s in (Status.OK, Status.WRONG, Status.CRASHED)]
        best, base = r.best, r.baseline
        base_us = base.us if base is not None and base.status == Status.OK else None
        gain = f"{base_us / best.us:.2f}x" if best and base_us else "-"
        c = best.config if best else None
        cfg = "[bold red]none correct[/]"
        if c:
            flags = "".join(f" {name}" for name, on in (("swap", c.swap_ab), ("tma", c.tma), ("pair", c.pair_k)) if on)
            cfg = f"{c.block_m}x{c.block_n} split{c.split_k} g{c.group_m} w{c.num_warps} s{c.num_stages}{flags}"
        t.add_row(r.name, str(r.n), str(r.k), str(r.m), "/".join(map(str, counts)),
                  f"{base_us:.1f}" if base_us else "[red]-[/]", f"{best.us:.1f}" if best else "-", gain, cfg)
    console.print(t)


def run(args: argparse.Namespace) -> int:
    console, err = Console(), Console(stderr=True)
    if not console.is_terminal:
        console = Console(width=200)
    if not torch.cuda.is_available():
        raise ValueError(NEEDS_CUDA)
    shapes = load_shapes(args.shapes)
    ms = parse_m_values(args.m)
    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")

    device = torch.device("cuda", torch.cuda.current_device())
    name = device_key(device)
    num_sms = cuda_identity(device.index).sms

    def on_bad(t: Trial) -> None:
        why = f"rel error {t.rel_error:.3g} > {TOLERANCE}" if t.status == Status.WRONG else t.reason
        err.print(Text(f"DISCARDED {t.status.upper()} config {t.config}: {why}", style="bold red"))

    results: list[CellResult] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as progress:
        task = progress.add_task("tune", total=len(shapes) * len(ms))
        for shape in shapes:
            weights = make_weight_copies(shape.n, shape.k, device)
            for m in ms:
                progress.update(task, description=f"{shape.name} M={m}")
                configs = select_candidates(m, shape.n, shape.k, args.max_configs, num_sms,
                                            lookup(name, m, shape.n, shape.k))
                trials = tune_triton_cell(weights, m, configs, args.reps, on_bad)
                results.append(CellResult(shape.name, shape.n, shape.k, m, trials))
                progress.advance(task)
            del weights
            torch.cuda.empty_cache()

    _print_summary(console, results)
    table = tuned_table(results, name)
    targets = [args.out] if args.out else []
    if args.install:
        targets.append(str(resources.files("blockfp8") / "data" / "triton_configs.json"))
    for path in targets:
        merge_table_file(path, table)
        console.print(f"tuned configs merged into {path}")
    if not targets:
        console.print_json(json.dumps(table))
        console.print("not written: pass --out FILE (then set BLOCKFP8_TRITON_CONFIGS=FILE) or --install "
                      "(the package's data/triton_configs.json)")
    return 1 if any(r.best is None for r in results) else 0
