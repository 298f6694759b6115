"""Tensor-parallel decode demo: a stack of Megatron-style pairs on DeepSeek-V3 layer shapes.

Each pair is ``h = h + down(act(up(rms_norm(h))))`` with ``up`` column-parallel (split N, no gather) and ``down``
row-parallel (split K, all-reduce), so one pair costs one all_reduce (plus a tiny amax exchange when a split
cuts an activation group). Weights are random but drawn from the same seed on every rank, so TP 1 and TP N
compute the same model; rank 0 also runs the unsharded model and reports the relative error of the final
output, the time per decode step (TPOT) and each local GEMM's time with the backend the dispatcher chose.

    torchrun --nproc-per-node 8 -m blockfp8 tp-demo --layers 4 --steps 50 --batch 1 8 32 --json tp8.json
    blockfp8 tp-demo                      # one process, TP 1; on CPU the shapes / 16 (--small) by default

NCCL and ``cuda:LOCAL_RANK`` when CUDA is available, gloo on CPU otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from ..device import device_key
from ..dispatch import explain
from ..distributed import RowParallelFp8Linear, shard
from ..nn import Fp8BlockLinear
from ..ops import linear
from ..reference import rel_error
from ..testing.operands import random_fp8_weight, weight_copies
from ..testing.shapes import shape_set
from ..testing.timing import capture_graph, time_fn, time_steps
from .common import (
    add_row,
    announce,
    cpu_timing_note,
    one_cpu_thread,
    plain,
    positive_int,
    stdout_console,
    write_text,
)

# One decoder layer: (pair name, up layer, down layer, gated), layer names from data/shapes.json. ``None`` stands
# for the transpose of its partner -- not a DeepSeek-V3 layer, chosen so the pair chains back to the hidden
# size. fused_qkv_a_proj (N=2112) is the shape whose TP-8 shards (264 rows) cut 128-blocks.
PAIRS = {
    "deepseek-v3": (
        ("qkv_a", "fused_qkv_a_proj", None, False),
        ("attention", None, "o_proj", False),
        ("mlp", "dense_mlp.gate_up_proj", "dense_mlp.down_proj", True),
    ),
}
SMALL_DIVISOR = 16  # --small: every dimension / 16 (still cuts blocks: 2112 -> 132)
# Row-parallel partials: in the activations' dtype (what serving engines all-reduce) or in fp32.
REDUCE_DTYPES = {"bf16": None, "fp32": torch.float32}


@dataclass(frozen=True)
class PairShape:
    name: str
    up: tuple[str, int, int]  # (layer name, N, K)
    down: tuple[str, int, int]
    gated: bool


def pair_shapes(preset: str = "deepseek-v3", small: bool = False) -> list[PairShape]:
    """The up/down shapes of one decoder layer of ``preset`` (every dimension / 16 with ``small``)."""
    if preset not in PAIRS:
        raise ValueError(f"shapes must be one of {sorted(PAIRS)}, got {preset!r}")
    nk = {s.name: (s.n, s.k) for s in shape_set(preset)}
    div = SMALL_DIVISOR if small else 1
    out = []
    for name, up, down, gated in PAIRS[preset]:
        up_nk = nk[up] if up else nk[down][::-1]
        down_nk = nk[down] if down else up_nk[::-1]
        up = up or f"{down}^T (stand-in)"
        down = down or f"{up}^T (stand-in)"
        out.append(PairShape(name, (up, up_nk[0] // div, up_nk[1] // div),
                             (down, down_nk[0] // div, down_nk[1] // div), gated))
    return out


def random_layer(n: int, k: int, seed: int, device: torch.device) -> Fp8BlockLinear:
    """A deterministic random block-FP8 layer (``testing.operands``: block magnitudes spread, so a misplaced
    scale row or column shows in the error), with std about 1/sqrt(K) so activations stay O(1) through pairs."""
    wq, ws = random_fp8_weight(n, k, spread=0.5, seed=seed, device=device)
    return Fp8BlockLinear.from_fp8(wq, ws / k ** 0.5)


class Pair(nn.Module):
    """``h + down(act(up(rms_norm(h))))``; ``act`` is SiLU, or SiLU(gate) * up for a fused gate_up."""

    def __init__(self, up: nn.Module, down: nn.Module, gated: bool) -> None:
        super().__init__()
        self.up, self.down, self.gated = up, down, gated

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(h, (h.shape[-1],), eps=1e-6)
        y = self.up(x)
        if self.gated:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.silu(y)
        return h + self.down(y)


def build_models(shapes: list[PairShape], layers: int, rank: int, world_size: int, group, device: torch.device,
                 seed: int = 0) -> tuple[nn.Sequential, nn.Sequential | None]:
    """(this rank's TP model, the unsharded model on rank 0 else None), from the same random weights."""
    tp, full = [], []
    for layer in range(layers):
        for i, p in enumerate(shapes):
            base = seed + 1000 * layer + 10 * i
            up, down = random_layer(*p.up[1:], base, device), random_layer(*p.down[1:], base + 1, device)
            parts = (p.up[1] // 2,) * 2 if p.gated else None
            tp.append(Pair(shard(up, rank, world_size, "column", group=group, parts=parts),
                           shard(down, rank, world_size, "row", group=group), p.gated))
            if rank == 0:
                full.append(Pair(up, down, p.gated))
    return nn.Sequential(*tp), (nn.Sequential(*full) if rank == 0 else None)


def tpot_ms(step: Callable[[], object], device: torch.device, steps: int, cuda_graph: bool) -> float:
    """Median milliseconds per decode step (synchronized on both ends; replays of one CUDA graph if asked)."""
    fn = capture_graph(step, warmup=3)[0].replay if cuda_graph else step
    return statistics.median(time_steps(fn, device, warmup=2, steps=steps)) * 1e3


def _compute_dtype(mod: nn.Module) -> torch.dtype:
    """Dtype a shard's GEMM runs in: a row shard's reduce dtype if it has one, else the activations' bf16."""
    return getattr(mod, "reduce_dtype", None) or torch.bfloat16


def gemm_us(mod: nn.Module, m: int, device: torch.device, reps: int) -> tuple[float, str]:
    """(median microseconds, timing method) of one local linear (activation quantization + GEMM) of a shard,
    rotating over enough weight copies that each call streams its weight from HBM (``testing.timing``)."""
    sets = weight_copies(mod.weight, mod.weight_scale_inv)
    x = torch.randn(m, mod.weight.shape[1], dtype=_compute_dtype(mod), device=device)
    t = time_fn(lambda wc, sc: linear(x, wc, sc, mod.bias, backend=mod.backend), rotate=sets, reps=reps)
    return t.median_us, t.method


def _slowest(value: float, device: torch.device, group) -> float:
    """The largest ``value`` over the ranks (a step is as slow as its slowest rank)."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _init() -> tuple[int, int, torch.device, object]:
    """(rank, world_size, device, group): torchrun's environment if present, else one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=5))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    return dist.get_rank(), dist.get_world_size(), device, dist.group.WORLD


def _gemm_rows(model: nn.Sequential, shapes: list[PairShape], m: int, args, device, group) -> list[dict]:
    """Each local linear of the first layer's shards: shape, chosen backend, time of the slowest rank."""
    rows = []
    for pair, p in zip(model[:len(shapes)], shapes, strict=True):
        for mod, (name, n, k), style in ((pair.up, p.up, "column"), (pair.down, p.down, "row")):
            n_loc, k_loc = mod.weight.shape
            us, method = gemm_us(mod, m, device, args.gemm_reps)
            us = _slowest(us, device, group)
            backend = explain(m, n_loc, k_loc, device, _compute_dtype(mod)).choice
            rows.append({"layer": name, "style": style, "N": n, "K": k, "local_N": n_loc, "local_K": k_loc,
                         "backend": backend, "us": us, "timing": method,
                         "weight_GBps": mod.weight.numel() / (us * 1e-6) / 1e9})
    return rows


def set_reduce_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Make every row-parallel shard of ``model`` compute and all-reduce its partials in ``dtype``."""
    for mod in model.modules():
        if isinstance(mod, RowParallelFp8Linear):
            mod.reduce_dtype = dtype


def _errors(model: nn.Sequential, ref: nn.Sequential | None, inputs: list[torch.Tensor]) -> dict:
    """Max relative error vs TP 1 over the steps, of the first pair and of the final output, for each
    all-reduce dtype. Every rank runs the TP model (it holds collectives); rank 0 compares."""
    want = None if ref is None else {"first_pair": [ref[0](x) for x in inputs], "final": [ref(x) for x in inputs]}
    out: dict = {}
    for label, dtype in REDUCE_DTYPES.items():
        set_reduce_dtype(model, dtype)
        for name, tp in (("first_pair", model[0]), ("final", model)):
            got = [tp(x) for x in inputs]
            if want is not None:
                out.setdefault(name, {})[label] = max(rel_error(g, w) for g, w in zip(got, want[name], strict=True))
    return out


def _run_batch(model, ref, shapes, m: int, args, device, group) -> dict:
    hidden = shapes[0].up[2]
    g = torch.Generator(device=device).manual_seed(args.seed + 7 + m)
    inputs = [torch.randn(m, hidden, generator=g, device=device).to(torch.bfloat16) for _ in range(args.steps)]
    with torch.no_grad():
        result = {"M": m, "max_rel_error_vs_tp1": _errors(model, ref, inputs)}
        set_reduce_dtype(model, REDUCE_DTYPES[args.reduce_dtype])
        step = lambda: model(inputs[0])  # noqa: E731
        result.update(tpot_ms_eager=_slowest(tpot_ms(step, device, args.steps, False), device, group),
                      tpot_ms_cuda_graph=None, cuda_graph_error=None)
        if device.type == "cuda" and args.cuda_graph:
            try:
                result["tpot_ms_cuda_graph"] = _slowest(tpot_ms(step, device, args.steps, True), device, group)
            except RuntimeError as e:  # a refused capture keeps the eager number and says why
                result["cuda_graph_error"] = f"{type(e).__name__}: {e}"
        result["gemms"] = _gemm_rows(model, shapes, m, args, device, group)
    return result


def _print(report: dict) -> None:
    console = stdout_console(150)
    console.print(plain(f"TP {report['world_size']} on {report['device']} ({report['dist_backend']}), "
                        f"{report['layers']} layer(s) x {len(report['pairs'])} pairs, shapes {report['shapes']}"
                        f"{' (small)' if report['small'] else ''}, all-reduce in {report['reduce_dtype']} for timing"))
    for r in report["batches"]:
        graph = r["tpot_ms_cuda_graph"]
        console.print(plain(f"M={r['M']}: TPOT eager {r['tpot_ms_eager']:.3f} ms"
                            + (f", CUDA graph {graph:.3f} ms" if graph is not None else "")
                            + (f" (graph failed: {r['cuda_graph_error']})" if r["cuda_graph_error"] else "")))
        for name, by_dtype in r["max_rel_error_vs_tp1"].items():
            errs = ", ".join(f"{e:.2e} ({d} all-reduce)" for d, e in by_dtype.items())
            console.print(plain(f"  max rel error vs TP 1, {name.replace('_', ' ')}: {errs}"))
        table = Table("layer", "style", "N x K", "local N x K (rank 0)", "backend", "us (slowest rank)",
                      "weight GB/s", "timing", title=f"local linear (quantize + GEMM) per shard, M={r['M']}")
        for g in r["gemms"]:
            add_row(table, g["layer"], g["style"], f"{g['N']} x {g['K']}", f"{g['local_N']} x {g['local_K']}",
                    g["backend"], f"{g['us']:.1f}", f"{g['weight_GBps']:.1f}", g["timing"])
        console.print(table)
    if report["device"] == "cpu":
        gloo = "; gloo stands in for NCCL" if report["dist_backend"] == "gloo" else ""
        console.print(plain(cpu_timing_note(f"median of {report['steps']} steps") + gloo))


# What runs without --full: GPU-sized (DeepSeek-V3 shapes, 20 steps) under CUDA; CPU-sized (every dimension / 16,
# 5 steps) otherwise, where the full shapes take minutes per step.
GPU_SIZES = {"steps": 20, "gemm_reps": 20}
CPU_SIZES = {"steps": 5, "gemm_reps": 5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=positive_int, default=2,
                        help="decoder layers (each one pair per preset entry)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="decode steps timed and checked (default: 20 on CUDA or with --full, 5 on CPU)")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1],
                        help="tokens per decode step (M), one or more")
    parser.add_argument("--shapes", default="deepseek-v3", choices=sorted(PAIRS))
    parser.add_argument("--small", action="store_true",
                        help=f"divide every dimension by {SMALL_DIVISOR} (the default on CPU)")
    parser.add_argument("--full", action="store_true",
                        help="the GPU-sized defaults (full shapes, 20 steps) even on CPU, where they take minutes")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                        help="also time decode steps as CUDA graph replays (GPU only)")
    parser.add_argument("--gemm-reps", type=positive_int, default=None,
                        help="timed repetitions per local GEMM (default: 20 on CUDA or with --full, 5 on CPU)")
    parser.add_argument("--reduce-dtype", choices=sorted(REDUCE_DTYPES), default="bf16",
                        help="dtype of the row-parallel partials and all-reduce while timing (errors show both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the report (rank 0) to this file")


def _sizes(args: argparse.Namespace, device: torch.device) -> tuple[bool, dict]:
    """(small shapes?, steps and GEMM repetitions) from the arguments and the device."""
    if args.small and args.full:
        raise ValueError("--small and --full contradict each other: pass one")
    big = device.type == "cuda" or args.full
    small = args.small or not big
    defaults = GPU_SIZES if big else CPU_SIZES
    given = {"steps": args.steps, "gemm_reps": args.gemm_reps}
    return small, {k: defaults[k] if v is None else v for k, v in given.items()}


def run(args: argparse.Namespace) -> int:
    rank, world_size, device, group = _init()
    try:
        small, sizes = _sizes(args, device)
        args.small, args.steps, args.gemm_reps = small, sizes["steps"], sizes["gemm_reps"]
        if rank == 0:
            cpu_sized = small and device.type == "cpu" and not args.full
            announce(f"tp-demo: TP {world_size}, {args.layers} layer(s), {args.shapes} shapes"
                     f"{' / ' + str(SMALL_DIVISOR) if small else ''}, batch {' '.join(map(str, args.batch))}, "
                     f"{args.steps} steps on {device.type}" + (" (CPU-sized)" if cpu_sized else ""),
                     "blockfp8 tp-demo --full (the real shapes; under torchrun on GPUs)" if cpu_sized else None)
        shapes = pair_shapes(args.shapes, small)
        model, ref = build_models(shapes, args.layers, rank, world_size, group, device, args.seed)
        batches = []
        with one_cpu_thread(device):
            for m in args.batch:
                batches.append(_run_batch(model, ref, shapes, m, args, device, group))
                if rank == 0:
                    announce(f"tp-demo: M={m} done")
        if rank == 0:
            report = {
                "world_size": world_size,
                "device": device_key(device),
                "dist_backend": dist.get_backend() if group else "none",
                "torch": torch.__version__,
                "shapes": args.shapes, "small": small, "layers": args.layers, "steps": args.steps,
                "reduce_dtype": args.reduce_dtype,
                "pairs": [p.__dict__ for p in shapes],
                "batches": batches,
                "command": " ".join(sys.argv),
            }
            _print(report)
            if args.json:
                write_text(args.json, json.dumps(report, indent=2))
        if group is not None:
            dist.barrier(group=group)  # tear down together: a rank leaving early can abort in gloo's threads
    finally:
        if group is not None:
            dist.destroy_process_group()
    return 0
