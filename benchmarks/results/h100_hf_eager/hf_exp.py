"""Why is every host call slower inside an FP8 model's eager generate()? Per-call host us of linears and of
CUDAGraph.replay, with and without gc, and the CUDA runtime calls' CPU time (torch.profiler), bf16 vs blockfp8."""
import gc
import statistics
import time

import torch
from torch import nn

from blockfp8 import Fp8BlockLinear
from blockfp8.cli import bench_hf as B

host = {}


def timed(cls, name="forward"):
    orig = getattr(cls, name)

    def fwd(self, *a):
        t = time.perf_counter()
        y = orig(self, *a)
        h = host.setdefault(f"{cls.__name__}.{name}", [0, 0.0])
        h[0] += 1
        h[1] += time.perf_counter() - t
        return y

    setattr(cls, name, fwd)


timed(nn.Linear)
timed(Fp8BlockLinear)
timed(torch.cuda.CUDAGraph, "replay")
dev = torch.device("cuda")
bf16 = B.build_bf16(B.build_config("llama", 4, 32000), dev)
kw = B.generation_kwargs("eager", 32)


def gen(model, ids):
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def run(model, label, nogc=False):
    ids = B.prompts(32000, 1, 32, dev)
    with torch.inference_mode():
        for _ in range(2):
            gen(model, ids)
        host.clear()
        ts = []
        if nogc:
            gc.disable()
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gen(model, ids)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        gc.enable()
        per = {k: round(v[1] / v[0] * 1e6, 2) for k, v in host.items()}
        print(f"{label:16s} b1 {statistics.median(ts) / 32 * 1e3:.3f} ms/token  host us/call {per}", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            gen(model, ids)
            torch.cuda.synchronize()
        ev = [e for e in prof.key_averages() if e.key.startswith("cu")]
        print(
            "   runtime calls per token:",
            ", ".join(
                f"{e.key} {e.count / 32:.0f}x {e.cpu_time_total / max(e.count, 1):.1f}us"
                for e in sorted(ev, key=lambda e: -e.cpu_time_total)[:9]
            ),
            flush=True,
        )


run(bf16, "bf16")
fp8 = B.build_blockfp8(bf16)
run(fp8, "blockfp8")
run(fp8, "blockfp8 no gc", nogc=True)
run(bf16, "bf16 again")
del fp8
gc.collect()
run(bf16, "bf16 after del")
