"""The measuring engine of ``blockfp8 bench``: every method at every (shape, M) cell, checked against the
reference, timed, and set against the hardware ceilings.

Every cell is timed two ways: ``gemm`` (fp8 activation and scales in, bf16 out) and ``linear`` (bf16 in, bf16
out, the method's own activation quantization included). Timing is CUDA-graph replay over L2-cold weight copies
(``timing.py``). What FLOPs, bytes, the percentages of the ceilings and the speedup over the best peer mean is
spelled out in ``DEFINITIONS`` below, which is also written into the JSON.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from ..backends import Problem, backend_names
from ..device import device_key
from ..format import cdiv
from ..reference import TOLERANCE, rel_error
from . import Status
from .methods import Method, counts_as_peer, external_backends
from .operands import Operands, make_operands, make_weight_copies
from .shapes import Shape
from .timing import Ceilings, Timing, time_fn

DEFINITIONS = {
    "flops": "2*M*N*K",
    "bytes": "compulsory traffic of the fp8 GEMM, the same for every method of a row: fp8 weight N*K + fp32 "
             "weight scales 4*ceil(N/128)*ceil(K/128) + fp8 activation M*K + fp32 activation scales "
             "4*M*ceil(K/128) + bf16 output 2*M*N (bf16 and linear-mode methods move more: their GB/s is "
             "effective bandwidth)",
    "pct_bw": "bytes / time / measured copy bandwidth",
    "pct_fp8": "FLOPs / time / measured dense FP8 throughput",
    "pct_roofline": "max(bytes / copy bandwidth, FLOPs / FP8 throughput) / time",
    "speedup": "best peer's median time / the dispatched op's median time, same mode; peers are outside "
               "implementations: bf16 (cuBLAS), torchao, and the cuBLAS and DeepGEMM backends -- not blockfp8's "
               f"own Triton kernel nor the reference; only correct results count. External backends: "
               f"{', '.join(external_backends())}",
    "correct": f"relative Frobenius error against the fp32 reference GEMM <= {TOLERANCE}",
    "time": "median per-call time over graph replays; p10/p90 alongside; l2_hot_us: same op on one weight copy",
}

MODES = ("gemm", "linear")
GPU_PEERS = ("bf16", "torchao")


def gpu_backends() -> tuple[str, ...]:
    """The backends ``bench`` times by default on a GPU: every registered one but the reference."""
    return tuple(b for b in backend_names() if b != "reference")


@dataclass
class Record:
    """One method in one mode at one (shape, M)."""

    shape: str
    n: int
    k: int
    m: int
    mode: str
    method: str
    kind: str
    status: str  # a testing.Status
    label: str = ""
    reason: str = ""
    rel_error: float | None = None
    timing: Timing | None = None
    metrics: dict = field(default_factory=dict)

    @property
    def us(self) -> float | None:
        return self.timing.median_us if self.timing else None

    def to_json(self) -> dict:
        d = asdict(self)
        d["timing"] = self.timing.to_json() if self.timing else None
        if d["rel_error"] is not None and not math.isfinite(d["rel_error"]):
            d["rel_error"] = str(d["rel_error"])
        return d


def problem_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def problem_bytes(m: int, n: int, k: int) -> int:
    """The fp8 GEMM's compulsory traffic (see ``DEFINITIONS["bytes"]``)."""
    kb = cdiv(k, 128)
    return n * k + 4 * cdiv(n, 128) * kb + m * k + 4 * m * kb + 2 * m * n


def roofline_us(m: int, n: int, k: int, ceilings: Ceilings) -> float | None:
    """Lower bound on the time from the two ceilings, in microseconds (None without ceilings)."""
    if not ceilings.copy_gbps or not ceilings.fp8_tflops:
        return None
    memory_us = problem_bytes(m, n, k) / (ceilings.copy_gbps * 1e3)
    compute_us = problem_flops(m, n, k) / (ceilings.fp8_tflops * 1e6)
    return max(memory_us, compute_us)


def derived_metrics(m: int, n: int, k: int, us: float, ceilings: Ceilings) -> dict:
    """TFLOP/s, GB/s and the percentages of the ceilings for one time in microseconds."""
    tflops = problem_flops(m, n, k) / (us * 1e6)
    gbps = problem_bytes(m, n, k) / (us * 1e3)
    out = {"tflops": tflops, "gbps": gbps, "pct_bw": None, "pct_fp8": None, "pct_roofline": None}
    if ceilings.copy_gbps:
        out["pct_bw"] = 100 * gbps / ceilings.copy_gbps
    if ceilings.fp8_tflops:
        out["pct_fp8"] = 100 * tflops / ceilings.fp8_tflops
    roof = roofline_us(m, n, k, ceilings)
    if roof is not None:
        out["pct_roofline"] = 100 * roof / us
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a sticky CUDA error: the next call reports it
            pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def measure(method: Method, mode: str, ops: Operands, ref: torch.Tensor, shape: Shape, *, reps: int,
            l2_cold: bool) -> Record:
    """Check ``method`` against ``ref`` on the first weight copy, then time it (even when wrong: the table
    shows both). Failures become records, never exceptions."""
    m, n, k = ops.mnk
    device = ops.x.device
    rec = Record(shape.name, n, k, m, mode, method.name, method.kind, Status.OK, label=method.name)
    available = method.availability()
    if not available:
        return replace(rec, status=Status.UNAVAILABLE, reason=available.reason)
    p = Problem.of(m, n, k, device)
    verdict = method.supports(p)
    if not verdict:
        return replace(rec, status=Status.REFUSED, reason=verdict.reason)
    try:
        rec.label = method.label(p)
        bound = method.bind(mode, ops)
        t0 = time.perf_counter()
        out = bound.fn(*bound.arg_sets[0])
        _sync(device)
        jit_s = time.perf_counter() - t0  # the first call: compilation, autotuning, JIT
        rec.rel_error = rel_error(out, ref)
        del out
        if not rec.rel_error <= TOLERANCE:
            rec.status = Status.WRONG
        rec.timing = replace(time_fn(bound.fn, rotate=bound.arg_sets, l2_cold=l2_cold, reps=reps), jit_s=jit_s)
    except Exception as e:  # noqa: BLE001 - one failing method must not stop the benchmark
        _release_memory(device)
        return replace(rec, status=Status.CRASHED, reason=_first_line(e), timing=None)
    return rec


