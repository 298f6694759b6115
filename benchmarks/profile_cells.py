"""Run chosen GEMM cells once per backend between cudaProfilerStart/Stop, for Nsight Compute.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section WarpStateStats \
        --csv --page raw python benchmarks/profile_cells.py --cells 2112:7168:1,7168:16384:4096 > ncu.csv

Each (cell, backend) is warmed up (JIT) outside the profiled range, then called once inside it, so the
profile holds exactly one launch per line printed to stderr, in that order. ncu flushes the caches before
each profiled kernel by default, so the weights come from HBM, as in the L2-cold bench.
"""

import argparse
import sys

import torch

from blockfp8 import quantize_weight
from blockfp8.act_quant import quantize_activation_fused
from blockfp8.backends import get_backend


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", required=True, help="N:K:M,... ")
    ap.add_argument("--backends", default="triton,deepgemm,gluon")
    args = ap.parse_args()
    cells = [tuple(int(v) for v in c.split(":")) for c in args.cells.split(",")]
    names = [b for b in args.backends.split(",") if get_backend(b).is_available()]
    runs = []
    for n, k, m in cells:
        wq, ws = quantize_weight(torch.randn(n, k, device="cuda"))
        xq, xs = quantize_activation_fused(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), layout="col")
        for name in names:
            be = get_backend(name)
            for _ in range(3):
                be.run(xq, xs, wq, ws, None, torch.bfloat16)
            runs.append((name, n, k, m, xq, xs, wq, ws))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, n, k, m, xq, xs, wq, ws in runs:
        get_backend(name).run(xq, xs, wq, ws, None, torch.bfloat16)
        torch.cuda.synchronize()
        print(f"profiled {name} N={n} K={k} M={m}", file=sys.stderr, flush=True)
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
