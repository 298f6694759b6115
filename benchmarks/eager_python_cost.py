"""The Python an eager decode call of ``Fp8BlockLinear`` runs, without a GPU: the layer's plan is marked graphed,
captures and replays are stubs, and the device/stream lookups return constants, so what is timed is the library's
own per-call code on the graphed path (docs/performance.md), for a float input and for a fused producer's
``QuantizedActivation``. ``nn.Linear`` at 16x16 on the CPU is printed beside it
for scale (its matmul is tiny). Prints microseconds per call, best of 5 x 20000 back-to-back calls;
``--profile`` adds a cProfile of the layer's calls."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import blockfp8
from blockfp8 import eager_graphs, ops
from blockfp8.quant import QuantizedActivation, quantize_activation
from blockfp8.testing.operands import random_activation, random_fp8_weight


class _Graph:
    def replay(self) -> None:
        pass


def per_call_us(fn, x, calls: int = 20000, runs: int = 5) -> float:
    for _ in range(100):
        fn(x)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    eager_graphs.EagerGraphs._capture = lambda self, inputs, run, operands, keep_graph=False: _Graph()
    ops._current_device = lambda: -1
    ops.current_raw_stream = lambda index: 7
    ops._capturing = lambda: False
    wq, ws = random_fp8_weight(4096, 4096)
    layer = blockfp8.Fp8BlockLinear.from_fp8(wq, ws, None, backend="reference")
    x = random_activation(1, 4096).view(1, 1, 4096)
    small, xs = torch.nn.Linear(16, 16, bias=False), torch.randn(1, 16)
    with torch.inference_mode():
        layer(x)
        plan, = ops.PLANS.plans_of(layer.weight)
        plan.graphed, plan.device_index = True, -1
        print(f"Fp8BlockLinear eager graphed call (replay stubbed): {per_call_us(layer, x):.2f} us; "
              f"nn.Linear 16x16 on the CPU: {per_call_us(small, xs):.2f} us")
        # The same layer fed a fused producer's output: its GEMM set, reached through the GEMM shortcut.
        qa = QuantizedActivation(*quantize_activation(x.view(1, 4096)), torch.bfloat16)
        layer(qa)
        for p in ops.PLANS.plans_of(layer.weight):
            p.graphed, p.device_index = True, -1
        print(f"Fp8BlockLinear fed a QuantizedActivation (replay stubbed): {per_call_us(layer, qa):.2f} us")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20000):
                layer(x)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
            print(out.getvalue())


if __name__ == "__main__":
    main()
