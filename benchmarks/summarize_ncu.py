"""Markdown table from an Nsight Compute raw CSV written for benchmarks/profile_cells.py.

    python benchmarks/summarize_ncu.py ncu.csv ncu.err

ncu.err holds profile_cells.py's "profiled <backend> N=.. K=.. M=.." lines, one per kernel in launch order.
"""

import argparse
import csv
import re

STALLS = ("long_scoreboard", "barrier", "wait", "dispatch_stall", "math_pipe_throttle", "short_scoreboard",
          "gmma", "not_selected", "mio_throttle", "lg_throttle", "no_instruction", "drain", "membar")


def _mb(v: float) -> str:
    return "-" if v != v else f"{v / 1e6:.0f}"  # NaN: the metric was not collected in that run


def main(csv_path: str, labels_path: str) -> None:
    rows = list(csv.reader(open(csv_path)))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    hdr, data = rows[head], rows[head + 2:]
    col = {h: i for i, h in enumerate(hdr)}
    labels = [m.groups() for m in re.finditer(r"profiled (\w+) N=(\d+) K=(\d+) M=(\d+)", open(labels_path).read())]
    assert len(labels) == len(data), f"{len(labels)} labels for {len(data)} kernels"

    def num(r, name):
        v = r[col[name]].replace(",", "") if name in col else ""
        return float(v) if v else float("nan")

    print("| N x K | M | kernel | us | DRAM MB read | DRAM % peak | tensor pipe % | regs | grid | "
          "top stalls (warps per issue) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for (name, n, k, m), r in zip(labels, data, strict=True):
        stalls = sorted(((num(r, f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio"), s)
                         for s in STALLS), reverse=True)[:3]
        print(f"| {n} x {k} | {m} | {name} | {num(r, 'gpu__time_duration.sum') / 1e3:.1f} | "
              f"{_mb(num(r, 'dram__bytes_read.sum'))} | "
              f"{num(r, 'gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed'):.0f} | "
              f"{num(r, 'sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed'):.0f} | "
              f"{num(r, 'launch__registers_per_thread'):.0f} | {num(r, 'launch__grid_size'):.0f} | "
              + ", ".join(f"{s} {v:.2f}" for v, s in stalls) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu --csv --page raw output")
    ap.add_argument("labels", help="profile_cells.py's stderr (one 'profiled ...' line per kernel)")
    args = ap.parse_args()
    main(args.csv, args.labels)
