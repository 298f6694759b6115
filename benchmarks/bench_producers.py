"""What a fused quantizing producer costs next to the GEMM it feeds, on the DeepSeek-V3 linears whose input comes
from an RMSNorm or a SiLU-mul (docs/fused.md).

Per (shape, M), timed with ``blockfp8.testing.timing.time_fn`` (one CUDA graph over rotated weight copies, L2-cold;
the activation is shared, as a layer's input sits in L2 after the op that made it):

* ``gemm``: ``blockfp8.gemm`` on the producer's fp8 output, in the scale layout the producer writes: the GEMM alone;
* ``fused``: the producer (``rms_norm_quant``, with the residual add for the hidden-state norms, or
  ``silu_mul_quant``), then ``blockfp8.linear`` on its ``QuantizedActivation``;
* ``unfused``: the plain torch op (the decoder's RMSNorm and residual add, or ``F.silu(gate) * up``), then
  ``blockfp8.linear`` with its own quantizer pass;
* ``producer``: the producer alone (L2-hot, no weights).

The producer writes the layout the dispatcher's backend for the shape reads (``fused.scale_layout_for``). Prints a
table with ``fused - gemm`` in us at decode (M <= 64; goal <= 1.0 us) and ``fused / gemm`` at M >= 512 (goal
<= 1.05), checks every fused output against the unfused one (rel. error <= 5e-3), and writes the cells as JSON.
On CPU the kernels run under the Triton interpreter and the wall clock stands in: the numbers mean nothing there.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from torch.nn import functional as F  # noqa: E402

from blockfp8 import gemm, linear, rms_norm_quant, silu_mul_quant  # noqa: E402
from blockfp8.format import DECODE_MAX_M  # noqa: E402
from blockfp8.fused import scale_layout_for  # noqa: E402
from blockfp8.reference import TOLERANCE, rel_error  # noqa: E402
from blockfp8.testing.decoder import RMSNorm  # noqa: E402
from blockfp8.testing.environment import environment, environment_line  # noqa: E402
from blockfp8.testing.operands import make_weight_copies, random_activation  # noqa: E402
from blockfp8.testing.shapes import parse_ints, shape_set  # noqa: E402
from blockfp8.testing.timing import time_fn  # noqa: E402

# DeepSeek-V3 linear -> the op that produces its input. The hidden-state norms (input and post-attention
# layernorm) take the residual add with them, as engines fuse it; the latent norms (q_a, kv_a) have none.
PRODUCERS = {
    "fused_qkv_a_proj": "norm+residual",
    "q_b_proj": "norm",
    "kv_b_proj": "norm",
    "dense_mlp.gate_up_proj": "norm+residual",
    "shared_expert.gate_up_proj": "norm+residual",
    "dense_mlp.down_proj": "silu",
    "shared_expert.down_proj": "silu",
}
DECODE_GOAL_US = 1.0
PREFILL_M, PREFILL_GOAL = 512, 1.05
EPS = 1e-6


def producer_pair(kind: str, m: int, k: int, layout: str, device: torch.device):
    """(fused producer () -> QuantizedActivation, unfused op () -> float activation) on fixed random inputs."""
    if kind == "silu":
        gate_up = random_activation(m, 2 * k, seed=1, device=device)
        gate, up = gate_up.chunk(2, -1)
        return (lambda: silu_mul_quant(gate_up, layout=layout)), (lambda: F.silu(gate) * up)
    x = random_activation(m, k, seed=1, device=device)
    residual = random_activation(m, k, seed=2, device=device) if kind == "norm+residual" else None
    norm = RMSNorm(k, EPS).to(device, torch.bfloat16)
    if residual is None:
        return (lambda: rms_norm_quant(x, norm.weight, EPS, layout=layout)), (lambda: norm(x))
    return (lambda: rms_norm_quant(x, norm.weight, EPS, residual, layout=layout)[0]), (lambda: norm(x + residual))


def measure_cell(name: str, n: int, k: int, m: int, device: torch.device, weights: list, reps: int) -> dict:
    kind = PRODUCERS[name]
    layout = scale_layout_for(m, [(n, k)], device)
    fused_producer, unfused_op = producer_pair(kind, m, k, layout, device)
    qa = fused_producer()
    times = {
        "gemm": time_fn(lambda w, s: gemm(qa.values, qa.scales, w, s, out_dtype=qa.dtype), rotate=weights, reps=reps),
        "fused": time_fn(lambda w, s: linear(fused_producer(), w, s), rotate=weights, reps=reps),
        "unfused": time_fn(lambda w, s: linear(unfused_op(), w, s), rotate=weights, reps=reps),
        "producer": time_fn(fused_producer, rotate=[()], l2_cold=False, reps=reps, hot=False),
    }
    w0, s0 = weights[0]
    err = rel_error(linear(fused_producer(), w0, s0).float(), linear(unfused_op(), w0, s0).float())
    us = {key: t.median_us for key, t in times.items()}
    cell = {"shape": name, "n": n, "k": k, "m": m, "producer_kind": kind, "layout": layout,
            **{f"{key}_us": v for key, v in us.items()}, "extra_us": us["fused"] - us["gemm"],
            "ratio": us["fused"] / us["gemm"], "rel_err_vs_unfused": err, "correct": err <= TOLERANCE,
            "method": times["gemm"].method, "copies": times["gemm"].copies}
    if m <= DECODE_MAX_M:
        cell["goal"], cell["meets_goal"] = f"extra <= {DECODE_GOAL_US} us", cell["extra_us"] <= DECODE_GOAL_US
    elif m >= PREFILL_M:
        cell["goal"], cell["meets_goal"] = f"ratio <= {PREFILL_GOAL}", cell["ratio"] <= PREFILL_GOAL
    return cell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(PRODUCERS), help=f"comma-separated subset of {','.join(PRODUCERS)}")
    ap.add_argument("--m", default="1,2,4,8,16,32,64,512,1024,2048,4096", help="token counts M")
    ap.add_argument("--reps", type=int, default=20, help="timed graph replays per measurement")
    ap.add_argument("--json", default=None, help="write the environment and every cell as JSON to this path")
    args = ap.parse_args()
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in PRODUCERS]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; known: {', '.join(PRODUCERS)}")
    ms = parse_ints(args.m, "--m")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print(environment_line(env))
    shapes = {s.name: s for s in shape_set("deepseek-v3")}
    cells = []
    header = f"{'shape':28s} {'N':>6s} {'K':>6s} {'M':>5s} {'gemm':>9s} {'fused':>9s} {'unfused':>9s} " \
             f"{'producer':>9s} {'extra us':>9s} {'ratio':>6s}  goal"
    print(header)
    for name in names:
        n, k = shapes[name].n, shapes[name].k
        weights = make_weight_copies(n, k, device)
        for m in ms:
            c = measure_cell(name, n, k, m, device, weights, args.reps)
            cells.append(c)
            verdict = "" if "goal" not in c else f"{c['goal']}: {'yes' if c['meets_goal'] else 'NO'}"
            wrong = "" if c["correct"] else f"  WRONG rel err {c['rel_err_vs_unfused']:.1e}"
            print(f"{name:28s} {n:6d} {k:6d} {m:5d} {c['gemm_us']:9.2f} {c['fused_us']:9.2f} {c['unfused_us']:9.2f} "
                  f"{c['producer_us']:9.2f} {c['extra_us']:9.2f} {c['ratio']:6.3f}  {verdict}{wrong}", flush=True)
        del weights
    judged = [c for c in cells if "goal" in c]
    print(f"goals met in {sum(c['meets_goal'] for c in judged)} of {len(judged)} judged cells; "
          f"{sum(not c['correct'] for c in cells)} cells with a wrong result")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "reps": args.reps, "cells": cells}, f, indent=1)


if __name__ == "__main__":
    main()
