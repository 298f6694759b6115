"""Run chosen GEMM cells once per backend between cudaProfilerStart/Stop, for Nsight Compute.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section WarpStateStats \
        --csv --page raw python benchmarks/profile_cells.py --cells 2112:7168:1,7168:16384:4096 > ncu.csv

Each (cell, backend) is warmed up (JIT) outside the profiled range, then called once inside it, so the
profile holds exactly one launch per line printed to stderr, in that order (benchmarks/summarize_ncu.py turns
the CSV and those lines into a table). ncu flushes the caches before each profiled kernel by default, so the
weights come from HBM, as in the L2-cold bench. Operands come from ``blockfp8.testing.operands``, with the
activation scales in the layout each backend reads (as ``blockfp8 bench`` passes them).
"""

import argparse
import sys

import torch

from blockfp8.backends import get_backend
from blockfp8.testing.operands import make_operands, make_weight_copies


def parse_cells(spec: str) -> list[tuple[int, int, int]]:
    cells = []
    for item in spec.split(","):
        try:
            n, k, m = (int(v) for v in item.split(":"))
        except ValueError:
            raise SystemExit(f"--cells: {item!r} is not N:K:M") from None
        cells.append((n, k, m))
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", required=True, help="N:K:M,... ")
    ap.add_argument("--backends", default="triton,deepgemm,gluon")
    args = ap.parse_args()
    cells = parse_cells(args.cells)
    names = [b for b in args.backends.split(",") if get_backend(b).availability()]
    runs = []
    for n, k, m in cells:
        ops = make_operands(make_weight_copies(n, k, "cuda", copies=1), m)
        wq, ws = ops.weights[0]
        for name in names:
            be = get_backend(name)
            xs = ops.scales(be.scale_layout)
            for _ in range(3):
                be.run(ops.x_fp8, xs, wq, ws, None, torch.bfloat16)
            runs.append((name, n, k, m, ops.x_fp8, xs, wq, ws))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, n, k, m, xq, xs, wq, ws in runs:
        get_backend(name).run(xq, xs, wq, ws, None, torch.bfloat16)
        torch.cuda.synchronize()
        print(f"profiled {name} N={n} K={k} M={m}", file=sys.stderr, flush=True)
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
