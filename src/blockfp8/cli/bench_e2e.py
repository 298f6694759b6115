"""``blockfp8 bench-e2e``: time per decode step (TPOT) of a DeepSeek-V3-shaped decoder stack.

Variants: the bf16 model (``torch.matmul``, cuBLAS on CUDA), the block-FP8 model with each GEMM backend
forced, and the block-FP8 model as the dispatcher runs it ("auto"). The FP8 model is converted once; a
variant forces its backend through ``BLOCKFP8_BACKEND``, which the dispatcher reads inside the custom op
at run time, so one compiled graph serves every backend and only the captured CUDA graph differs.

Modes (CUDA; the CPU runs eager only):
* ``eager``: the module called from Python every step.
* ``graph``: the eager step captured once in a ``torch.cuda.CUDAGraph`` and replayed (no launch overhead).
* ``compiled``: ``torch.compile(fullgraph=True, dynamic=False)`` with Inductor's default mode (fuses the
  norms and activations around the opaque FP8 ops), then captured in a CUDA graph the same way. Manual
  capture is used rather than ``mode="reduce-overhead"`` so both graphed modes replay identically.

Each step is timed from a synchronized start to a synchronized end; the table shows the median after
warm-up. One-time costs (first call with kernel JIT, graph capture, compilation) are reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from rich.table import Table
from torch import nn

from ..backends import Problem, backend_names, get_backend
from ..dispatch import ENV_VAR, clear_caches
from ..nn import Fp8BlockLinear, convert_model
from ..reference import rel_error
from ..testing.decoder import PRESETS, Decoder, hidden_input, linear_shapes, make_model, with_fused_producers
from ..testing.environment import environment, environment_line
from ..testing.timing import capture_graph, synchronize, time_steps
from .common import (
    add_row,
    announce,
    cpu_timing_note,
    int_at_least,
    modes_on,
    one_cpu_thread,
    parse_names,
    plain,
    positive_int,
    positive_ints,
    resolve_device,
    short_error,
    stdout_console,
    write_text,
)

MODES = ("eager", "graph", "compiled")
BF16 = "bf16"
AUTO = "auto"
FUSED = "fused"  # the FP8 model with fused quantizing producers, dispatched like "auto"


# ------------------------------------------------------------------------------------------ measurement


@contextlib.contextmanager
def forced_backend(name: str | None) -> Iterator[None]:
    """Force every blockfp8 GEMM to backend ``name`` (None: let the dispatcher choose) inside the block."""
    old = os.environ.get(ENV_VAR)
    if name is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every linear layer's weights (and fp8 block scales): what a decode step must stream."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, Fp8BlockLinear)):
            total += sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
    return total


def unsupported_reason(backend: str, shapes: list[tuple[int, int]], batches: list[int],
                       device: torch.device) -> str:
    """Why ``backend`` cannot run every (M, N, K) of the model here ("" when it can)."""
    be = get_backend(backend)
    for m in batches:
        for n, k in shapes:
            verdict = be.supports(Problem.of(m, n, k, device))
            if not verdict:
                return f"M={m} N={n} K={k}: {verdict.reason}"
    return ""


# ------------------------------------------------------------------------------------------- benchmark


@dataclass
class Row:
    variant: str
    mode: str
    batch: int
    tpot_ms: float | None = None
    setup_s: float | None = None
    rel_err: float | None = None
    weight_gbps: float | None = None
    speedup: float | None = None
    note: str = ""


@dataclass
class Settings:
    batches: list[int]
    steps: int
    warmup: int
    modes: list[str]
    device: torch.device


def _run_cell(step: Callable[[], torch.Tensor], mode: str, s: Settings) -> tuple[float, float, torch.Tensor]:
    """(setup seconds, median step seconds, output) of one variant in one mode."""
    t0 = time.perf_counter()
    if mode == "eager":
        out = step()
        synchronize(s.device)
        fn = step
    else:
        graph, out = capture_graph(step, warmup=3)
        synchronize(s.device)
        fn = graph.replay
    setup = time.perf_counter() - t0
    times = time_steps(fn, s.device, s.warmup, s.steps)
    return setup, statistics.median(times), out.detach().clone()


def run_benchmark(bf16_model: Decoder, fp8_model: Decoder, variants: list[tuple[str, str | None]],
                  s: Settings, log: Callable[[str], None] = print,
                  fused_model: Decoder | None = None) -> tuple[list[Row], dict[str, float]]:
    """Time every (batch, mode, variant). ``variants`` pairs a label with the forced backend (None: auto;
    the label ``bf16`` runs the bf16 model, ``fused`` the ``fused_model``). Returns the rows and one-time
    compile seconds by label."""
    rows: list[Row] = []
    compile_s: dict[str, float] = {}
    models = {BF16: bf16_model, "fp8": fp8_model, **({FUSED: fused_model} if fused_model is not None else {})}
    bytes_of = {key: weight_bytes(model) for key, model in models.items()}
    compiled: dict[str, Callable] = {}
    if "compiled" in s.modes:
        compiled = {key: torch.compile(model, fullgraph=True, dynamic=False) for key, model in models.items()}
    with torch.inference_mode():
        for m in s.batches:
            x = hidden_input(bf16_model, m)
            baseline: dict[str, Row] = {}
            reference_out = bf16_model(x).float()
            for mode in s.modes:
                compile_error = {}
                if mode == "compiled":
                    for key, fn in compiled.items():
                        log(f"  M={m:<3d} compiling the {key} model")
                        t0 = time.perf_counter()
                        try:
                            with forced_backend(None):
                                fn(x)
                            synchronize(s.device)
                            compile_s[f"{key} model, M={m}"] = time.perf_counter() - t0
                        except Exception as e:  # noqa: BLE001 - reported in the table, never fatal
                            compile_error[key] = short_error(e)
                for label, backend in variants:
                    key = label if label in (BF16, FUSED) else "fp8"
                    model = compiled.get(key) if mode == "compiled" else models[key]
                    row = Row(label, mode, m)
                    if key in compile_error:
                        row.note = f"compile failed: {compile_error[key]}"
                    else:
                        try:
                            with forced_backend(backend):
                                setup, median, out = _run_cell(lambda model=model, x=x: model(x), mode, s)
                            row.setup_s, row.tpot_ms = setup, median * 1e3
                            row.rel_err = rel_error(out.float(), reference_out)
                            row.weight_gbps = bytes_of[key] / median / 1e9
                        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the rest
                            row.note = short_error(e)
                    if label == BF16:
                        baseline[mode] = row
                    base = baseline.get(mode)
                    if base and base.tpot_ms and row.tpot_ms:
                        row.speedup = base.tpot_ms / row.tpot_ms
                    rows.append(row)
                    status = f"{row.tpot_ms:.3f} ms" if row.tpot_ms is not None else row.note
                    log(f"  M={m:<3d} {mode:8s} {label:9s} {status}")
    return rows, compile_s


# ----------------------------------------------------------------------------------------------- output


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


COLUMNS = ("variant", "mode", "M", "TPOT ms", "vs bf16", "weights GB/s", "rel err vs bf16", "setup s", "note")


def _cells(r: Row) -> list[str]:
    gbps = _fmt(r.weight_gbps, ".0f" if (r.weight_gbps or 0) >= 10 else ".3f")
    speedup = "-" if r.speedup is None else f"{r.speedup:.2f}x"
    return [r.variant, r.mode, str(r.batch), _fmt(r.tpot_ms, ".3f"), speedup, gbps, _fmt(r.rel_err, ".2e"),
            _fmt(r.setup_s, ".2f"), r.note]


def to_markdown(rows: list[Row], compile_s: dict[str, float], header: list[str]) -> str:
    lines = [*header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    if compile_s:
        lines += ["", "Compile time (torch.compile, first call per batch size):", ""]
        lines += [f"- {k}: {v:.1f} s" for k, v in compile_s.items()]
    return "\n".join(lines) + "\n"


def print_table(rows: list[Row], compile_s: dict[str, float], title: str) -> None:
    console = stdout_console(160)
    table = Table(title=plain(title))
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("variant", "mode", "note") else "right",
                         overflow="fold")
    for r in rows:
        add_row(table, *_cells(r))
    console.print(table)
    for k, v in compile_s.items():
        console.print(plain(f"compile: {k}: {v:.1f} s"))


# -------------------------------------------------------------------------------------------------- CLI


GPU_SIZES = {"preset": "deepseek-v3", "batch": [1, 16], "steps": 50, "warmup": 5}
# CPU: the tiny preset; the forced Triton variant runs in its interpreter (about 2 s a step), so few steps.
CPU_SIZES = {"preset": "tiny", "batch": [1], "steps": 3, "warmup": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model shapes (default: deepseek-v3 on CUDA or with --full, tiny on CPU)")
    p.add_argument("--layers", type=positive_int, default=2,
                   help="decoder blocks (default 2; ~1.75 GB each for deepseek-v3)")
    p.add_argument("--batch", type=positive_ints, default=None,
                   help="decode batch sizes M, comma-separated (default: 1,16 on CUDA or with --full, 1 on CPU)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="timed decode steps per cell, median reported (default: 50 on CUDA or with --full, 3 on CPU)")
    p.add_argument("--warmup", type=int_at_least(0), default=None,
                   help="untimed steps before timing (default: 5 on CUDA or with --full, 1 on CPU)")
    p.add_argument("--full", action="store_true",
                   help="the GPU-sized defaults even on CPU (the deepseek-v3 preset: 2.3 GB a layer, very slow there)")
    p.add_argument("--backends", default=None,
                   help="FP8 backends to force, comma-separated (default: every one but reference; the dispatched "
                        "'auto' variant always runs)")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)} (default: all; "
                                                 "CPU: eager only)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", default=None, help="write rows and environment as JSON to this path")
    p.add_argument("--markdown", default=None, help="write the table as Markdown to this path")
    p.add_argument("--fused", action="store_true",
                   help="also run the FP8 model with fused quantizing producers (variant 'fused') and compare it "
                        "with 'auto'")


def _command(args: argparse.Namespace, sizes: dict, backends: list[str], modes: list[str]) -> str:
    """The command line that reproduces this run (every option spelled out)."""
    return (f"blockfp8 bench-e2e --preset {sizes['preset']} --layers {args.layers} "
            f"--batch {','.join(map(str, sizes['batch']))} --steps {sizes['steps']} --warmup {sizes['warmup']} "
            f"--backends {','.join(backends)} --modes {','.join(modes)}" + (" --fused" if args.fused else ""))


def fusion_gains(rows: list[Row]) -> list[str]:
    """One line per (mode, M): the fused model's step time against the unfused dispatched one ("auto")."""
    auto = {(r.mode, r.batch): r for r in rows if r.variant == AUTO and r.tpot_ms}
    lines = []
    for r in rows:
        base = auto.get((r.mode, r.batch))
        if r.variant == FUSED and r.tpot_ms and base:
            lines.append(f"fused vs auto, {r.mode}, M={r.batch}: {r.tpot_ms:.3f} vs {base.tpot_ms:.3f} ms, "
                         f"step time {100 * (r.tpot_ms / base.tpot_ms - 1):+.1f}%; rel err vs bf16 "
                         f"{_fmt(r.rel_err, '.2e')} (auto {_fmt(base.rel_err, '.2e')})")
    return lines


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    backends = parse_names(args.backends, [b for b in backend_names() if b != "reference"], backend_names(),
                           "--backends")
    modes = modes_on(device, args.modes, MODES)
    big = device.type == "cuda" or args.full
    defaults = GPU_SIZES if big else CPU_SIZES
    given = {"preset": args.preset, "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
    sizes = {k: defaults[k] if v is None else v for k, v in given.items()}
    small = not big and all(v is None for v in given.values())
    announce(f"bench-e2e: {sizes['preset']} x{args.layers} layers, batch {','.join(map(str, sizes['batch']))}, "
             f"{sizes['steps']} timed steps per variant ({', '.join(modes)}) on {device.type}"
             + (" (CPU-sized)" if small else ""),
             "blockfp8 bench-e2e --full (DeepSeek-V3 shapes, 50 steps, meant for a GPU)" if small else None)
    settings = Settings(sizes["batch"], sizes["steps"], sizes["warmup"], modes, device)
    env = environment(device)
    print(environment_line(env))
    clear_caches()

    t0 = time.perf_counter()
    bf16_model = make_model(sizes["preset"], args.layers, torch.bfloat16, device)
    fp8_model = copy.deepcopy(bf16_model)
    convert_model(fp8_model)
    synchronize(device)
    print(f"built {sizes['preset']} x{args.layers} layers and its FP8 copy in {time.perf_counter() - t0:.1f} s "
          f"(bf16 weights {weight_bytes(bf16_model) / 1e9:.2f} GB, fp8 {weight_bytes(fp8_model) / 1e9:.2f} GB)")

    shapes = list(dict.fromkeys(linear_shapes(bf16_model.cfg).values()))
    variants: list[tuple[str, str | None]] = [(BF16, None)]
    skipped: dict[str, str] = {}
    for b in backends:
        why = unsupported_reason(b, shapes, settings.batches, device)
        if why:
            skipped[b] = why
        else:
            variants.append((b, b))
    variants.append((AUTO, None))
    fused_model = with_fused_producers(fp8_model) if args.fused else None
    if args.fused:
        variants.append((FUSED, None))
    for b, why in skipped.items():
        print(f"skipping {b}: {why}")

    def log(line: str) -> None:  # progress, one line per finished cell, on stderr with the other commands'
        print(line, file=sys.stderr, flush=True)

    with one_cpu_thread(device):
        rows, compile_s = run_benchmark(bf16_model, fp8_model, variants, settings, log=log, fused_model=fused_model)
    title = (f"decode TPOT, {sizes['preset']} x{args.layers} layers, median of {sizes['steps']} steps "
             f"({', '.join(modes)}; graph = manual CUDA graph capture)")
    print_table(rows, compile_s, title)
    gains = fusion_gains(rows)
    for line in gains:
        print(line)
    if device.type == "cpu":
        print(cpu_timing_note(f"median of {sizes['steps']} steps"))

    command = _command(args, sizes, backends, modes)
    header = [f"# bench-e2e: {title}", "", f"- environment: {environment_line(env)}", f"- command: `{command}`"]
    header += [f"- skipped {b}: {why}" for b, why in skipped.items()]
    header += [f"- {line}" for line in gains]
    if args.markdown:
        write_text(args.markdown, to_markdown(rows, compile_s, header))
    if args.json:
        write_text(args.json, json.dumps({
            "environment": env, "preset": sizes["preset"], "layers": args.layers, "steps": sizes["steps"],
            "warmup": sizes["warmup"], "modes": modes, "skipped": skipped, "compile_s": compile_s,
            "rows": [asdict(r) for r in rows]}, indent=1))
    return 0
