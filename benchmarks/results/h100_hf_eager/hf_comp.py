"""Compiled (static cache, reduce-overhead) generate() at batch 1: GPU kernels per token, bf16 vs blockfp8."""
import statistics
import sys
import time

import torch

from blockfp8 import explain
from blockfp8.cli import bench_hf as B

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
dev = torch.device("cuda")
t = time.perf_counter()
bf16 = B.build_bf16(B.build_config("llama", layers, 32000), dev)
fp8 = B.build_blockfp8(bf16)
print(f"built in {time.perf_counter() - t:.1f} s", flush=True)
for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
    e = explain(1, n, k, device="cuda")
    print(f"M=1 N={n} K={k} -> {e.choice} ({e.source[:80]})", flush=True)
kw = B.generation_kwargs("compiled", 32)
ids = B.prompts(32000, 1, 32, dev)
with torch.inference_mode():
    for label, m in (("bf16", bf16), ("blockfp8", fp8)):
        for _ in range(3):
            m.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        ts = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        print(f"{label} L{layers} b1 compiled {statistics.median(ts) / 32 * 1e3:.3f} ms/token", flush=True)
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            m.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            torch.cuda.synchronize()
        ev = list(prof.key_averages())
        gpu = [e for e in ev if e.device_time_total > 0 and not e.key.startswith("cuda")]
        print(f"  GPU kernel time {sum(e.self_device_time_total for e in ev) / 32 / 1e3:.3f} ms/token", flush=True)
        for e in sorted(gpu, key=lambda e: -e.self_device_time_total)[:12]:
            print(
                f"   {e.key[:90]:90s} {e.count / 32:6.1f}x/token {e.self_device_time_total / max(e.count, 1):8.1f} us",
                flush=True,
            )
        rt = [e for e in ev if e.key.startswith("cu")]
        print(
            "  runtime:",
            ", ".join(f"{e.key} {e.count / 32:.1f}x" for e in sorted(rt, key=lambda e: -e.count)[:8]),
            flush=True,
        )