def measure_all(shapes: list[Shape], ms: list[int], methods: list[Method], modes: list[str], *,
                device: torch.device, reps: int, l2_cold: bool, ceilings: Ceilings, rank_in_run: bool = False,
                on_step: Callable[[str], None] = lambda s: None,
                on_cell: Callable[[], None] = lambda: None) -> list[Record]:
    """Measure every method in every mode over shapes x ms; records in that order.

    With ``rank_in_run`` each cell's backends are ranked (as ``--save-table`` would) before the dispatched op
    is timed, so the dispatched column shows the choice the saved table will make."""
    records: list[Record] = []
    for shape in shapes:
        weights = make_weight_copies(shape.n, shape.k, device, None if l2_cold else 1)
        for m in ms:
            ops = make_operands(weights, m)
            ref = ops.reference()
            cell: list[Record] = []
            for method in methods:
                if method.kind == "dispatch" and rank_in_run:
                    _rank_cell(cell, device)
                first: Record | None = None
                for mode in modes:
                    on_step(f"{shape.name} M={m} {method.name} {mode}")
                    if method.mode_independent and first is not None:
                        rec = replace(first, mode=mode)
                    else:
                        rec = measure(method, mode, ops, ref, shape, reps=reps, l2_cold=l2_cold)
                        first = rec
                    if rec.timing is not None:
                        rec.metrics = derived_metrics(m, shape.n, shape.k, rec.timing.median_us, ceilings)
                    records.append(rec)
                    cell.append(rec)
            del ops, ref
            on_cell()
        del weights
        _release_memory(device)
    return records


# ---------------------------------------------------------------------------------------------- summaries


def row_summaries(records: list[Record]) -> list[dict]:
    """Per (shape, M, mode): the dispatched op, the best correct peer and the speedup of the former."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r.shape, r.n, r.k, r.m, r.mode)
        row = rows.setdefault(key, {"shape": r.shape, "n": r.n, "k": r.k, "m": r.m, "mode": r.mode,
                                    "dispatch": None, "dispatch_us": None, "dispatch_status": None,
                                    "best_peer": None, "best_peer_us": None, "speedup": None})
        if r.kind == "dispatch":
            row.update(dispatch=r.label, dispatch_us=r.us, dispatch_status=r.status,
                       pct_roofline=r.metrics.get("pct_roofline"), pct_bw=r.metrics.get("pct_bw"),
                       pct_fp8=r.metrics.get("pct_fp8"))
        elif counts_as_peer(r.method, r.kind) and r.status == Status.OK and r.us is not None:
            if row["best_peer_us"] is None or r.us < row["best_peer_us"]:
                row.update(best_peer=r.method, best_peer_us=r.us)
    for row in rows.values():
        if row["dispatch_status"] == Status.OK and row["best_peer_us"]:
            row["speedup"] = row["best_peer_us"] / row["dispatch_us"]
    return list(rows.values())


def _rank_cell(cell: list[Record], device: torch.device) -> None:
    from ..dispatch import record_ranking

    for dev, shapes in dispatch_table(cell, device_key(device)).items():
        for nk, by_m in shapes.items():
            n, k = (int(v) for v in nk.split(","))
            for m, order in by_m.items():
                record_ranking(dev, n, k, int(m), order)


def dispatch_table(records: list[Record], device_name: str) -> dict:
    """The dispatcher's measured-table format: device -> "N,K" -> str(M) -> correct backends, fastest first.
    Uses the linear-mode times where linear was measured, else the GEMM times."""
    cells: dict[tuple[int, int, int], list[Record]] = {}
    for r in records:
        if r.kind == "backend":
            cells.setdefault((r.n, r.k, r.m), []).append(r)
    table: dict = {}
    for (n, k, m), recs in cells.items():
        mode = "linear" if any(r.mode == "linear" and r.timing for r in recs) else "gemm"
        ok = sorted((r for r in recs if r.mode == mode and r.status == Status.OK and r.timing), key=lambda r: r.us)
        if ok:
            table.setdefault(device_name, {}).setdefault(f"{n},{k}", {})[str(m)] = [r.method for r in ok]
    return table




def wrong_results(records: list[Record]) -> list[Record]:
    return [r for r in records if r.status == Status.WRONG]
