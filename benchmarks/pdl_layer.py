"""Programmatic dependent launch of the Triton GEMM, before/after in one process (CUDA, sm_90+). One decoder layer's
four GEMMs of the llama preset (q/k/v stacked 6144x4096, o 4096x4096, gate/up stacked 28672x4096, down 4096x14336),
each behind its activation quantizer as ``linear`` launches them, captured in one CUDA graph over ``--copies``
weight copies (L2-cold: 3 copies hold 650 MB), Triton backend. Variants, each built and captured in this process:
the GEMMs alone on pre-quantized activations, quantizer + GEMM without PDL, with PDL and several prefetch budgets
(``gemm.PREFETCH_BYTES``), the GEMMs alone with PDL (back-to-back GEMMs overlapping), and, where DeepGEMM is
installed, the quantizer + DeepGEMM without and with DeepGEMM's own PDL. Every variant's outputs are compared, bit
for bit, with its kernel's launch without PDL. Prints us per layer (median of 5 x ``--reps`` replays, twice, then
once more after all variants for drift).

Usage: ``python benchmarks/pdl_layer.py [--m 1,16,64] [--copies 3] [--reps 30]``
"""

from __future__ import annotations

import argparse
import statistics

import torch

from blockfp8.backends import get_backend
from blockfp8.backends.triton import gemm as triton_gemm
from blockfp8.backends.triton import launch
from blockfp8.backends.triton.act_quant import quantize_activation_fused
from blockfp8.testing.operands import random_activation, random_fp8_weight

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MB = 1 << 20
# name, PDL, prefetch budget, activation quantizer in the graph
VARIANTS = [("gemm alone", False, 0, False), ("quant+gemm", False, 0, True), ("pdl, no prefetch", True, 0, True),
            ("pdl, prefetch 8 MB", True, 8 * MB, True), ("pdl, prefetch 16 MB", True, 16 * MB, True),
            ("pdl, prefetch 32 MB", True, 32 * MB, True), ("gemm alone, pdl 16 MB", True, 16 * MB, False),
            ("gemm alone, pdl", True, 0, False)]


class _DeepGemm:
    """DeepGEMM in the place of the Triton plan (``deep_gemm.set_pdl`` decides its launch)."""

    counters = 0
    pdl = None
    _tma_constexprs = {"PREFETCH": None}

    def workspace(self, device):
        return None

    def __call__(self, xq, xs, w, s, bias, work=None):
        return get_backend("deepgemm").run(xq, xs, w, s, None, torch.bfloat16)


def build(weights, m: int, pdl: bool, budget: int, quant: bool, deepgemm: bool = False):
    """The layer's launches for every weight copy, captured in one graph with PDL and the budget set as given."""
    launch.PDL, triton_gemm.PREFETCH_BYTES = pdl, budget
    dev = torch.device("cuda")
    xs = {k: random_activation(m, k, device=dev, seed=k) for _, k in SHAPES}
    if deepgemm:
        import deep_gemm

        from blockfp8.backends import deepgemm as deepgemm_backend

        deepgemm_backend._pdl_set = True  # this script decides DeepGEMM's launch, not the backend
        deep_gemm.set_pdl(pdl)
        plans = [[_DeepGemm() for _ in layer] for layer in weights]
    else:
        plans = [[triton_gemm.TritonGemmPlan(w, s, None, torch.bfloat16, m) for w, s in layer] for layer in weights]
    pre = {k: quantize_activation_fused(x, layout="col") for k, x in xs.items()}
    outs: list[torch.Tensor] = []

    def step() -> None:
        outs.clear()
        for layer, layer_plans in zip(weights, plans, strict=True):
            for (w, s), plan, (_, k) in zip(layer, layer_plans, SHAPES, strict=True):
                work = plan.workspace(dev)
                if quant:
                    xq, xsc = quantize_activation_fused(xs[k], layout="col", zero=work, zero_count=plan.counters)
                else:
                    xq, xsc = pre[k]
                    if work is not None:
                        work[:plan.counters].zero_()
                outs.append(plan(xq, xsc, w, s, None, work=work))

    step()
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    # The graph reads the activations' memory: they live as long as the graph (freed, the next variant's
    # tensors would take that memory and the replays would read them).
    return graph, outs, plans[0], (xs, pre)


def time_graph(graph, reps: int, copies: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / reps / copies)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split(". ")[0])
    ap.add_argument("--m", default="1,16,64")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    weights = [[random_fp8_weight(n, k, device="cuda") for n, k in SHAPES] for _ in range(args.copies)]
    saved = launch.PDL, triton_gemm.PREFETCH_BYTES
    for m in (int(v) for v in args.m.split(",")):
        built = {}
        for name, pdl, budget, quant in VARIANTS:
            built[name] = build(weights, m, pdl, budget, quant)
        if get_backend("deepgemm").availability():
            for pdl in (False, True):
                built[f"deepgemm{', pdl' if pdl else ''}"] = build(weights, m, pdl, 0, True, deepgemm=True)
        launch.PDL, triton_gemm.PREFETCH_BYTES = saved
        want = {family: [o.clone() for o in built[base][1]] for family, base in
                (("triton", "quant+gemm"), ("deepgemm", "deepgemm")) if base in built}
        for name, (graph, outs, plans, _) in built.items():
            graph.replay()
            torch.cuda.synchronize()
            family = "deepgemm" if name.startswith("deepgemm") else "triton"
            equal = all(torch.equal(a, b) for a, b in zip(outs, want[family], strict=True))
            us = [time_graph(graph, args.reps, args.copies) for _ in range(2)]
            prefetch = [p._tma_constexprs["PREFETCH"] for p in plans]
            print(f"M={m:<3d} {name:22s} {us[0]:8.2f} {us[1]:8.2f} us/layer  equal={equal}  prefetch groups "
                  f"{prefetch}  pdl={plans[0].pdl}", flush=True)
        for name, (graph, *_) in built.items():
            print(f"  again M={m:<3d} {name:22s} {time_graph(graph, args.reps, args.copies):8.2f}", flush=True)


if __name__ == "__main__":
    main()
