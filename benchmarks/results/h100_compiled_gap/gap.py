"""Compiled (static cache, reduce-overhead) generate() at batch 1, bf16 and blockfp8 interleaved: ms per call at 32
and 2 new tokens (their difference / 30 is the time of one decode step, the rest is fixed: prefill and setup),
the eager prefill forward alone, eager-graph captures while timed, dynamo's counters, and (with ``prof``) a
cProfile of one 32-token call per model. Usage: ``python3 gap.py LAYERS [prof]``."""
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch
import transformers

from blockfp8 import explain
from blockfp8.cli import bench_hf as B
from blockfp8.eager_graphs import EagerGraphs

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 16
prof = "prof" in sys.argv
dev = torch.device("cuda")
t = time.perf_counter()
cfg = B.build_config("llama", layers, 32000)
torch.manual_seed(0)
with torch.device(dev):
    bf16 = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
fp8 = B.build_blockfp8(bf16)
print(f"built in {time.perf_counter() - t:.1f} s", flush=True)
for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
    for m in (1, 32):
        e = explain(m, n, k, device="cuda")
        print(f"M={m} N={n} K={k} -> {e.choice} ({e.source[:70]})", flush=True)

captures = [0]
_capture = EagerGraphs._capture


def counted(self, *args, **kwargs):
    captures[0] += 1
    return _capture(self, *args, **kwargs)


EagerGraphs._capture = counted
ids = B.prompts(32000, 1, 32, dev)


def gen(model, new: int) -> float:
    kwargs = B.generation_kwargs("compiled", new)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def prefill(model) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(ids)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


models = {"bf16": bf16, "blockfp8": fp8}
with torch.inference_mode():
    for label, model in models.items():
        t0 = time.perf_counter()
        for _ in range(3):
            gen(model, 32)
        print(f"{label} warm-up {time.perf_counter() - t0:.1f} s, captures so far {captures[0]}", flush=True)
    res = {label: {"g32": [], "g2": [], "pre": [], "caps": 0} for label in models}
    for _ in range(5):
        for label, model in models.items():
            c0 = captures[0]
            res[label]["g32"].append(gen(model, 32))
            res[label]["g2"].append(gen(model, 2))
            res[label]["pre"].append(prefill(model))
            res[label]["caps"] += captures[0] - c0
    for label, r in res.items():
        g32, g2, pre = (statistics.median(r[key]) for key in ("g32", "g2", "pre"))
        step = (g32 - g2) / 30
        print(f"{label} L{layers}: gen32 {g32:.2f} ms ({g32 / 32:.3f}/token)  gen2 {g2:.2f}  per decode step "
              f"{step:.3f} ms  fixed {g32 - 32 * step:.2f} ms  eager prefill fwd {pre:.2f} ms  "
              f"captures in 5 rounds {r['caps']}", flush=True)
    print("g32 all:", {label: [round(v, 1) for v in r["g32"]] for label, r in res.items()}, flush=True)
    wanted = ("stats", "graph_break", "recompiles", "inductor")
    counters = {key: dict(value) for key, value in torch._dynamo.utils.counters.items() if key in wanted}
    print("dynamo counters:", counters, flush=True)
    if prof:
        for label, model in models.items():
            p = cProfile.Profile()
            p.enable()
            gen(model, 32)
            p.disable()
            for order, rows in (("tottime", 22), ("cumtime", 30)):
                s = io.StringIO()
                pstats.Stats(p, stream=s).sort_stats(order).print_stats(rows)
                lines = "\n".join(s.getvalue().splitlines()[:rows + 18])
                print(f"=== cProfile {label} gen32 ({order})\n{lines}", flush=True)
