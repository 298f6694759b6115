"""Config probe for the Gluon (wgmma) GEMMs on the GPU: L2-cold CUDA-graph time of each GluonConfig variant (the
one-tile kernel's "g..." and the persistent kernel's "p...") next to blockfp8's Triton kernel and DeepGEMM, after a
reference check of every variant. One JSON line per (cell, method); used to choose the Gluon defaults
(docs/performance.md, docs/benchmarks.md).

Operands from ``blockfp8.testing.operands`` (weight copies for L2-cold timing), timing from
``blockfp8.testing.timing``, the check against ``blockfp8.reference``."""

import argparse
import json

import torch

from blockfp8.backends import get_backend
from blockfp8.backends.gluon import GluonConfig, gluon_gemm
from blockfp8.reference import TOLERANCE, rel_error
from blockfp8.testing.operands import make_operands, make_weight_copies
from blockfp8.testing.shapes import parse_ints, parse_shapes
from blockfp8.testing.timing import time_fn

VARIANTS = {
    "g128x128_s4_u2": GluonConfig(),
    "g128x128_s3_u2": GluonConfig(stages=3),
    "g128x128_s5_u2": GluonConfig(stages=5),
    "g128x128_s4_u4": GluonConfig(unroll=4),
    "g128x128_gm16": GluonConfig(group_m=16),
    "g128x128_gm4": GluonConfig(group_m=4),
    "g128x64_s6_u2": GluonConfig(block_n=64, stages=6),
    "g64x128_w4_s4": GluonConfig(block_m=64, num_warps=4),
    # The persistent, warp-specialized kernel (one program per SM, a loader warp, a math warp group per 64 rows).
    "p128x128_s4_u2": GluonConfig(persistent=True),
    "p128x128_s6_u2": GluonConfig(stages=6, persistent=True),
    "p128x64_s6_u2": GluonConfig(block_n=64, stages=6, persistent=True),
    "p64x128_s6_u2": GluonConfig(block_m=64, num_warps=4, stages=6, persistent=True),
    # Decode tiles: 64 or 32 columns give 2-4x the tiles of 64 x 128, so more SMs read the weight at M <= 64.
    "p64x64_s6_u2": GluonConfig(block_m=64, block_n=64, num_warps=4, stages=6, persistent=True),
    "p64x32_s8_u2": GluonConfig(block_m=64, block_n=32, num_warps=4, stages=8, persistent=True),
    "p128x128_s4_u2_gm16": GluonConfig(group_m=16, persistent=True),
}


def methods(variants: dict[str, GluonConfig]) -> dict:
    """name -> fn(x_fp8, x_scale_col, w_fp8, weight_scale_inv): each Gluon variant, then the Triton backend and
    DeepGEMM where available (both read the column-major activation scales)."""
    out = {name: (lambda a, b, c, d, cfg=cfg: gluon_gemm(a, b, c, d, None, torch.bfloat16, cfg))
           for name, cfg in variants.items()}
    for other in ("triton", "deepgemm"):
        be = get_backend(other)
        if be.availability():
            out[other] = lambda a, b, c, d, be=be: be.run(a, b, c, d, None, torch.bfloat16)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="deepseek-v3")
    ap.add_argument("--m", default="512,2048,4096")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    fns = methods(variants)
    for shape in parse_shapes(args.shapes):
        n, k = shape.n, shape.k
        weights = make_weight_copies(n, k, "cuda")
        for m in parse_ints(args.m):
            ops = make_operands(weights, m)
            xq, xs = ops.x_fp8, ops.x_scale_col
            want = ops.reference()
            sets = [(xq, xs, w, s) for w, s in ops.weights]
            for name, fn in fns.items():
                rec = {"n": n, "k": k, "m": m, "method": name}
                try:
                    err = rel_error(fn(*sets[0]), want)
                    rec["rel_err"] = err
                    if err > TOLERANCE:
                        rec["wrong"] = True
                    else:
                        t = time_fn(fn, rotate=sets, reps=args.reps, hot=False)
                        rec["us"] = round(t.median_us, 2)
                        rec["tflops"] = round(2 * m * n * k / t.median_us / 1e6, 1)
                except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(rec), flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
