"""``blockfp8 bench``: per-shape speed of blockfp8's backends, the dispatched op and outside peers, each result
checked against the reference and set against hardware ceilings measured in the same run
(the engine is ``testing.bench``; this module parses arguments and writes the tables, JSON and plot)."""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..backends import backend_names
from ..format import cdiv
from ..reference import TOLERANCE
from ..tables import merge_table_file, read_table_file
from ..testing import Status
from ..testing.bench import (
    DEFINITIONS,
    GPU_PEERS,
    MODES,
    Record,
    dispatch_table,
    gpu_backends,
    measure_all,
    roofline_us,
    row_summaries,
    wrong_results,
)
from ..testing.environment import environment
from ..testing.host import measure_host
from ..testing.methods import PEERS, methods_for
from ..testing.shapes import load_shapes, parse_m_values
from ..testing.timing import Ceilings, measure_ceilings
from .common import (
    CellProgress,
    announce,
    cpu_timing_note,
    naming_path,
    one_cpu_thread,
    parse_names,
    plain,
    positive_int,
    refuse_unused,
    stdout_console,
    write_text,
)

# Without --full, a machine without CUDA gets a smoke test: two small shapes with tails in N and K, two M.
CPU_SHAPES, CPU_M = "200:300,130:1000", "1,16"
MODE_DEFAULT = ",".join(MODES)
PLOT_HINT = "--plot needs matplotlib: pip install 'blockfp8[plot]'"


def _cell(r: Record | None, markdown: bool) -> str | Text:
    """One time cell: markdown text, or rich ``Text`` with the style of its status."""
    if r is None:
        return ""
    if r.status in (Status.REFUSED, Status.UNAVAILABLE):
        return "-" if r.status == Status.REFUSED else "n/a"
    if r.status == Status.CRASHED:
        return "**error**" if markdown else Text("error", style="red")
    mark = "*" if r.timing and r.timing.method == "events" else ""
    text = f"{r.us:.1f}{mark}"
    if r.status == Status.WRONG:
        err = f"WRONG {r.rel_error:.0e}"
        return f"**{text} {err}**" if markdown else Text(f"{text} {err}", style="bold red")
    return text


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def table_model(records: list[Record], rows: list[dict], mode: str,
                markdown: bool) -> tuple[list[str], list[list[str | Text]]]:
    """Headers and cells of the per-mode results table: markdown strings, or (for rich) plain strings and
    styled ``Text``."""
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
                speed = Text(speed, style="green" if row["speedup"] >= 1 else "red")
        dispatch = (row["dispatch"] or "-").replace("blockfp8->", "")
        out.append([row["shape"], str(row["n"]), str(row["k"]), str(row["m"]),
                    *[_cell(by_key.get((row["shape"], row["m"], n)), markdown) for n in names],
                    dispatch, row["best_peer"] or "-", speed, _pct(row.get("pct_bw")), _pct(row.get("pct_fp8")),
                    _pct(row.get("pct_roofline"))])
    return headers, out


MODE_TITLES = {"gemm": "GEMM (fp8 activation + scales in, bf16 out)",
               "linear": "linear (bf16 in, activation quantization included, bf16 out)"}


