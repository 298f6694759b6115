"""The conformance matrix behind ``blockfp8 check``: which backend is correct on which shapes, on this device.

Every available backend runs over a shape x M matrix against the reference, and each cell is classified
(``testing.Status``): ok (error within tolerance), wrong (error above it), refused (the backend's declared
limits, with the reason) or crashed (the exception). A backend that *claims* a shape and is wrong or crashes
has a bug in its declared limits. ``probe`` also runs the refused cells (limits aside) to show whether a limit
is stricter than it needs to be: that evidence is how the limits were set.

Each cell is tested two ways: ``gemm`` with row-major activation scales from the torch quantizer (what a
caller passes), and ``linear`` (bf16 in, the production path: fused quantizer writing the backend's scale
layout). The dispatched op (``backend=None``) is a column of its own.

Tolerance: what rounding explains, per output dtype (``dtype_tolerance``). Each backend is compared with the
reference computed in fp32 and rounded to the output dtype (``reference_gemm``), not with the fp32 values, so
the rounding both results share cancels. What is left:

* flips. A correct backend sums the same products in another order (on a GPU, inside each 128-wide K group,
  with the FP8 tensor cores' shorter accumulator), so its fp32 value ``b`` differs a little from the
  reference's ``r``. Rounded, the two agree except where a rounding boundary lies between ``b`` and ``r``, and
  there they differ by one unit in the last place (ulp) of the output dtype. That happens with probability
  ``|b - r| / ulp``, so a flip costs E|B - R|^2 = |b - r| * ulp, which stays below ulp^2 / 12 -- the variance
  of one rounding to nearest -- while ``|b - r|`` stays below a twelfth of an ulp. An ulp relative to its value
  is ``eps / m`` for the mantissa m in [1, 2) (``eps`` = 2^(1-p) for p significant bits); with mantissas
  spread log-uniformly E[1/m^2] = 3 / (8 ln 2), so one rounding's RMS relative error is
  ``ROUNDING_RMS * eps``, ROUNDING_RMS = sqrt(E[1/m^2] / 12) = 0.2123.
* the accumulation difference ``||b - r|| / ||r||`` itself, which shows where the output dtype is finer than
  it (fp32 output). ``ACCUMULATION`` = 2^-12 allows for the FP8 tensor cores, which keep about 14 bits when
  they sum a K group (DeepSeek-V3 technical report, section 3.3.2); fp32 accumulation is far finer.

Hence ``dtype_tolerance = ROUNDING_RMS * eps + ACCUMULATION``: 1.9e-3 for bf16 (eps = 2^-7), 4.5e-4 for fp16
(2^-10), 2.4e-4 for fp32 (2^-23). Measured against it: the Triton kernel under the CPU interpreter (fp32
accumulation) stays below 1.3e-5 for bf16 output; on an H100 every backend stayed at or below 1.4e-3 for bf16
output (median 7e-4, ``benchmarks/results/check_h100.json``). An error of 2.3e-3, which a K-tail mask bug gave
on 130 x 1000 at M = 7, passes the flat ``reference.TOLERANCE`` (5e-3, kept as the users' bound of "correct")
and fails this one; so does the truncating bf16 cast of the Triton interpreter (3.5e-3 to 3.9e-3).

An output of a handful of elements is no norm: a single flip at its largest element can exceed the bound on its
own. ``tolerance_for`` adds one ulp of the largest element, for tests that draw such outputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from ..backends import Problem, backend_names, get_backend
from ..device import as_device, device_key
from ..dispatch import choose
from ..ops import gemm, linear
from ..reference import reference_gemm, rel_error
from . import Status
from .operands import random_problem
from .shapes import Shape

DISPATCHED = "dispatched"
ROUNDING_RMS = math.sqrt(3 / (8 * math.log(2)) / 12)  # RMS relative error of one rounding, in units of eps
ACCUMULATION = 2.0**-12  # relative fp32-result difference allowed between a backend and the reference
# Statuses of results saved by earlier versions, read by ``load``.
_OLD_STATUS = {"correct": Status.OK}


@dataclass
class Cell:
    backend: str
    m: int
    n: int
    k: int
    status: str  # a testing.Status
    error: float | None = None  # the worse of the two paths
    error_gemm: float | None = None  # fp8 in, row-major scales from the torch quantizer
    error_linear: float | None = None  # bf16 in, fused quantizer, the backend's scale layout
    reason: str = ""
    probe: str = ""  # with --probe: what a refused cell does when run anyway

    @property
    def bad(self) -> bool:
        return self.status in Status.BAD


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


def dtype_tolerance(out_dtype: torch.dtype, roundings: int = 1) -> float:
    """The largest relative Frobenius error against the reference rounded to ``out_dtype`` that rounding and
    accumulation order explain (derivation in the module docstring). ``roundings``: how many times the output
    is rounded to ``out_dtype`` (2 for a backend that adds the bias in a second pass); independent roundings add
    in quadrature."""
    return math.sqrt(roundings) * ROUNDING_RMS * torch.finfo(out_dtype).eps + ACCUMULATION


def tolerance_for(ref: torch.Tensor, roundings: int = 1) -> float:
    """``dtype_tolerance`` of ``ref``'s dtype plus one ulp of ``ref``'s largest element per rounding, relative
    to ``ref``'s norm: what a single rounding flip can add to an output of few elements."""
    r = ref.detach().double()
    norm = r.norm().item()
    if norm == 0.0 or not math.isfinite(norm):
        return dtype_tolerance(ref.dtype, roundings)
    # ulp(x) = eps * 2^floor(log2 |x|) for a normal x of the output dtype.
    ulp = torch.finfo(ref.dtype).eps * 2.0 ** math.floor(math.log2(r.abs().max().item()))
    return dtype_tolerance(ref.dtype, roundings) + roundings * ulp / norm


