"""The Python an eager decode call of ``Fp8BlockLinear`` runs, without a GPU: the layer's plan is marked graphed,
captures and replays are stubs, and the device/stream lookups return constants, so what is timed is the library's
own per-call code on the graphed path (docs/performance.md): for a float input, for a fused producer's
``QuantizedActivation``, for the fused modules' chains, and with autograd on beside an empty autograd Function.
``nn.Linear`` at 16x16 on the CPU is printed beside it for scale (its matmul is tiny). Prints microseconds per call,
best of 5 x 20000 back-to-back calls; ``--profile`` adds a cProfile of the layer's calls."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import blockfp8
from blockfp8 import eager_graphs, ops
from blockfp8.modules import Fp8GatedMLP, Fp8NormProjections, Fp8RMSNorm
from blockfp8.quant import QuantizedActivation, quantize_activation
from blockfp8.testing.operands import random_activation, random_fp8_weight


class _Graph:
    def replay(self) -> None:
        pass


class _Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, frozen):
        return _EMPTY_OUT.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


_EMPTY_OUT = torch.zeros(1, 1, 4096, dtype=torch.bfloat16)
_empty_raw = ops._RAW_APPLY.__get__(None, _Empty) if ops._RAW_APPLY is not None else _Empty.apply


def _empty_apply(x: torch.Tensor) -> torch.Tensor:
    return _empty_raw(x, None, ())


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


def _chains() -> None:
    """The fused modules' chain replays (norm producer and GEMMs from one set), on 256-wide reference layers."""

    def capture(self, inputs, run, operands, keep_graph=False):
        run(*inputs, *operands, out=self.out)  # once, as a capture would, so the set's output is real
        return _Graph()

    eager_graphs.EagerGraphs._capture = capture

    def layer(n: int, k: int) -> blockfp8.Fp8BlockLinear:
        return blockfp8.Fp8BlockLinear.from_fp8(*random_fp8_weight(n, k), None, backend="reference")

    norm = Fp8RMSNorm(256, dtype=torch.bfloat16)
    projections = Fp8NormProjections(norm, layer(512, 256))
    mlp = Fp8GatedMLP.from_linears(layer(512, 256), layer(256, 256), norm=norm)
    x = random_activation(1, 256).view(1, 1, 256)
    with torch.inference_mode():
        projections(x)
        mlp(x)  # the modules' calls build the GEMMs' plans
        for lin in (projections.proj, mlp.gate_up_proj, mlp.down_proj):
            for p in ops.PLANS.plans_of(lin.weight):
                p.graphed, p.device_index = True, -1
        print(f"Fp8NormProjections chain (norm + stacked GEMM, replay stubbed): {per_call_us(projections, x):.2f} us; "
              f"Fp8GatedMLP with its norm (norm, gate_up, SiLU-mul, down): {per_call_us(mlp, x):.2f} us")


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
    # With autograd on: the same set through ops._LinearFn, and, for scale, an empty autograd Function applied the
    # way _LinearFn is (the C++ apply): the floor any Function-based call pays over a no-grad one.
    xg = x.clone().requires_grad_()
    print(f"Fp8BlockLinear with autograd on (replay stubbed): {per_call_us(layer, xg):.2f} us; an empty "
          f"autograd Function: {per_call_us(_empty_apply, xg):.2f} us")
    with torch.inference_mode():
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20000):
                layer(x)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
            print(out.getvalue())
    _chains()


if __name__ == "__main__":
    main()
