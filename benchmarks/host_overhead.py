"""Host time per call of blockfp8's eager path, piece by piece, next to F.linear (GPU).

Each line: the median over 5 runs of (2000 back-to-back calls, then one synchronize) / 2000, so a call whose GPU
work is shorter than its host work measures its host time. Decode shapes (M=1), bf16 input. Used to decide where
the eager path's per-call work goes (docs/performance.md).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats

import torch
import torch.nn.functional as F

import blockfp8
from blockfp8.backends import Problem, get_backend
from blockfp8.backends.triton import act_quant
from blockfp8.backends.triton import gemm as tgemm
from blockfp8.backends.triton.configs import get_config
from blockfp8.dispatch import choose
from blockfp8.ops import quantize_for
from blockfp8.testing.operands import random_fp8_weight
from blockfp8.testing.timing import host_time_us


def host_us(fn) -> float:
    return host_time_us(fn, "cuda")


def measure_shape(n: int, k: int, m: int) -> dict:
    """Host microseconds per call of each piece at one (M, N, K)."""
    wq, ws = random_fp8_weight(n, k, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    be = get_backend(choose(Problem.of(m, n, k, "cuda")))
    xq, xs = quantize_for(be, x)
    layer = blockfp8.Fp8BlockLinear.from_fp8(wq, ws, None)

    def body():
        b = get_backend(choose(Problem.of(m, n, k, x.device), None))
        q, s = quantize_for(b, x)
        return b.run(q, s, wq, ws, None, x.dtype)

    r = {"backend": be.name}
    with torch.inference_mode():
        r["F.linear bf16"] = host_us(lambda: F.linear(x, wb))
        r["Fp8BlockLinear forward"] = host_us(lambda: layer(x))
        r["blockfp8.linear"] = host_us(lambda: blockfp8.linear(x, wq, ws))
        r["custom op (torch.ops.blockfp8.linear)"] = host_us(lambda: torch.ops.blockfp8.linear(x, wq, ws, None, ""))
        r["op body without the custom op"] = host_us(body)
        r["Problem.of + choose"] = host_us(lambda: choose(Problem.of(m, n, k, x.device), None))
        r["fused quantizer"] = host_us(lambda: act_quant.quantize_activation_fused(x, layout=be.scale_layout))
        r["backend.run"] = host_us(lambda: be.run(xq, xs, wq, ws, None, torch.bfloat16))
        r["torch.empty x3"] = host_us(lambda: (torch.empty(m, n, dtype=torch.bfloat16, device="cuda"),
                                               torch.empty(m, k, dtype=torch.float8_e4m3fn, device="cuda"),
                                               torch.empty(m, 56, device="cuda")))
        r["TensorDescriptor.from_tensor"] = host_us(lambda: tgemm.TensorDescriptor.from_tensor(wq, [64, 128]))
        r["get_config"] = host_us(lambda: get_config(m, n, k, x.device))
        if be.name == "triton":
            plan = tgemm.TritonGemmPlan(wq, ws, None, torch.bfloat16, m)
            r["Triton GEMM plan call"] = host_us(lambda: plan(xq, xs, wq, ws, None))
    return {key: (round(v, 2) if isinstance(v, float) else v) for key, v in r.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="2112:7168,7168:2048")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of 2000 Fp8BlockLinear calls")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = {}
    for spec in args.shapes.split(","):
        n, k = (int(v) for v in spec.split(":"))
        rows[f"{n}x{k} M={args.m}"] = measure_shape(n, k, args.m)
        print(json.dumps({f"{n}x{k} M={args.m}": rows[f"{n}x{k} M={args.m}"]}), flush=True)
    if args.profile:
        n, k = (int(v) for v in args.shapes.split(",")[0].split(":"))
        layer = blockfp8.Fp8BlockLinear.from_fp8(*random_fp8_weight(n, k, device="cuda"), None)
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        pr = cProfile.Profile()
        with torch.inference_mode():
            layer(x)
            pr.enable()
            for _ in range(2000):
                layer(x)
            torch.cuda.synchronize()
            pr.disable()
        sio = io.StringIO()
        pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(25)
        print(sio.getvalue()[:6000])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
