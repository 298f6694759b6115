"""Host us per eager Fp8BlockLinear call on this Triton: graph replay, and direct launches with and without the
fast relaunch (back-to-back calls, median of 5 x 1000)."""
import statistics
import time

import torch
import triton

import blockfp8
from blockfp8.backends.triton import launch
from blockfp8.eager_graphs import EagerGraphs
from blockfp8.testing.operands import random_activation, random_fp8_weight


def host(fn, calls=1000, runs=5):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    s = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        s.append((time.perf_counter() - t0) / calls * 1e6)
    return round(statistics.median(s), 2)
print("triton", triton.__version__, "FAST_LAUNCH default", launch.FAST_LAUNCH, flush=True)
wq, ws = random_fp8_weight(2112, 7168, device="cuda")
layer = blockfp8.Fp8BlockLinear.from_fp8(wq, ws, None, backend="triton")
lin = torch.nn.Linear(7168, 2112, bias=False, device="cuda", dtype=torch.bfloat16)
for m in (1, 16):
    x = random_activation(m, 7168, device="cuda")
    with torch.inference_mode():
        want = torch.ops.blockfp8.linear(x, wq, ws, None, "triton")
        r = {"nn.Linear": host(lambda x=x: lin(x)), "graph replay": host(lambda x=x: layer(x))}
        EagerGraphs.enabled = False
        for fast in (False, True):
            launch.FAST_LAUNCH = fast
            try:
                ok = torch.equal(layer(x), want)
                r[f"direct fast={fast} (equal={ok})"] = host(lambda x=x: layer(x))
            except Exception as e:  # noqa: BLE001
                r[f"direct fast={fast}"] = f"{type(e).__name__}: {str(e)[:120]}"
        EagerGraphs.enabled, launch.FAST_LAUNCH = True, launch._fast_launch_enabled()
    print(f"2112x7168 M={m}", r, flush=True)
