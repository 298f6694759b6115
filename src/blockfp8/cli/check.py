"""``blockfp8 check``: which backend is correct on which shapes, on this device (``testing.conformance``)."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from rich.console import Console
from rich.table import Table

from ..backends import get_backend
from ..testing import Status
from ..testing.conformance import DISPATCHED, Cell, CheckResult, check_matrix, counts, load, markdown
from ..testing.shapes import parse_ints, parse_shapes

GPU_M = "1,2,7,16,77,128,1000"
CPU_SHAPES, CPU_M = "64:128,8:256,130:1000,200:300", "1,7,77"


def _cell_text(c: Cell) -> str:
    if c.status == Status.OK:
        return f"[green]ok {c.error:.1e}[/]"
    if c.status == Status.WRONG:
        return f"[bold red]WRONG {c.error:.1e}[/]"
    if c.status == Status.CRASHED:
        return "[bold red]CRASH[/]"
    return f"[dim]refused[/]{' (' + c.probe + ')' if c.probe else ''}"


def render(result: CheckResult) -> None:
    """Print the matrix, the refusal reasons and any failures."""
    names = list(dict.fromkeys(c.backend for c in result.cells))
    table = Table(title=f"blockfp8 check on {result.device} (ok = rel. error <= {result.tolerance:g})")
    for col in ("M", "N", "K", *names):
        table.add_column(col, justify="right" if col in "MNK" else "left")
    rows: dict[tuple[int, int, int], dict[str, Cell]] = {}
    for c in result.cells:
        rows.setdefault((c.m, c.n, c.k), {})[c.backend] = c
    for (m, n, k), by_name in sorted(rows.items(), key=lambda r: (r[0][1], r[0][2], r[0][0])):
        texts = [_cell_text(by_name[b]) + (f" [dim]{by_name[b].reason}[/]" if b == DISPATCHED and
                 by_name[b].status == Status.OK else "") for b in names]
        table.add_row(str(m), str(n), str(k), *texts)
    console = Console()
    console.print(table)
    reasons = sorted({(c.backend, c.reason) for c in result.cells if c.status == Status.REFUSED})
    if reasons:
        console.print("[bold]Refusal reasons[/]")
        for name, why in reasons:
            console.print(f"  {name}: {why}", markup=False)
    for c in result.bad_cells():
        console.print(f"[bold red]{c.status.upper()}[/] {c.backend} M={c.m} N={c.n} K={c.k}: "
                      f"{c.error if c.error is not None else c.reason}")
    console.print(", ".join(f"{v} {k}" for k, v in counts(result).items()))


def add_arguments(p: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    p.add_argument("--shapes", default="edge,deepseek-v3" if gpu else CPU_SHAPES,
                   help="shape sets and/or N:K pairs (default: edge,deepseek-v3 on a GPU; small shapes on CPU, "
                        "where Triton runs in its interpreter)")
    p.add_argument("--m", default=GPU_M if gpu else CPU_M, help="comma-separated M values")
    p.add_argument("--backends", default=None, help="comma-separated backends (default: all available)")
    p.add_argument("--probe", action="store_true", help="also run refused cells to test the declared limits")
    p.add_argument("--json", default=None, help="write every cell to this JSON file")
    p.add_argument("--markdown", default=None, help="write the matrix as a markdown table to this file")
    p.add_argument("--from-json", default=None, help="render a saved --json result instead of running")


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        result = load(args.from_json)
    else:
        try:
            shapes, ms = parse_shapes(args.shapes), parse_ints(args.m)
            names = args.backends.split(",") if args.backends else None
            for name in names or ():
                get_backend(name)  # ValueError naming the known backends
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        result = check_matrix(shapes, ms, names, probe=args.probe)
    render(result)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=1)
    return 1 if result.bad_cells() else 0
