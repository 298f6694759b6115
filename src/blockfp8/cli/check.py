"""``blockfp8 check``: which backend is correct on which shapes, on this device (``testing.conformance``)."""

from __future__ import annotations

import argparse
import json

import torch
from rich.table import Table
from rich.text import Text

from ..backends import get_backend
from ..testing import Status
from ..testing.conformance import DISPATCHED, Cell, CheckResult, check_matrix, counts, load, markdown
from ..testing.shapes import load_shapes, parse_m_values
from .common import CellProgress, announce, plain, refuse_unused, stdout_console, write_text

GPU_SHAPES, GPU_M = "edge,deepseek-v3", "1,2,7,16,77,128,1000"
# On the CPU the Triton kernel runs in its interpreter: small shapes that still have tails in N, K and M.
CPU_SHAPES, CPU_M = "64:128,8:256,130:1000,200:300", "1,7,77"


def _cell_text(c: Cell) -> Text:
    if c.status == Status.OK:
        text = Text(f"ok {c.error:.1e}", style="green")
        if c.backend == DISPATCHED:
            text.append(f" {c.reason}", style="dim")
        return text
    if c.status == Status.WRONG:
        return Text(f"WRONG {c.error:.1e}", style="bold red")
    if c.status == Status.CRASHED:
        return Text("CRASH", style="bold red")
    return Text.assemble(("refused", "dim"), f" ({c.probe})" if c.probe else "")


def render(result: CheckResult) -> None:
    """Print the matrix, the refusal reasons and any failures (every reason as written: no markup)."""
    names = list(dict.fromkeys(c.backend for c in result.cells))
    table = Table(title=plain(f"blockfp8 check on {result.device} (ok = rel. error <= {result.tolerance:g})"))
    for col in ("M", "N", "K", *names):
        table.add_column(col, justify="right" if col in "MNK" else "left")
    rows: dict[tuple[int, int, int], dict[str, Cell]] = {}
    for c in result.cells:
        rows.setdefault((c.m, c.n, c.k), {})[c.backend] = c
    for (m, n, k), by_name in sorted(rows.items(), key=lambda r: (r[0][1], r[0][2], r[0][0])):
        table.add_row(str(m), str(n), str(k), *(_cell_text(by_name[b]) if b in by_name else "" for b in names))
    console = stdout_console()
    console.print(table)
    reasons = sorted({(c.backend, c.reason) for c in result.cells if c.status == Status.REFUSED})
    if reasons:
        console.print("[bold]Refusal reasons[/]")
        for name, why in reasons:
            console.print(plain(f"  {name}: {why}"))
    for c in result.bad_cells():
        detail = c.error if c.error is not None else c.reason
        console.print(Text.assemble((c.status.upper(), "bold red"), f" {c.backend} M={c.m} N={c.n} K={c.k}: {detail}"))
    console.print(", ".join(f"{v} {k}" for k, v in counts(result).items()))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default=None,
                   help=f"shape sets and/or N:K pairs (default: {GPU_SHAPES} on a GPU or with --full; small shapes "
                        f"{CPU_SHAPES} on CPU, where Triton runs in its interpreter)")
    p.add_argument("--m", default=None, help=f"comma-separated M values (default: {GPU_M} on a GPU or with --full; "
                                             f"{CPU_M} on CPU)")
    p.add_argument("--full", action="store_true", help="the GPU-sized defaults even on CPU (slow there)")
    p.add_argument("--backends", default=None, help="comma-separated backends (default: all available)")
    p.add_argument("--probe", action="store_true", help="also run refused cells to test the declared limits")
    p.add_argument("--json", default=None, help="write every cell to this JSON file")
    p.add_argument("--markdown", default=None, help="write the matrix as a markdown table to this file")
    p.add_argument("--from-json", default=None, help="render a saved --json result instead of running")


def _load_saved(path: str) -> CheckResult:
    try:
        return load(path)
    except (ValueError, KeyError, TypeError) as e:  # a missing file stays an OSError that names it
        raise ValueError(f"--from-json {path} is not a saved 'blockfp8 check --json' result "
                         f"({type(e).__name__}: {e})") from e


def _run_matrix(args: argparse.Namespace) -> CheckResult:
    big = args.full or torch.cuda.is_available()
    shapes = load_shapes((GPU_SHAPES if big else CPU_SHAPES) if args.shapes is None else args.shapes)
    ms = parse_m_values((GPU_M if big else CPU_M) if args.m is None else args.m)
    names = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    if names == []:
        raise ValueError("--backends names no backend")
    for name in names or ():
        get_backend(name)  # ValueError naming the known backends
    plan = f"check: {len(shapes)} shapes x {len(ms)} M values, every {'named' if names else 'available'} backend"
    small = args.shapes is None and args.m is None and not big
    announce(plan + (" (CPU-sized; the Triton kernel runs in its interpreter)" if small else ""),
             "blockfp8 check --full (GPU-sized shapes, meant for a GPU)" if small else None)
    cells: list[Cell] = []
    part = None
    with CellProgress(len(shapes), "check") as progress:
        for shape in shapes:
            where = f"N={shape.n} K={shape.k}"
            progress.step(where)
            part = check_matrix([shape], ms, names, probe=args.probe, progress=False)
            cells += part.cells
            progress.advance(where)
    return CheckResult(part.device, part.tolerance, cells)


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        refuse_unused("--from-json (it renders a saved result)", shapes=args.shapes is not None,
                      m=args.m is not None, full=args.full, backends=args.backends is not None, probe=args.probe)
    result = _load_saved(args.from_json) if args.from_json else _run_matrix(args)
    render(result)
    if args.markdown:
        write_text(args.markdown, markdown(result))
    if args.json:
        write_text(args.json, json.dumps(result.to_json(), indent=1))
    return 1 if result.bad_cells() else 0
