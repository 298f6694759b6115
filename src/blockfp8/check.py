"""``blockfp8 check`` and ``blockfp8 explain``: which backend is correct on which shapes, on this device.

``check`` runs every available backend over a shape x M matrix against the reference and classifies each
cell: correct (error), wrong (error > tolerance), refused (the backend's declared limits, with the reason)
or crashed (the exception). A backend that *claims* a shape and is wrong or crashes has a bug in its
declared limits -- the command exits non-zero. ``--probe`` also runs the refused cells (limits aside) to
show whether a limit is stricter than it needs to be: that evidence is how the limits were set.

Each cell is tested two ways: ``gemm`` with row-major activation scales from the torch quantizer (what a
caller passes), and ``linear`` (bf16 in, the production path: fused quantizer writing the backend's scale
layout). The dispatched op (``backend=None``) is a column of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

import torch

from .backends import Problem, backend_names, get_backend
from .dispatch import choose, explain
from .ops import gemm, linear
from .quant import cdiv, quantize_activation, quantize_weight
from .reference import TOLERANCE, reference_gemm, rel_error
from .shapes import Shape, parse_ints, parse_shapes

DISPATCHED = "dispatched"
GPU_M = "1,2,7,16,77,128,1000"
CPU_SHAPES, CPU_M = "64:128,8:256,130:1000,200:300", "1,7,77"


@dataclass
class Cell:
    backend: str
    m: int
    n: int
    k: int
    status: str  # correct | wrong | refused | crashed
    error: float | None = None  # the worse of the two paths
    error_gemm: float | None = None  # fp8 in, row-major scales from the torch quantizer
    error_linear: float | None = None  # bf16 in, fused quantizer, the backend's scale layout
    reason: str = ""
    probe: str = ""  # with --probe: what a refused cell does when run anyway

    @property
    def bad(self) -> bool:
        return self.status in ("wrong", "crashed")


@dataclass
class CheckResult:
    device: str
    tolerance: float
    cells: list[Cell] = field(default_factory=list)

    def bad_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.bad]

    def to_json(self) -> dict:
        return {"device": self.device, "tolerance": self.tolerance, "torch": torch.__version__,
                "cells": [asdict(c) for c in self.cells]}


def _operands(m: int, n: int, k: int, device: torch.device, seed: int):
    """Weights whose 128x128 blocks differ in magnitude by orders of ten, so a scale applied to the wrong
    block or group cannot hide inside the tolerance; activations with per-token magnitudes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    block = torch.exp(torch.randn(cdiv(n, 128), cdiv(k, 128), generator=g) * 2.0)
    w = torch.randn(n, k, generator=g) * block.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    wq, ws = quantize_weight(w.to(device))
    return x.to(device=device, dtype=torch.bfloat16), wq, ws


def _worst(errors: list[float]) -> float:
    return max(errors, key=lambda e: (math.isnan(e), e))


