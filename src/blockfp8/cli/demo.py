"""``blockfp8 demo``: convert a small decoder to block FP8 and show, layer by layer, which backend runs it,
how far its output is from the bf16 model's, and how long a call takes.

Two copies of one randomly initialized model run the same input: the bf16 original and the converted copy
(``lm_head`` kept in bf16, as FP8 checkpoints do). Forward hooks record every linear's input and output in
both. Per-layer error compares the same layer's outputs in the two models, so it includes the error carried
in from earlier layers. One layer is then run through every backend that can run it here (on the CPU: the
torch reference and the Triton kernel under the Triton interpreter) and compared with the reference backend.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from rich.table import Table
from torch import nn

from ..backends import Problem, backend_names, get_backend
from ..dispatch import explain
from ..nn import Fp8BlockLinear, convert_model
from ..ops import linear
from ..reference import rel_error
from ..testing.decoder import PRESETS, Decoder, hidden_input, make_model
from ..testing.environment import environment, environment_line
from ..testing.timing import synchronize, time_steps
from .common import (
    add_row,
    announce,
    cpu_timing_note,
    one_cpu_thread,
    plain,
    positive_int,
    resolve_device,
    stdout_console,
    write_text,
)

PROBE_LAYER = "layers.0.attn.fused_qkv_a_proj"
REPS = 20  # timed calls per layer; on the CPU (one thread) the tiny model's 12 layers take well under a second


def _record(model: nn.Module, kinds: tuple[type, ...]) -> tuple[dict, list]:
    """Hooks that store each matching layer's (input, output) by qualified name; returns (store, handles)."""
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, kinds):
            def hook(_mod, inputs, output, name=name):
                store[name] = (inputs[0].detach(), output.detach())
            handles.append(mod.register_forward_hook(hook))
    return store, handles


def _ms_per_call(fn, device: torch.device, reps: int) -> float:
    return statistics.median(time_steps(fn, device, warmup=1, steps=reps)) * 1e3


def _model_input(model: Decoder, batch: int) -> torch.Tensor:
    if model.cfg.vocab:
        gen = torch.Generator().manual_seed(1)
        return torch.randint(0, model.cfg.vocab, (batch, 1), generator=gen).to(next(model.parameters()).device)
    return hidden_input(model, batch)


def _probe(layer: Fp8BlockLinear, x: torch.Tensor, device: torch.device, reps: int) -> list[dict]:
    """Run one converted layer through every backend that supports its shape; error vs the reference backend."""
    m = x.numel() // x.shape[-1]
    problem = Problem.of(m, layer.out_features, layer.in_features, device, x.dtype)
    ref = linear(x, layer.weight, layer.weight_scale_inv, layer.bias, backend="reference")
    results = []
    for name in backend_names():
        verdict = get_backend(name).supports(problem)
        if not verdict:
            results.append({"backend": name, "rel_err": None, "ms": None, "note": verdict.reason})
            continue
        def call(name=name):
            return linear(x, layer.weight, layer.weight_scale_inv, layer.bias, backend=name)
        out = call()
        interpreted = name == "triton" and device.type == "cpu"
        # The interpreter runs each Triton program in Python: one timed call is enough to make the point.
        ms = _ms_per_call(call, device, 1 if interpreted else reps)
        note = "Triton interpreter (CPU): checks the kernel, not its speed" if interpreted else ""
        results.append({"backend": name, "rel_err": rel_error(out.float(), ref.float()), "ms": ms, "note": note})
    return results


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _print_report(result: dict) -> None:
    console = stdout_console(140)
    console.print(plain(result["environment_line"]))
    cfg = result["model"]
    table = Table(title=plain(f"{cfg['preset']} decoder, {cfg['layers']} layer(s), batch {cfg['batch']}: "
                              "block-FP8 vs bf16, layer by layer"))
    for col in ("layer", "N x K", "backend", "rel err vs bf16", "fp8 ms", "bf16 ms"):
        table.add_column(col, justify="left" if col in ("layer", "backend") else "right")
    for r in result["layers"]:
        add_row(table, r["layer"], f"{r['n']} x {r['k']}", r["backend"], _fmt(r["rel_err"], ".2e"),
                _fmt(r["fp8_ms"], ".3f"), _fmt(r["bf16_ms"], ".3f"))
    console.print(table)
    for name, why in result["skipped"].items():
        console.print(plain(f"kept in bf16: {name} ({why})"))
    console.print(f"model output vs bf16: cosine similarity {result['cosine']:.5f}, "
                  f"relative error {result['output_rel_err']:.2e}")
    probe = result["probe"]
    ptable = Table(title=plain(f"{probe['layer']} (M={probe['m']}, N={probe['n']}, K={probe['k']}) through every "
                               "backend"))
    for col in ("backend", "rel err vs reference", "ms", "note"):
        ptable.add_column(col, justify="right" if col in ("rel err vs reference", "ms") else "left")
    for r in probe["results"]:
        add_row(ptable, r["backend"], _fmt(r["rel_err"], ".2e"), _fmt(r["ms"], ".3f"), r["note"])
    console.print(ptable)
    if result["environment"]["device"] == "cpu":
        console.print(plain(cpu_timing_note(f"median of {result['reps']} calls")))
    console.print(f"demo finished in {result['seconds']:.1f} s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda[:INDEX] (default: cuda when available)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model shapes (default: tiny on CPU, deepseek-v3 on CUDA)")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="decoder blocks (default: 2 for tiny, 1 for deepseek-v3)")
    p.add_argument("--batch", type=positive_int, default=4, help="tokens per decode step (M)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")


