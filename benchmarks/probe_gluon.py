"""Config probe for the Gluon (wgmma) GEMM on the GPU: L2-cold CUDA-graph time of each GluonConfig variant
next to blockfp8's Triton kernel and DeepGEMM, after a reference check of every variant. One JSON line per
(cell, method); used to choose the Gluon defaults (docs/performance.md)."""

import argparse
import json

import torch

from blockfp8 import quantize_weight, reference_gemm, rel_error
from blockfp8.act_quant import quantize_activation_fused
from blockfp8.backends import get_backend
from blockfp8.backends.gluon import GluonConfig, gluon_gemm
from blockfp8.reference import TOLERANCE
from blockfp8.shapes import parse_ints, parse_shapes
from blockfp8.timing import cold_copies, l2_cache_bytes, time_fn

VARIANTS = {
    "g128x128_s4_u2": GluonConfig(),
    "g128x128_s3_u2": GluonConfig(stages=3),
    "g128x128_s5_u2": GluonConfig(stages=5),
    "g128x128_s4_u4": GluonConfig(unroll=4),
    "g128x128_gm16": GluonConfig(group_m=16),
    "g128x128_gm4": GluonConfig(group_m=4),
    "g128x64_s6_u2": GluonConfig(block_n=64, stages=6),
    "g64x128_w4_s4": GluonConfig(block_m=64, num_warps=4),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="deepseek-v3")
    ap.add_argument("--m", default="512,2048,4096")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    l2 = l2_cache_bytes()
    for shape in parse_shapes(args.shapes):
        n, k = shape.n, shape.k
        for m in parse_ints(args.m):
            w = torch.randn(n, k, device="cuda")
            wq, ws = quantize_weight(w)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_activation_fused(x, layout="col")
            want = reference_gemm(xq, xs, wq, ws, None, torch.bfloat16)
            copies = cold_copies(wq.numel() + xq.numel(), l2)
            wsets = [(wq.clone(), ws.clone()) for _ in range(copies)]
            methods = {name: (lambda a, b, c, d, cfg=cfg: gluon_gemm(a, b, c, d, None, torch.bfloat16, cfg))
                       for name, cfg in variants.items()}
            for other in ("triton", "deepgemm"):
                be = get_backend(other)
                if be.is_available():
                    methods[other] = (lambda a, b, c, d, be=be: be.run(a, b, c, d, None, torch.bfloat16))
            for name, fn in methods.items():
                rec = {"n": n, "k": k, "m": m, "method": name}
                try:
                    err = rel_error(fn(xq, xs, wq, ws), want)
                    rec["rel_err"] = err
                    if err > TOLERANCE:
                        rec["wrong"] = True
                    else:
                        sets = [(xq, xs, *ws_i) for ws_i in wsets]
                        t = time_fn(fn, rotate=sets, reps=args.reps, hot=False)
                        rec["us"] = round(t.median_us, 2)
                        rec["tflops"] = round(2 * m * n * k / t.median_us / 1e6, 1)
                except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
