"""Compile DeepGEMM's kernels for a shape x M matrix in parallel processes, before any timing or check run.

DeepGEMM JIT-compiles per shape on first call (seconds each) and caches the result on disk, so warming all
cells at once on a many-core machine turns minutes of serial compilation into one short parallel pass. Each
cell is called with both activation-scale layouts blockfp8 passes (row-major and the TMA-aligned column-major
one), on operands from ``blockfp8.testing.operands``."""

import argparse
import multiprocessing as mp
import time

from blockfp8.testing.shapes import parse_ints, parse_shapes


def _warm(cell: tuple[int, int, int]) -> str:
    m, n, k = cell
    try:
        import deep_gemm
        import torch

        from blockfp8.testing.operands import make_operands, make_weight_copies

        ops = make_operands(make_weight_copies(n, k, "cuda", copies=1), m)
        wq, ws = ops.weights[0]
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        for xs in (ops.x_scale_col, ops.x_scale):
            deep_gemm.fp8_gemm_nt((ops.x_fp8, xs), (wq, ws), out, disable_ue8m0_cast=True)
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa: BLE001 - a refused shape is expected for some edge cells
        return f"{type(e).__name__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="edge,deepseek-v3")
    ap.add_argument("--m", default="1,2,7,16,64,77,128,512,1000,2048,4096")
    ap.add_argument("--procs", type=int, default=12)
    args = ap.parse_args()
    cells = [(m, s.n, s.k) for s in parse_shapes(args.shapes) for m in parse_ints(args.m)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.procs) as pool:
        results = pool.map(_warm, cells, chunksize=1)
    failed = {c: r for c, r in zip(cells, results, strict=True) if r != "ok"}
    print(f"warmed {len(cells)} DeepGEMM cells in {time.time() - t0:.0f} s; not runnable: {failed}")


if __name__ == "__main__":
    main()
