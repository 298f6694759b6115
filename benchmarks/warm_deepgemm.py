"""Compile DeepGEMM's kernels for a shape x M matrix in parallel processes, before any timing or check run.

DeepGEMM JIT-compiles per shape on first call (seconds each) and caches the result on disk, so warming all
cells at once on a many-core machine turns minutes of serial compilation into one short parallel pass."""

import argparse
import multiprocessing as mp
import time


def _warm(cell: tuple[int, int, int]) -> str:
    import torch

    m, n, k = cell
    try:
        import deep_gemm

        from blockfp8.act_quant import quantize_activation_fused
        from blockfp8.quant import quantize_activation, quantize_weight

        wq, ws = quantize_weight(torch.randn(n, k, device="cuda"))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        for xq, xs in (quantize_activation_fused(x, layout="col"), quantize_activation(x)):
            deep_gemm.fp8_gemm_nt((xq, xs), (wq, ws), out, disable_ue8m0_cast=True)
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa: BLE001 - a refused shape is expected for some edge cells
        return f"{type(e).__name__}"


def main() -> None:
    from blockfp8.shapes import parse_ints, parse_shapes

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="edge,deepseek-v3")
    ap.add_argument("--m", default="1,2,7,16,64,77,128,512,1000,2048,4096")
    ap.add_argument("--procs", type=int, default=12)
    args = ap.parse_args()
    cells = [(m, s.n, s.k) for s in parse_shapes(args.shapes) for m in parse_ints(args.m)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.procs) as pool:
        results = pool.map(_warm, cells, chunksize=1)
    failed = {c: r for c, r in zip(cells, results) if r != "ok"}
    print(f"warmed {len(cells)} DeepGEMM cells in {time.time() - t0:.0f} s; not runnable: {failed}")


if __name__ == "__main__":
    main()