def print_report(console, records: list[Record], rows: list[dict], env: dict, ceilings: Ceilings) -> None:
    console.print(f"[bold]{escape(env['device'])}[/]  " + escape(f"torch {env['torch']}  triton {env['triton']}  "
                  f"DeepGEMM {env['deep_gemm']}  torchao {env['torchao']}"))
    console.print(plain(_ceilings_line(ceilings)))
    for mode in dict.fromkeys(r.mode for r in records):
        headers, cells = table_model(records, rows, mode, markdown=False)
        t = Table(title=MODE_TITLES[mode], title_justify="left")
        for i, h in enumerate(headers):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i > 0)
        for line in cells:
            t.add_row(*(plain(c) for c in line))
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
        console.print(plain("first calls (compilation, autotuning, JIT), seconds in total: "
                            + ", ".join(f"{k} {v:.1f}" for k, v in jit.items())))
    if any(r.timing and r.timing.method == "events" for r in records):
        console.print("* CUDA-graph capture failed for this op: timed with events around eager launches")
    reasons = {(r.method, r.reason) for r in records if r.status == Status.UNAVAILABLE}
    for name, why in sorted(reasons):
        console.print(plain(f"{name}: unavailable ({why})", style="dim"))
    for r in (r for r in records if r.status == Status.CRASHED):
        console.print(Text.assemble(("crashed", "red"), f" {r.method} {r.mode} {r.shape} M={r.m}: {r.reason}"))
    bad = wrong_results(records)
    if bad:
        console.print(f"[bold red]WRONG RESULTS ({len(bad)}): relative error above {TOLERANCE}[/]")
        for r in bad:
            console.print(plain(f"  {r.method} {r.mode} {r.shape} (N={r.n} K={r.k}) M={r.m}: "
                                f"rel error {r.rel_error:.3g}", style="bold red"))


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


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend; an ImportError with the install hint without it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(PLOT_HINT) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(records: list[Record], ceilings: Ceilings, path: str, title: str) -> str:
    """Per shape, time vs M for every method (linear mode where measured), log-log, with the roofline.
    Returns a message saying what was written."""
    plt = _pyplot()
    mode = "linear" if any(r.mode == "linear" for r in records) else "gemm"
    recs = [r for r in records if r.mode == mode]
    shapes = list(dict.fromkeys((r.shape, r.n, r.k) for r in recs))
    cols = min(4, len(shapes))
    rows = cdiv(len(shapes), cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, n, k) in zip(axes.flat, shapes, strict=False):
        mine = [r for r in recs if (r.shape, r.n, r.k) == (name, n, k)]
        for method in dict.fromkeys(r.method for r in mine):
            pts = [(r.m, r.us) for r in mine if r.method == method and r.status == Status.OK and r.us]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=method)
            bad = [(r.m, r.us) for r in mine if r.method == method and r.status == Status.WRONG and r.us]
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
    with naming_path(path):
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default=None,
                   help="shape sets from data/shapes.json (deepseek-v3, deepseek-v3-tp8, qwen3-30b-a3b, edge) "
                        f"and/or N:K pairs, comma-separated (default: deepseek-v3 on CUDA or with --full, "
                        f"{CPU_SHAPES} on CPU)")
    p.add_argument("--m", default=None, help="token counts M, comma-separated (default: the m_sweep of shapes.json "
                                             f"on CUDA or with --full, {CPU_M} on CPU)")
    p.add_argument("--full", action="store_true",
                   help="the GPU-sized defaults (DeepSeek-V3 shapes x the whole M sweep) even on CPU, where they "
                        "take hours")
    p.add_argument("--backends", default=None,
                   help=f"blockfp8 backends to time (default: {','.join(gpu_backends())} on CUDA, reference on CPU)")
    p.add_argument("--peers", default=None,
                   help="outside peers: bf16, torchao, torchao-inference (slow first use: 48-config autotune per "
                        f"cell) (default: {','.join(GPU_PEERS)} on CUDA, bf16 on CPU)")
    p.add_argument("--mode", default=MODE_DEFAULT, help=f"gemm, linear or both (default: {MODE_DEFAULT})")
    p.add_argument("--no-l2-cold", dest="l2_cold", action="store_false",
                   help="time repeated calls on one weight (L2-hot) instead of rotating L2-cold copies")
    p.add_argument("--reps", type=positive_int, default=None,
                   help="timed graph replays per op (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--save", help="write every record, the ceilings and the environment to this JSON file")
    p.add_argument("--plot", help="write a PNG plot (time vs M per shape) to this file (needs matplotlib)")
    p.add_argument("--save-table", help="merge the measured backend ranking into this dispatch-table JSON file")
    p.add_argument("--rank-in-run", action="store_true",
                   help="rank each cell's backends before timing the dispatched op, so it runs on the ranking this "
                        "run measures (what --save-table writes) instead of the installed table")
    p.add_argument("--markdown", help="write the tables as markdown to this file")
    p.add_argument("--host", action="store_true",
                   help="instead of GPU time, measure host time per call in eager mode: Fp8BlockLinear (also with "
                        "autograd on), blockfp8.linear and blockfp8.gemm against nn.Linear and F.linear in bf16 "
                        "(default shapes 2112:7168,7168:2048, M 1,16)")


def run_host(args: argparse.Namespace, device: torch.device) -> int:
    """``bench --host``: host microseconds per eager call, the layer's ratio to nn.Linear in bf16 and its ratio
    with autograd on to without."""
    refuse_unused("--host (host time per call, eager)", full=args.full, backends=args.backends is not None,
                  peers=args.peers is not None, mode=args.mode != MODE_DEFAULT, no_l2_cold=not args.l2_cold,
                  reps=args.reps is not None, plot=bool(args.plot), save_table=bool(args.save_table),
                  rank_in_run=args.rank_in_run, markdown=bool(args.markdown))
    shapes = load_shapes(args.shapes or "2112:7168,7168:2048")
    ms = parse_m_values(args.m or "1,16")
    calls, runs = (2000, 5) if device.type == "cuda" else (20, 1)
    rows = measure_host(shapes, ms, device, calls, runs)
    env = environment(device)
    table = Table(title=f"host time per eager call (us), {env['device']}, torch {env['torch']}, triton "
                        f"{env['triton']}: median of {runs} x {calls} back-to-back calls (no-grad ones under "
                        "inference_mode)")
    columns = ("shape", "M", "F.linear bf16", "nn.Linear bf16", "Fp8BlockLinear", "layer / nn.Linear",
               "nn.Linear grad", "Fp8BlockLinear grad", "grad / no-grad", "blockfp8.linear", "blockfp8.gemm",
               "backend")
    for col in columns:
        table.add_column(col, justify="left" if col in ("shape", "backend") else "right")
    for r in rows:
        table.add_row(r.shape, str(r.m), f"{r.bf16_us:.1f}", f"{r.module_us:.1f}", f"{r.layer_us:.1f}",
                      f"{r.ratio:.2f}x", f"{r.module_grad_us:.1f}", f"{r.layer_grad_us:.1f}",
                      f"{r.grad_ratio:.2f}x", f"{r.linear_us:.1f}", f"{r.gemm_us:.1f}", r.backend)
    stdout_console(160).print(table)
    if args.save:
        write_text(args.save, json.dumps({"environment": env, "host": [r.to_json() for r in rows]}, indent=1) + "\n")
    return 0


