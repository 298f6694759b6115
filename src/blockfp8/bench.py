"""``blockfp8 bench``: per-shape speed of blockfp8's backends, the dispatched op and outside peers, with each
result checked against the reference and set against hardware ceilings measured in the same run.

Every (shape, M) cell is timed two ways: ``gemm`` (fp8 activation and scales in, bf16 out) and ``linear``
(bf16 in, bf16 out, the method's own activation quantization included). Timing is CUDA-graph replay over
L2-cold weight copies (``timing.py``). What FLOPs, bytes, the percentages of the ceilings and the speedup
over the best peer mean is spelled out in ``DEFINITIONS`` below, which is also written into the JSON.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from .backends import Problem
from .peers import (
    EXTERNAL_BACKENDS,
    Method,
    Operands,
    counts_as_peer,
    make_operands,
    make_weight_copies,
    methods_for,
    reference_output,
)
from .quant import cdiv
from .reference import TOLERANCE, rel_error
from .shapes import Shape, default_m_values, parse_ints, parse_shapes
from .tables import merge_table_file
from .timing import Ceilings, Timing, measure_ceilings, time_fn

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
               f"{', '.join(EXTERNAL_BACKENDS)}",
    "correct": f"relative Frobenius error against the fp32 reference GEMM <= {TOLERANCE}",
    "time": "median per-call time over graph replays; p10/p90 alongside; l2_hot_us: same op on one weight copy",
}

MODES = ("gemm", "linear")
GPU_BACKENDS = ("triton", "gluon", "cublas", "deepgemm")
GPU_PEERS = ("bf16", "torchao")


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
    status: str  # ok | wrong | error | unsupported | unavailable
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


# ---------------------------------------------------------------------------------------------- arguments


def load_shapes(spec: str) -> list[Shape]:
    """Shapes from ``--shapes`` (set names of ``data/shapes.json`` and/or N:K pairs); unnamed ones get "NxK"."""
    shapes = [s if s.name else replace(s, name=f"{s.n}x{s.k}") for s in parse_shapes(spec)]
    if not shapes:
        raise ValueError(f"--shapes {spec!r} names no shape")
    return shapes


def parse_ms(spec: str | None) -> list[int]:
    """``--m`` as a list of positive token counts (default: the ``m_sweep`` of ``data/shapes.json``)."""
    ms = parse_ints(spec, "--m") if spec else default_m_values()
    if min(ms) < 1:
        raise ValueError(f"--m values must be >= 1, got {spec!r}")
    return ms


def parse_names(spec: str | None, default: Iterable[str], allowed: Iterable[str] | None = None,
                name: str = "") -> list[str]:
    values = list(default) if spec is None else [v.strip() for v in spec.split(",") if v.strip()]
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name} got {bad}; expected names from {list(allowed)}")
    return values


# ---------------------------------------------------------------------------------------------- measuring


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
    rec = Record(shape.name, n, k, m, mode, method.name, method.kind, "ok", label=method.name)
    ok, why = method.availability()
    if not ok:
        return replace(rec, status="unavailable", reason=why)
    p = Problem.of(m, n, k, device)
    verdict = method.supports(p)
    if not verdict:
        return replace(rec, status="unsupported", reason=verdict.reason)
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
            rec.status = "wrong"
        rec.timing = replace(time_fn(bound.fn, rotate=bound.arg_sets, l2_cold=l2_cold, reps=reps), jit_s=jit_s)
    except Exception as e:  # noqa: BLE001 - one failing method must not stop the benchmark
        _release_memory(device)
        return replace(rec, status="error", reason=_first_line(e), timing=None)
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
            ref = reference_output(ops)
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
        elif counts_as_peer(r.method, r.kind) and r.status == "ok" and r.us is not None:
            if row["best_peer_us"] is None or r.us < row["best_peer_us"]:
                row.update(best_peer=r.method, best_peer_us=r.us)
    for row in rows.values():
        if row["dispatch_status"] == "ok" and row["best_peer_us"]:
            row["speedup"] = row["best_peer_us"] / row["dispatch_us"]
    return list(rows.values())


def _rank_cell(cell: list[Record], device: torch.device) -> None:
    from .dispatch import record_ranking

    for dev, shapes in dispatch_table(cell, device_name(device)).items():
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
        ok = sorted((r for r in recs if r.mode == mode and r.status == "ok" and r.timing), key=lambda r: r.us)
        if ok:
            table.setdefault(device_name, {}).setdefault(f"{n},{k}", {})[str(m)] = [r.method for r in ok]
    return table


# ---------------------------------------------------------------------------------------------- environment


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _module_version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown version")
    except Exception:  # noqa: BLE001 - an optional package may fail to import in any way
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    """The key the dispatcher and the config tables use: the CUDA device name, or the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def environment(device: torch.device) -> dict:
    from . import __version__

    env = {
        "device": device_name(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "command": shlex.join(["blockfp8", *sys.argv[1:]] if sys.argv[1:2] == ["bench"] else sys.argv),
        "python": platform.python_version(),
        "blockfp8": __version__,
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "deep_gemm": _dist_version("deep_gemm", "deep-gemm", "deepinfer-gemm"),
        "torchao": _dist_version("torchao"),
        "cuda": torch.version.cuda,
        "driver": None,
    }
    if device.type == "cuda":
        env["driver"] = _driver_version()
        if env["deep_gemm"] is None:
            env["deep_gemm"] = _module_version("deep_gemm")
        props = torch.cuda.get_device_properties(device)
        env["sms"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
    return env


# ---------------------------------------------------------------------------------------------- reports


def _cell(r: Record | None, markdown: bool) -> str:
    if r is None:
        return ""
    if r.status in ("unsupported", "unavailable"):
        return "-" if r.status == "unsupported" else "n/a"
    if r.status == "error":
        return "**error**" if markdown else "[red]error[/]"
    mark = "*" if r.timing and r.timing.method == "events" else ""
    text = f"{r.us:.1f}{mark}"
    if r.status == "wrong":
        err = f"WRONG {r.rel_error:.0e}"
        return f"**{text} {err}**" if markdown else f"[bold red]{text} {err}[/]"
    return text


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def table_model(records: list[Record], rows: list[dict], mode: str,
                markdown: bool) -> tuple[list[str], list[list[str]]]:
    """Headers and cell strings of the per-mode results table (rich markup, or markdown when asked)."""
    names = list(dict.fromkeys(r.method for r in records if r.mode == mode))
    by_key = {(r.shape, r.m, r.method): r for r in records if r.mode == mode}
    headers = ["shape", "N", "K", "M", *[f"{n} us" for n in names], "dispatch", "best peer", "speedup",
               "%BW", "%FP8", "%roof"]
    out = []
    for row in (r for r in rows if r["mode"] == mode):
        speed = "-"
        if row["speedup"] is not None:
            speed = f"{row['speedup']:.2f}x"
            if not markdown:
                speed = f"[{'green' if row['speedup'] >= 1 else 'red'}]{speed}[/]"
        dispatch = (row["dispatch"] or "-").replace("blockfp8->", "")
        out.append([row["shape"], str(row["n"]), str(row["k"]), str(row["m"]),
                    *[_cell(by_key.get((row["shape"], row["m"], n)), markdown) for n in names],
                    dispatch, row["best_peer"] or "-", speed, _pct(row.get("pct_bw")), _pct(row.get("pct_fp8")),
                    _pct(row.get("pct_roofline"))])
    return headers, out


MODE_TITLES = {"gemm": "GEMM (fp8 activation + scales in, bf16 out)",
               "linear": "linear (bf16 in, activation quantization included, bf16 out)"}


def wrong_results(records: list[Record]) -> list[Record]:
    return [r for r in records if r.status == "wrong"]


def print_report(console, records: list[Record], rows: list[dict], env: dict, ceilings: Ceilings) -> None:
    from rich.table import Table

    console.print(f"[bold]{env['device']}[/]  torch {env['torch']}  triton {env['triton']}  "
                  f"DeepGEMM {env['deep_gemm']}  torchao {env['torchao']}")
    console.print(_ceilings_line(ceilings))
    for mode in dict.fromkeys(r.mode for r in records):
        headers, cells = table_model(records, rows, mode, markdown=False)
        t = Table(title=MODE_TITLES[mode], title_justify="left")
        for i, h in enumerate(headers):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i > 0)
        for line in cells:
            t.add_row(*line)
        console.print(t)
    _print_footnotes(console, records)


def _ceilings_line(c: Ceilings) -> str:
    if not c.copy_gbps:
        return "ceilings: none (no CUDA device)"
    return f"ceilings: copy {c.copy_gbps:.0f} GB/s, dense FP8 {c.fp8_tflops:.0f} TFLOP/s ({c.detail})"


def _print_footnotes(console, records: list[Record]) -> None:
    jit: dict[str, float] = {}
    seen: set[int] = set()
    for r in records:
        if r.timing is not None and id(r.timing) not in seen:  # a mode-independent result is shared, count once
            seen.add(id(r.timing))
            jit[r.method] = jit.get(r.method, 0.0) + r.timing.jit_s
    if jit:
        console.print("first calls (compilation, autotuning, JIT), seconds in total: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in jit.items()))
    if any(r.timing and r.timing.method == "events" for r in records):
        console.print("* CUDA-graph capture failed for this op: timed with events around eager launches")
    reasons = {(r.method, r.reason) for r in records if r.status == "unavailable"}
    for name, why in sorted(reasons):
        console.print(f"[dim]{name}: unavailable ({why})[/]")
    for r in (r for r in records if r.status == "error"):
        console.print(f"[red]error[/] {r.method} {r.mode} {r.shape} M={r.m}: {r.reason}")
    bad = wrong_results(records)
    if bad:
        console.print(f"[bold red]WRONG RESULTS ({len(bad)}): relative error above {TOLERANCE}[/]")
        for r in bad:
            console.print(f"[bold red]  {r.method} {r.mode} {r.shape} (N={r.n} K={r.k}) M={r.m}: "
                          f"rel error {r.rel_error:.3g}[/]")


def markdown_report(records: list[Record], rows: list[dict], env: dict, ceilings: Ceilings, timing: dict) -> str:
    lines = [f"# blockfp8 bench on {env['device']}", "",
             f"{env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver "
             f"{env['driver']}, DeepGEMM {env['deep_gemm']}, torchao {env['torchao']}; command: "
             f"`{env['command']}`", "", _ceilings_line(ceilings) + ".", "",
             f"Timing: {timing['description']}", ""]
    for mode in dict.fromkeys(r.mode for r in records):
        headers, cells = table_model(records, rows, mode, markdown=True)
        lines += [f"## {MODE_TITLES[mode]}", "", "| " + " | ".join(headers) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        lines.append("")
    bad = wrong_results(records)
    if bad:
        lines += [f"**WRONG RESULTS ({len(bad)})**: " + "; ".join(
            f"{r.method} {r.mode} N={r.n} K={r.k} M={r.m} (rel error {r.rel_error:.3g})" for r in bad), ""]
    lines += ["Definitions:", ""] + [f"* {k}: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def plot_report(records: list[Record], ceilings: Ceilings, path: str, title: str) -> str:
    """Per shape, time vs M for every method (linear mode where measured), log-log, with the roofline.
    Returns a message saying what was written (or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib: pip install 'blockfp8[plot]'; no plot written"
    mode = "linear" if any(r.mode == "linear" for r in records) else "gemm"
    recs = [r for r in records if r.mode == mode]
    shapes = list(dict.fromkeys((r.shape, r.n, r.k) for r in recs))
    cols = min(4, len(shapes))
    rows = cdiv(len(shapes), cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, n, k) in zip(axes.flat, shapes, strict=False):
        mine = [r for r in recs if (r.shape, r.n, r.k) == (name, n, k)]
        for method in dict.fromkeys(r.method for r in mine):
            pts = [(r.m, r.us) for r in mine if r.method == method and r.status == "ok" and r.us]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=method)
            bad = [(r.m, r.us) for r in mine if r.method == method and r.status == "wrong" and r.us]
            if bad:
                ax.plot(*zip(*bad, strict=True), "rx", ms=8)
        roof = [(m, roofline_us(m, n, k, ceilings)) for m in sorted({r.m for r in mine})]
        if roof and roof[0][1] is not None:
            ax.plot(*zip(*roof, strict=True), "k--", lw=1, label="roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ms = sorted({r.m for r in mine})
        ax.set_xticks(ms, [str(m) for m in ms], fontsize=7)
        ax.set_title(f"{name}  N={n} K={k}", fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("time (us)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=8)
    fig.suptitle(f"{title} ({mode}; red x = wrong result)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="deepseek-v3",
                   help="shape sets from data/shapes.json (deepseek-v3, deepseek-v3-tp8, qwen3-30b-a3b, edge) "
                        "and/or N:K pairs, comma-separated (default: deepseek-v3)")
    p.add_argument("--m", default=None, help="token counts M, comma-separated (default: the m_sweep of shapes.json)")
    p.add_argument("--backends", default=None,
                   help=f"blockfp8 backends to time (default: {','.join(GPU_BACKENDS)} on CUDA, reference on CPU)")
    p.add_argument("--peers", default=None,
                   help="outside peers: bf16, torchao, torchao-inference (slow first use: 48-config autotune per "
                        f"cell) (default: {','.join(GPU_PEERS)} on CUDA, bf16 on CPU)")
    p.add_argument("--mode", default="gemm,linear", help="gemm, linear or both (default: gemm,linear)")
    p.add_argument("--no-l2-cold", dest="l2_cold", action="store_false",
                   help="time repeated calls on one weight (L2-hot) instead of rotating L2-cold copies")
    p.add_argument("--reps", type=int, default=None, help="timed graph replays per op (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--save", help="write every record, the ceilings and the environment to this JSON file")
    p.add_argument("--plot", help="write a PNG plot (time vs M per shape) to this file (needs matplotlib)")
    p.add_argument("--save-table", help="merge the measured backend ranking into this dispatch-table JSON file")
    p.add_argument("--rank-in-run", action="store_true",
                   help="rank each cell's backends before timing the dispatched op, so it runs on the ranking this "
                        "run measures (what --save-table writes) instead of the installed table")
    p.add_argument("--markdown", help="write the tables as markdown to this file")


def _timing_description(device: torch.device, l2_cold: bool, reps: int) -> dict:
    if device.type != "cuda":
        text = f"CPU wall clock, median of {reps} repeats (smoke test only: not a GPU measurement)"
    elif l2_cold:
        text = (f"CUDA-graph replay; one graph calls the op once per weight copy, copies together > 4x L2 "
                f"(weights L2-cold); median of {reps} replays per op, divided by the copies")
    else:
        text = f"CUDA-graph replay of repeated calls on one weight (L2-hot); median of {reps} replays"
    return {"description": text, "reps": reps, "l2_cold": l2_cold}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .backends import backend_names
    from .peers import PEERS

    console, err = Console(), Console(stderr=True)
    if not console.is_terminal:
        console = Console(width=240)  # a log file gets the whole table, not an 80-column squeeze
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    try:
        shapes = load_shapes(args.shapes)
        ms = parse_ms(args.m)
        backends = parse_names(args.backends, GPU_BACKENDS if cuda else ("reference",), backend_names(), "--backends")
        peers = parse_names(args.peers, GPU_PEERS if cuda else ("bf16",), PEERS, "--peers")
        modes = parse_names(args.mode, MODES, MODES, "--mode")
        reps = args.reps or (20 if cuda else 3)
        if reps < 1:
            raise ValueError(f"--reps must be >= 1, got {reps}")
        methods = methods_for(backends, peers)
    except ValueError as e:
        err.print(f"[red]error:[/] {e}")
        return 2

    env = environment(device)
    t0 = time.perf_counter()
    ceilings = measure_ceilings(device)
    err.print(_ceilings_line(ceilings))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as progress:
        task = progress.add_task("bench", total=len(shapes) * len(ms))
        records = measure_all(shapes, ms, methods, modes, device=device, reps=reps, l2_cold=args.l2_cold,
                              ceilings=ceilings, rank_in_run=args.rank_in_run,
                              on_step=lambda s: progress.update(task, description=s),
                            on_cell=lambda: progress.advance(task))
    wall_s = time.perf_counter() - t0
    rows = row_summaries(records)
    timing = _timing_description(device, args.l2_cold, reps)
    print_report(console, records, rows, env, ceilings)
    console.print(f"total {wall_s:.0f} s")

    if args.save:
        report = {"environment": env, "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                  "ceilings": ceilings.to_json(), "timing": timing, "definitions": DEFINITIONS,
                  "wall_s": wall_s, "wrong": len(wrong_results(records)),
                  "records": [r.to_json() for r in records], "rows": rows}
        Path(args.save).write_text(json.dumps(report, indent=1) + "\n")
        console.print(f"results written to {args.save}")
    if args.markdown:
        Path(args.markdown).write_text(markdown_report(records, rows, env, ceilings, timing))
        console.print(f"markdown written to {args.markdown}")
    if args.plot:
        console.print(plot_report(records, ceilings, args.plot, f"blockfp8 bench, {env['device']}"))
    if args.save_table:
        table = dispatch_table(records, env["device"])
        merge_table_file(args.save_table, table)
        console.print(f"dispatch table ({sum(len(v) for s in table.values() for v in s.values())} rows) merged "
                      f"into {args.save_table}; use it with BLOCKFP8_DISPATCH_TABLE={args.save_table}")
    # A wrong result from blockfp8 itself (its backends or the dispatched op) fails the command.
    return 1 if any(r.kind in ("backend", "dispatch") for r in wrong_results(records)) else 0