def roundings_of(backend: str, with_bias: bool) -> int:
    """How many times ``backend`` rounds its output: twice when it adds a bias in a second pass."""
    return 1 if not with_bias or get_backend(backend).bias_epilogue else 2


def _worst(errors: list[float]) -> float:
    return max(errors, key=lambda e: (math.isnan(e), e))


def _run_cell(fn_gemm, fn_linear, ref) -> tuple[str, list[float], str]:
    try:
        errors = [rel_error(fn_gemm(), ref), rel_error(fn_linear(), ref)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - classifying every failure is the point of this command
        return Status.CRASHED, [], f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return (Status.OK if _worst(errors) <= dtype_tolerance(ref.dtype) else Status.WRONG), errors, ""


def _cell(name: str, m: int, n: int, k: int, status: str, errors: list[float], reason: str) -> Cell:
    worst = _worst(errors) if errors else None
    return Cell(name, m, n, k, status, worst, *(errors or [None, None]), reason=reason)


def check_shape(shape: Shape, m: int, backends: list[str], device: torch.device, probe: bool,
                seed: int = 0) -> list[Cell]:
    """All cells of one (M, N, K) row."""
    n, k = shape.n, shape.k
    # Block magnitudes differ by orders of ten, so a scale applied to the wrong block or group cannot hide
    # inside the tolerance.
    x, xq, xs, wq, ws = random_problem(m, n, k, seed=seed, device=device)
    # The linear path quantizes bf16 x bit-identically (tested), so one reference serves both paths: fp32,
    # rounded to the bf16 output.
    ref = reference_gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16)
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
        cell = Cell(name, m, n, k, Status.REFUSED, reason=verdict.reason)
        if probe and be.availability():
            run_raw = lambda be=be: be.run(xq, xs, wq, ws, None, torch.bfloat16)  # noqa: E731
            status, errors, why = _run_cell(run_raw, run_raw, ref)
            cell.probe = f"{status} {_worst(errors):.1e}" if errors else f"{status}: {why}"
        cells.append(cell)
    status, errors, why = _run_cell(lambda: gemm(xq, xs, wq, ws), lambda: linear(x, wq, ws), ref)
    cells.append(_cell(DISPATCHED, m, n, k, status, errors, why if status == Status.CRASHED else f"-> {choose(p)}"))
    return cells


def check_matrix(shapes: list[Shape], ms: list[int], backends: list[str] | None = None,
              device: torch.device | str | None = None, probe: bool = False, progress: bool = True) -> CheckResult:
    """Run the conformance matrix and return every cell."""
    from rich.progress import Progress

    device = as_device(device)
    names = backends or [b for b in backend_names() if get_backend(b).availability()]
    result = CheckResult(device_key(device), dtype_tolerance(torch.bfloat16))
    rows = [(s, m) for s in shapes for m in ms if m > 0]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("check", total=len(rows))
        for shape, m in rows:
            bar.update(task, description=f"M={m} N={shape.n} K={shape.k}")
            result.cells += check_shape(shape, m, names, device, probe)
            bar.advance(task)
    return result


def counts(result: CheckResult) -> dict[str, int]:
    """Cells per status (the four statuses ``check`` gives)."""
    return {s: sum(c.status == s for c in result.cells)
            for s in (Status.OK, Status.WRONG, Status.REFUSED, Status.CRASHED)}


def _md_cell(c: Cell) -> str:
    if c.status == Status.OK:
        return f"ok {c.error:.1e}" + (f" {c.reason}" if c.backend == DISPATCHED else "")
    if c.status == Status.WRONG:
        return f"**WRONG {c.error:.1e}**"
    if c.status == Status.CRASHED:
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
    lines += ["", "Totals: " + ", ".join(f"{v} {k}" for k, v in counts(result).items()) + ".", ""]
    reasons: dict[tuple[str, str], list[str]] = {}
    for c in result.cells:
        if c.status == Status.REFUSED:
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
    for c in cells:
        c.status = _OLD_STATUS.get(c.status, c.status)
    return CheckResult(data["device"], data["tolerance"], cells)


