"""Host us per eager Fp8BlockLinear call from moving activation addresses (64 live activations in turn), M=1 and
16, 2112x7168: rebound graph launched through the driver, rebound graph through torch's replay, copying graph
(rebinding off), and nn.Linear. Median of 5 x 2000 calls, one synchronize per run."""
import statistics
import time

import torch

import blockfp8
from blockfp8 import graph_args
from blockfp8.testing.operands import random_activation, random_fp8_weight


def host(fn, xs, calls=2000, runs=5):
    for i in range(100):
        fn(xs[i % len(xs)])
    torch.cuda.synchronize()
    s = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(xs[i % len(xs)])
        torch.cuda.synchronize()
        s.append((time.perf_counter() - t0) / calls * 1e6)
    return round(statistics.median(s), 2)


wq, ws = random_fp8_weight(2112, 7168, device="cuda")
keeps, launcher = graph_args.keeps_graphs, graph_args.launcher
for m in (1, 16):
    xs = [random_activation(m, 7168, seed=i, device="cuda") for i in range(64)]
    lin = torch.nn.Linear(7168, 2112, bias=False, device="cuda", dtype=torch.bfloat16)
    r = {}
    with torch.inference_mode():
        for label in ("driver launch", "torch replay", "copying"):
            graph_args.keeps_graphs = (lambda: False) if label == "copying" else keeps
            graph_args.launcher = (lambda g, s: None) if label == "torch replay" else launcher
            layer = blockfp8.Fp8BlockLinear.from_fp8(wq.clone(), ws.clone(), None)
            want = torch.ops.blockfp8.linear(xs[5], layer.weight, layer.weight_scale_inv, None, "")
            r[label] = host(layer, xs)
            r[label + " equal"] = torch.equal(layer(xs[5]), want)
        r["nn.Linear"] = host(lin, xs)
    graph_args.keeps_graphs, graph_args.launcher = keeps, launcher
    print(f"2112x7168 M={m} moving addresses:", r, flush=True)
