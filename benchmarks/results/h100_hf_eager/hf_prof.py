"""HF eager generate(): ms/token, eager-graph captures/direct launches per timed calls, and a cProfile of one
generate() call at batch 1 for bf16 and blockfp8 (top functions by own time)."""
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch

from blockfp8.cli import bench_hf as B
from blockfp8.eager_graphs import EagerGraphs

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
stats = {"direct": 0, "capture": 0}
_call, _cap = EagerGraphs.__call__, EagerGraphs._capture


def call(self, inputs, run, operands):
    y = _call(self, inputs, run, operands)
    stats["direct"] += y is None
    return y


def cap(self, *a):
    stats["capture"] += 1
    return _cap(self, *a)


EagerGraphs.__call__, EagerGraphs._capture = call, cap
dev = torch.device("cuda")
bf16 = B.build_bf16(B.build_config("llama", layers, 32000), dev)
kw = B.generation_kwargs("eager", 32)


def gen(model, ids):
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def run(model, label, profile):
    for batch in (1, 16):
        ids = B.prompts(32000, batch, 32, dev)
        with torch.inference_mode():
            gen(model, ids)
            for k in stats:
                stats[k] = 0
            ts = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                gen(model, ids)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            print(
                f"{label:10s} L{layers} b{batch:<3d} {statistics.median(ts) / 32 * 1e3:.3f} ms/token"
                f"  per 3 timed calls: {dict(stats)}",
                flush=True,
            )
            if profile and batch == 1:
                pr = cProfile.Profile()
                pr.enable()
                gen(model, ids)
                torch.cuda.synchronize()
                pr.disable()
                s = io.StringIO()
                ps = pstats.Stats(pr, stream=s)
                ps.sort_stats("tottime").print_stats(28)
                print("\n".join(line[:170] for line in s.getvalue().splitlines()[:45]), flush=True)


prof = len(sys.argv) > 2
run(bf16, "bf16", prof)
fp8 = B.build_blockfp8(bf16)
run(fp8, "blockfp8", prof)
