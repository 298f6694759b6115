"""``blockfp8 tune``: search launch configs of blockfp8's Triton GEMM on this GPU and write a config table.

For each shape x M, the heuristic config (what runs untuned) and up to ``--max-configs`` - 1 candidates from
``triton_configs.candidate_configs`` are each checked against the reference first -- a config that fails or
gives a wrong result is reported loudly and discarded -- then timed with L2-cold CUDA-graph replay
(``timing.py``). The fastest correct config of each cell goes into a table in the
``data/triton_configs.json`` layout (device name -> "N,K" -> str(M) -> config), which the Triton backend
reads for the bucket of M values up to each tuned M.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import torch

from .bench import device_name, load_shapes, parse_ms
from .reference import TOLERANCE, rel_error
from .tables import merge_table_file

NEEDS_CUDA = ("blockfp8 tune needs a CUDA device: Triton launch configs are tuned on the GPU that runs them, "
              "and none was found")


@dataclass
class Trial:
    """One config at one cell: ``status`` is ok, wrong (rel error above tolerance) or error (it raised)."""

    config: object  # TritonConfig
    status: str
    rel_error: float | None = None
    us: float | None = None
    reason: str = ""


@dataclass
class CellResult:
    name: str
    n: int
    k: int
    m: int
    trials: list[Trial]  # trials[0] is the heuristic config

    @property
    def best(self) -> Trial | None:
        ok = [t for t in self.trials if t.status == "ok" and t.us is not None]
        return min(ok, key=lambda t: t.us) if ok else None

    @property
    def baseline(self) -> Trial | None:
        return self.trials[0] if self.trials else None


def select_candidates(m: int, n: int, k: int, max_configs: int, num_sms: int = 132,
                      incumbent: object | None = None) -> list:
    """The heuristic config first, then the ``incumbent`` (the config the shipped table holds for this cell,
    if any, so a re-tune never ends slower than what ships), then up to ``max_configs`` minus those
    distinct candidates spread evenly over ``candidate_configs(m, n, k)`` (its order sweeps tile shape,
    split and stages, so even spacing samples every kind). ``max_configs <= 0`` keeps all candidates."""
    from .backends.triton_configs import candidate_configs, heuristic_config

    base = heuristic_config(m, n, k, num_sms)
    head = list(dict.fromkeys([base] + ([incumbent] if incumbent is not None else [])))
    rest = list(dict.fromkeys(c for c in candidate_configs(m, n, k, num_sms) if c not in head))
    room = len(rest) if max_configs <= 0 else max(0, max_configs - len(head))
    if room < len(rest):
        if room == 0:
            rest = []
        elif room == 1:
            rest = [rest[len(rest) // 2]]
        else:
            step = (len(rest) - 1) / (room - 1)
            rest = [rest[round(i * step)] for i in range(room)]
    return [*head, *rest]


def tune_cell(configs: list, check: Callable[[object], float], measure: Callable[[object], float],
              on_bad: Callable[[Trial], None] = lambda t: None, tol: float = TOLERANCE) -> list[Trial]:
    """Check every config (``check(c)`` -> relative error), then time the correct ones (``measure(c)`` ->
    microseconds). Wrong or failing configs are never timed; ``on_bad`` hears about each."""
    trials = []
    for c in configs:
        try:
            err = check(c)
        except Exception as e:  # noqa: BLE001 - a config the kernel rejects is a result, not a crash
            trial = Trial(c, "error", reason=f"{type(e).__name__}: {e}".splitlines()[0][:200])
        else:
            trial = Trial(c, "ok" if err <= tol else "wrong", rel_error=err)
            if trial.status == "ok":
                try:
                    trial.us = measure(c)
                except Exception as e:  # noqa: BLE001
                    trial.status, trial.reason = "error", f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if trial.status != "ok":
            on_bad(trial)
        trials.append(trial)
    return trials


def tuned_table(results: list[CellResult], device: str) -> dict:
    """device -> "N,K" -> str(M) -> best config as a dict (cells with no correct config are left out)."""
    table: dict = {}
    for r in results:
        best = r.best
        if best is not None:
            table.setdefault(device, {}).setdefault(f"{r.n},{r.k}", {})[str(r.m)] = best.config.to_json()
    return table


def _gpu_cell(weights, m: int, configs: list, reps: int, on_bad: Callable[[Trial], None]) -> list[Trial]:
    from .backends import get_backend
    from .backends.triton import triton_gemm
    from .peers import make_operands, reference_output
    from .timing import time_fn

    ops = make_operands(weights, m)
    ref = reference_output(ops)
    xs = ops.scales(get_backend("triton").scale_layout)  # the layout the backend hands the kernel
    arg_sets = [(ops.x_fp8, xs, w, s) for w, s in ops.weights]

    def check(c) -> float:
        out = triton_gemm(ops.x_fp8, xs, *ops.weights[0], config=c)
        return rel_error(out, ref)

    def measure(c) -> float:
        def fn(xq, xsc, w, s):
            return triton_gemm(xq, xsc, w, s, config=c)

        return time_fn(fn, rotate=arg_sets, reps=reps, hot=False).median_us

    return tune_cell(configs, check, measure, on_bad)


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
    from rich.table import Table

    t = Table(title="Triton launch configs (time per call, L2-cold)", title_justify="left")
    for h in ("shape", "N", "K", "M", "ok/wrong/error", "heuristic us", "best us", "gain", "best config"):
        t.add_column(h, justify="left" if h in ("shape", "best config") else "right")
    for r in results:
        counts = [sum(tr.status == s for tr in r.trials) for s in ("ok", "wrong", "error")]
        best, base = r.best, r.baseline
        base_us = base.us if base is not None and base.status == "ok" else None
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
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console, err = Console(), Console(stderr=True)
    if not console.is_terminal:
        console = Console(width=200)
    if not torch.cuda.is_available():
        err.print(f"[red]error:[/] {NEEDS_CUDA}")
        return 2
    try:
        shapes = load_shapes(args.shapes)
        ms = parse_ms(args.m)
        if args.reps < 1:
            raise ValueError(f"--reps must be >= 1, got {args.reps}")
    except ValueError as e:
        err.print(f"[red]error:[/] {e}")
        return 2

    from .backends.triton_configs import lookup
    from .peers import make_weight_copies

    device = torch.device("cuda", torch.cuda.current_device())
    name = device_name(device)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    def on_bad(t: Trial) -> None:
        why = f"rel error {t.rel_error:.3g} > {TOLERANCE}" if t.status == "wrong" else t.reason
        err.print(f"[bold red]DISCARDED {t.status.upper()} config {t.config}: {why}[/]")

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
                trials = _gpu_cell(weights, m, configs, args.reps, on_bad)
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