def demo(device: torch.device, preset: str, layers: int, batch: int) -> dict:
    """Build, convert, run and time; returns everything the report prints."""
    t0 = time.perf_counter()
    env = environment(device)
    bf16_model = make_model(preset, layers, torch.bfloat16, device)
    fp8_model = copy.deepcopy(bf16_model)
    report = convert_model(fp8_model, skip=("lm_head",))
    ref_store, ref_hooks = _record(bf16_model, (nn.Linear,))
    fp8_store, fp8_hooks = _record(fp8_model, (Fp8BlockLinear,))
    x = _model_input(bf16_model, batch)
    with torch.inference_mode():
        y_ref = bf16_model(x).float()
        y = fp8_model(x).float()
        for h in (*ref_hooks, *fp8_hooks):
            h.remove()
        modules = dict(fp8_model.named_modules())
        ref_modules = dict(bf16_model.named_modules())
        rows = []
        for name in report.converted:
            layer = modules[name]
            x_in, out = fp8_store[name]
            ref_in, ref_out = ref_store[name]
            n, k = layer.out_features, layer.in_features
            m = x_in.numel() // k
            rows.append({
                "layer": name, "n": n, "k": k, "m": m,
                "backend": explain(m, n, k, device, x_in.dtype).choice or "none",
                "rel_err": rel_error(out.float(), ref_out.float()),
                "fp8_ms": _ms_per_call(lambda layer=layer, x_in=x_in: layer(x_in), device, REPS),
                "bf16_ms": _ms_per_call(lambda n=name, r=ref_in: ref_modules[n](r), device, REPS),
            })
        probe_layer = modules[PROBE_LAYER]
        probe_in = fp8_store[PROBE_LAYER][0]
        probe = {"layer": PROBE_LAYER, "m": probe_in.numel() // probe_layer.in_features,
                 "n": probe_layer.out_features, "k": probe_layer.in_features,
                 "results": _probe(probe_layer, probe_in, device, REPS)}
    synchronize(device)
    cosine = torch.nn.functional.cosine_similarity(y.flatten(), y_ref.flatten(), dim=0).item()
    return {
        "environment": env, "environment_line": environment_line(env),
        "model": {"preset": preset, "layers": layers, "batch": batch},
        "layers": rows, "skipped": report.skipped, "cosine": cosine, "output_rel_err": rel_error(y, y_ref),
        "probe": probe, "reps": REPS, "seconds": time.perf_counter() - t0,
    }


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    preset = args.preset or ("deepseek-v3" if device.type == "cuda" else "tiny")
    layers = args.layers if args.layers is not None else (1 if preset == "deepseek-v3" else 2)
    announce(f"demo: {preset} decoder, {layers} layer(s), batch {args.batch}, on {device.type}"
             + (" (CPU-sized: a few seconds; --preset deepseek-v3 has the real layer shapes, for a GPU)"
                if preset == "tiny" else ""))
    with one_cpu_thread(device):
        result = demo(device, preset, layers, args.batch)
    _print_report(result)
    if args.json:
        write_text(args.json, json.dumps({k: v for k, v in result.items() if k != "environment_line"}, indent=1))
    return 0
