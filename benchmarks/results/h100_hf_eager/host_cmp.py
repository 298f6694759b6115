"""Host us per call (median of 5 x 2000 back-to-back calls + one synchronize, after 50 warm-up calls), for
whichever blockfp8 is importable. Usage: python3 host_cmp.py TAG (writes $OUT/host_TAG.json); a TAG other than
"before" adds the copy-in-only and direct-launch rows of eager_graphs.py."""

import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import blockfp8
from blockfp8.quant import dequantize_weight
from blockfp8.testing.operands import random_activation, random_fp8_weight


def host(fn, calls: int = 2000, runs: int = 5) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return round(statistics.median(samples), 2)


def main(tag: str) -> None:
    out = {}
    for n, k in ((2112, 7168), (7168, 2048)):
        wq, ws = random_fp8_weight(n, k, device="cuda")
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        with torch.no_grad():
            lin.weight.copy_(dequantize_weight(wq, ws, dtype=torch.bfloat16))
        layer = blockfp8.Fp8BlockLinear.from_fp8(wq, ws, None)
        for m in (1, 16):
            x = random_activation(m, k, device="cuda")
            xg = x.clone().requires_grad_()
            xq, xs = blockfp8.quantize_activation(x)
            r = {"grad Fp8BlockLinear": host(lambda: layer(xg)), "grad nn.Linear": host(lambda: lin(xg))}  # noqa: B023
            with torch.no_grad():
                r["no_grad Fp8BlockLinear"] = host(lambda: layer(xg))  # noqa: B023
                r["no_grad nn.Linear"] = host(lambda: lin(xg))  # noqa: B023
            with torch.inference_mode():
                r["F.linear"] = host(lambda: F.linear(x, lin.weight))  # noqa: B023
                r["nn.Linear"] = host(lambda: lin(x))  # noqa: B023
                r["Fp8BlockLinear"] = host(lambda: layer(x))  # noqa: B023
                r["blockfp8.linear"] = host(lambda: blockfp8.linear(x, wq, ws))  # noqa: B023
                r["blockfp8.gemm"] = host(lambda: blockfp8.gemm(xq, xs, wq, ws))  # noqa: B023
                if tag != "before":
                    from blockfp8.eager_graphs import EagerGraphs

                    EagerGraphs.IN_PLACE = 0
                    copying = blockfp8.Fp8BlockLinear.from_fp8(wq, ws, None)
                    r["Fp8BlockLinear copy-in"] = host(lambda: copying(x))  # noqa: B023
                    EagerGraphs.IN_PLACE, EagerGraphs.enabled = 4, False
                    r["Fp8BlockLinear direct"] = host(lambda: layer(x))  # noqa: B023
                    EagerGraphs.enabled = True
            out[f"{n}x{k} M={m}"] = r
            print(tag, f"{n}x{k} M={m}", r, flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"host_{tag}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
