"""Host us per Fp8BlockLinear call at M=1 (4096x4096) replayed from its eager graph and launched directly, each
backend; the direct call's error against the reference at several M; a cProfile of 2000 direct Triton calls."""
import cProfile
import io
import pstats
import statistics
import time

import torch

import blockfp8
from blockfp8.backends.triton import launch
from blockfp8.eager_graphs import EagerGraphs
from blockfp8.testing.operands import random_activation, random_fp8_weight

print("FAST_LAUNCH", launch.FAST_LAUNCH, flush=True)


def host(fn, calls: int = 1000, runs: int = 5) -> float:
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


for backend in ("triton", "deepgemm", None):
    wq, ws = random_fp8_weight(4096, 4096, device="cuda")
    layer = blockfp8.Fp8BlockLinear.from_fp8(wq, ws, None, backend=backend)
    x = random_activation(1, 4096, device="cuda")
    with torch.inference_mode():
        EagerGraphs.enabled = True
        r = {"replay": host(lambda: layer(x))}  # noqa: B023
        EagerGraphs.enabled = False
        for m in (1, 5, 64, 300):
            xm = random_activation(m, 4096, device="cuda")
            want = torch.ops.blockfp8.linear(xm, wq, ws, None, "reference").float()
            got = layer(xm).float()
            r[f"err M={m}"] = f"{((got - want).norm() / want.norm()).item():.2e}"
        r["direct"] = host(lambda: layer(x))  # noqa: B023
        print(f"backend={backend} 4096x4096 M=1", r, flush=True)
        if backend == "triton":
            p = cProfile.Profile()
            p.enable()
            for _ in range(2000):
                layer(x)
            torch.cuda.synchronize()
            p.disable()
            s = io.StringIO()
            pstats.Stats(p, stream=s).sort_stats("tottime").print_stats(25)
            print("\n".join(s.getvalue().splitlines()[:45]), flush=True)
        EagerGraphs.enabled = True
