"""HF eager generate(): ms/token; per-call host us of each linear class inside generate(); eager-graph captures,
their total time and direct launches during three timed calls; torch.profiler GPU kernel time per token."""
import statistics
import sys
import time

import torch
from torch import nn

from blockfp8 import Fp8BlockLinear
from blockfp8.cli import bench_hf as B
from blockfp8.eager_graphs import EagerGraphs

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
stats = {"direct": 0, "capture": 0, "capture_ms": 0.0}
_call, _cap = EagerGraphs.__call__, EagerGraphs._capture


def call(self, inputs, run, operands):
    y = _call(self, inputs, run, operands)
    stats["direct"] += y is None
    return y


def cap(self, *a):
    t = time.perf_counter()
    g = _cap(self, *a)
    stats["capture"] += 1
    stats["capture_ms"] += (time.perf_counter() - t) * 1e3
    return g


EagerGraphs.__call__, EagerGraphs._capture = call, cap
host = {}


def timed(cls):
    orig = cls.forward

    def fwd(self, x):
        t = time.perf_counter()
        y = orig(self, x)
        h = host.setdefault(cls.__name__, [0, 0.0])
        h[0] += 1
        h[1] += time.perf_counter() - t
        return y

    cls.forward = fwd


timed(nn.Linear)
timed(Fp8BlockLinear)
dev = torch.device("cuda")
bf16 = B.build_bf16(B.build_config("llama", layers, 32000), dev)
kw = B.generation_kwargs("eager", 32)


def gen(model, ids):
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def run(model, label):
    for batch in (1, 16):
        ids = B.prompts(32000, batch, 32, dev)
        with torch.inference_mode():
            gen(model, ids)
            for k in stats:
                stats[k] = 0
            host.clear()
            ts = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                gen(model, ids)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            per = {k: round(v[1] / v[0] * 1e6, 2) for k, v in host.items()}
            print(f"{label:10s} L{layers} b{batch:<3d} {statistics.median(ts) / 32 * 1e3:.3f} ms/token  3 timed calls: "
                  f"{ {k: round(v, 1) for k, v in stats.items()} }  host us/call {per}", flush=True)
            if batch == 1:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    gen(model, ids)
                    torch.cuda.synchronize()
                ev = [e for e in prof.key_averages()]
                gpu = sum(e.device_time_total for e in ev)
                print(f"   profiler: GPU kernel time {gpu / 32 / 1e3:.3f} ms/token;", ", ".join(
                    f"{e.key[:40]} {e.count / 32:.0f}x {e.device_time_total / 32:.0f}us" for e in
                    sorted(ev, key=lambda e: -e.device_time_total)[:8]), flush=True)


run(bf16, "bf16")
fp8 = B.build_blockfp8(bf16)
run(fp8, "blockfp8")
EagerGraphs.IN_PLACE = 0
run(B.build_blockfp8(bf16), "copy-only")
EagerGraphs.enabled = False
run(B.build_blockfp8(bf16), "direct")