def _run_cell(fn_gemm, fn_linear, ref) -> tuple[str, list[float], str]:
    try:
        errors = [rel_error(fn_gemm(), ref), rel_error(fn_linear(), ref)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - classifying every failure is the point of this command
        return "crashed", [], f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return ("correct" if _worst(errors) <= TOLERANCE else "wrong"), errors, ""


def _cell(name: str, m: int, n: int, k: int, status: str, errors: list[float], reason: str) -> Cell:
    worst = _worst(errors) if errors else None
    return Cell(name, m, n, k, status, worst, *(errors or [None, None]), reason=reason)


def check_shape(shape: Shape, m: int, backends: list[str], device: torch.device, probe: bool,
                seed: int = 0) -> list[Cell]:
    """All cells of one (M, N, K) row."""
    n, k = shape.n, shape.k
    x, wq, ws = _operands(m, n, k, device, seed)
    xq, xs = quantize_activation(x)
    # The linear path quantizes bf16 x bit-identically (tested), so one reference serves both paths.
    ref = reference_gemm(xq, xs, wq, ws)
    p = Problem.of(m, n, k, device)
    cells = []
    for name in backends:
        be = get_backend(name)
        verdict = be.supports(p)
        if verdict:
            status, errors, why = _run_cell(lambda name=name: gemm(xq, xs, wq, ws, backend=name),
                                            lambda name=name: linear(x, wq, ws, backend=name), ref)
            cells.append(_cell(name, m, n, k, status, errors, why))
            continue
        cell = Cell(name, m, n, k, "refused", reason=verdict.reason)
        if probe and be.is_available():
            run_raw = lambda be=be: be.run(xq, xs, wq, ws, None, torch.bfloat16)  # noqa: E731
            status, errors, why = _run_cell(run_raw, run_raw, ref)
            cell.probe = f"{status} {_worst(errors):.1e}" if errors else f"{status}: {why}"
        cells.append(cell)
    status, errors, why = _run_cell(lambda: gemm(xq, xs, wq, ws), lambda: linear(x, wq, ws), ref)
    cells.append(_cell(DISPATCHED, m, n, k, status, errors, why if status == "crashed" else f"-> {choose(p)}"))
    return cells


def check_matrix(shapes: list[Shape], ms: list[int], backends: list[str] | None = None,
              device: torch.device | str | None = None, probe: bool = False, progress: bool = True) -> CheckResult:
    """Run the conformance matrix and return every cell."""
    from rich.progress import Progress

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = backends or [b for b in backend_names() if get_backend(b).is_available()]
    result = CheckResult(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", TOLERANCE)
    rows = [(s, m) for s in shapes for m in ms if m > 0]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("check", total=len(rows))
        for shape, m in rows:
            bar.update(task, description=f"M={m} N={shape.n} K={shape.k}")
            result.cells += check_shape(shape, m, names, device, probe)
            bar.advance(task)
    return result


def _cell_text(c: Cell) -> str:
    if c.status == "correct":
        return f"[green]ok {c.error:.1e}[/]"
    if c.status == "wrong":
        return f"[bold red]WRONG {c.error:.1e}[/]"
    if c.status == "crashed":
        return "[bold red]CRASH[/]"
    return f"[dim]refused[/]{' (' + c.probe + ')' if c.probe else ''}"


def render(result: CheckResult) -> None:
    """Print the matrix, the refusal reasons and any failures."""
    from rich.console import Console
    from rich.table import Table

    names = list(dict.fromkeys(c.backend for c in result.cells))
    table = Table(title=f"blockfp8 check on {result.device} (correct = rel. error <= {result.tolerance:g})")
    for col in ("M", "N", "K", *names):
        table.add_column(col, justify="right" if col in "MNK" else "left")
    rows: dict[tuple[int, int, int], dict[str, Cell]] = {}
    for c in result.cells:
        rows.setdefault((c.m, c.n, c.k), {})[c.backend] = c
    for (m, n, k), by_name in sorted(rows.items(), key=lambda r: (r[0][1], r[0][2], r[0][0])):
        texts = [_cell_text(by_name[b]) + (f" [dim]{by_name[b].reason}[/]" if b == DISPATCHED and
                 by_name[b].status == "correct" else "") for b in names]
        table.add_row(str(m), str(n), str(k), *texts)
    console = Console()
    console.print(table)
    reasons = sorted({(c.backend, c.reason) for c in result.cells if c.status == "refused"})
    if reasons:
        console.print("[bold]Refusal reasons[/]")
        for name, why in reasons:
            console.print(f"  {name}: {why}")
    for c in result.bad_cells():
        console.print(f"[bold red]{c.status.upper()}[/] {c.backend} M={c.m} N={c.n} K={c.k}: "
                      f"{c.error if c.error is not None else c.reason}")
    counts = {s: sum(c.status == s for c in result.cells) for s in ("correct", "wrong", "refused", "crashed")}
    console.print(", ".join(f"{v} {k}" for k, v in counts.items()))


def _md_cell(c: Cell) -> str:
    if c.status == "correct":
        return f"ok {c.error:.1e}" + (f" {c.reason}" if c.backend == DISPATCHED else "")
    if c.status == "wrong":
        return f"**WRONG {c.error:.1e}**"
    if c.status == "crashed":
        return f"**CRASH** {c.reason}"
    return "refused" + (f" (run anyway: {c.probe.split(':')[0]})" if c.probe else "")


def markdown(result: CheckResult) -> str:
    """The matrix as a markdown table, then each backend's refusal reasons and what --probe found."""
    names = list(dict.fromkeys(c.backend for c in result.cells))
    rows: dict[tuple[int, int, int], dict[str, Cell]] = {}
    for c in result.cells:
        rows.setdefault((c.m, c.n, c.k), {})[c.backend] = c
    lines = [f"| M | N | K | {' | '.join(names)} |", "|" + "---:|" * 3 + "---|" * len(names)]
    for (m, n, k), by in sorted(rows.items(), key=lambda r: (r[0][1], r[0][2], r[0][0])):
        lines.append(f"| {m} | {n} | {k} | " + " | ".join(_md_cell(by[b]) if b in by else "" for b in names) + " |")
    counts = {s: sum(c.status == s for c in result.cells) for s in ("correct", "wrong", "refused", "crashed")}
    lines += ["", "Totals: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", ""]
    reasons: dict[tuple[str, str], list[str]] = {}
    for c in result.cells:
        if c.status == "refused":
            reasons.setdefault((c.backend, c.reason), []).append(c.probe or "not probed")
    if reasons:
        lines += ["| backend | refusal reason | cells | when run anyway (--probe), e.g. |", "|---|---|---:|---|"]
        for (name, why), probes in sorted(reasons.items()):
            kinds = sorted({p.split(":")[0].split(" ")[0] for p in probes})
            lines.append(f"| {name} | {why} | {len(probes)} | {'/'.join(kinds)}: {probes[0].split(': ', 1)[-1]} |")
    return "\n".join(lines) + "\n"


def load(path: str) -> CheckResult:
    """A result saved with ``--json``."""
    with open(path) as f:
        data = json.load(f)
    fields = set(Cell.__dataclass_fields__)
    cells = [Cell(**{k: v for k, v in c.items() if k in fields}) for c in data["cells"]]
    return CheckResult(data["device"], data["tolerance"], cells)


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


def add_explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("m", type=int)
    p.add_argument("n", type=int)
    p.add_argument("k", type=int)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default=None, help="show what forcing this backend would do")


def run_explain(args: argparse.Namespace) -> int:
    ex = explain(args.m, args.n, args.k, device=args.device, backend=args.backend)
    print(ex)
    return 0 if ex.choice else 1