def _timing_description(device: torch.device, l2_cold: bool, reps: int) -> dict:
    if device.type != "cuda":
        text = cpu_timing_note(f"wall clock, median of {reps} repeats") + " (a smoke test, not a GPU measurement)"
    elif l2_cold:
        text = (f"CUDA-graph replay; one graph calls the op once per weight copy, copies together > 4x L2 "
                f"(weights L2-cold); median of {reps} replays per op, divided by the copies")
    else:
        text = f"CUDA-graph replay of repeated calls on one weight (L2-hot); median of {reps} replays"
    return {"description": text, "reps": reps, "l2_cold": l2_cold}


def run(args: argparse.Namespace) -> int:
    console = stdout_console(240)  # a log file gets the whole table, not an 80-column squeeze
    cuda = torch.cuda.is_available()
    big = cuda or args.full
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.host:
        return run_host(args, device)
    if args.save_table:
        read_table_file(args.save_table)  # a target that cannot be merged into fails now, not after the run
    shapes = load_shapes(args.shapes or ("deepseek-v3" if big else CPU_SHAPES))
    ms = parse_m_values(args.m or (None if big else CPU_M))
    backends = parse_names(args.backends, gpu_backends() if cuda else ("reference",), backend_names(), "--backends")
    peers = parse_names(args.peers, GPU_PEERS if cuda else ("bf16",), PEERS, "--peers")
    modes = parse_names(args.mode, MODES, MODES, "--mode")
    reps = args.reps or (20 if cuda else 3)
    methods = methods_for(backends, peers)
    if args.plot:
        _pyplot()  # fail now, not after the whole run

    small = not big and args.shapes is None and args.m is None
    announce(f"bench: {len(shapes)} shapes x {len(ms)} M values x {len(methods)} methods x {len(modes)} modes on "
             f"{device.type}" + (" (CPU-sized smoke test)" if small else ""),
             "blockfp8 bench --full (DeepSeek-V3 shapes x the M sweep, meant for a GPU)" if small else None)
    env = environment(device)
    t0 = time.perf_counter()
    ceilings = measure_ceilings(device)
    announce(_ceilings_line(ceilings))
    current = {"cell": ""}

    def on_step(text: str) -> None:
        current["cell"] = text.rsplit(" ", 2)[0]  # "shape M=m" without the method and mode
        progress.step(text)

    with CellProgress(len(shapes) * len(ms), "bench") as progress, one_cpu_thread(device):
        records = measure_all(shapes, ms, methods, modes, device=device, reps=reps, l2_cold=args.l2_cold,
                              ceilings=ceilings, rank_in_run=args.rank_in_run, on_step=on_step,
                              on_cell=lambda: progress.advance(current["cell"]))
    wall_s = time.perf_counter() - t0
    rows = row_summaries(records)
    timing = _timing_description(device, args.l2_cold, reps)
    print_report(console, records, rows, env, ceilings)
    if device.type != "cuda":
        console.print(plain(timing["description"]))
    console.print(f"total {wall_s:.0f} s")

    if args.save:
        report = {"environment": env, "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                  "ceilings": ceilings.to_json(), "timing": timing, "definitions": DEFINITIONS,
                  "wall_s": wall_s, "wrong": len(wrong_results(records)),
                  "records": [r.to_json() for r in records], "rows": rows}
        write_text(args.save, json.dumps(report, indent=1) + "\n")
        console.print(plain(f"results written to {args.save}"))
    if args.markdown:
        write_text(args.markdown, markdown_report(records, rows, env, ceilings, timing))
        console.print(plain(f"markdown written to {args.markdown}"))
    if args.plot:
        console.print(plain(plot_report(records, ceilings, args.plot, f"blockfp8 bench, {env['device']}")))
    if args.save_table:
        table = dispatch_table(records, env["device"])
        merge_table_file(args.save_table, table)
        console.print(plain(f"dispatch table ({sum(len(v) for s in table.values() for v in s.values())} rows) "
                            f"merged into {args.save_table}; use it with BLOCKFP8_DISPATCH_TABLE={args.save_table}"))
    # A wrong result from blockfp8 itself (its backends or the dispatched op) fails the command.
    return 1 if any(r.kind in ("backend", "dispatch") for r in wrong_results(records)) else 0
