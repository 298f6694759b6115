"""bf16 and blockfp8 eager generate() interleaved (host drift), with a host-speed probe before each."""
import statistics
import sys
import time

import torch

from blockfp8.cli import bench_hf as B

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
dev = torch.device("cuda")
bf16 = B.build_bf16(B.build_config("llama", layers, 32000), dev)
fp8 = B.build_blockfp8(bf16)
kw = B.generation_kwargs("eager", 32)
a = torch.ones(1, device=dev)


def probe():
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3000):
        a.add_(1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 3000 * 1e6


def tok(model, batch):
    ids = B.prompts(32000, batch, 32, dev)
    ts = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / 32 * 1e3


with torch.inference_mode():
    for m in (bf16, fp8):
        for b in (1, 16):
            tok(m, b)
    for rnd in range(3):
        for b in (1, 16):
            p = probe()
            x = tok(bf16, b)
            y = tok(fp8, b)
            print(
                f"L{layers} round {rnd} b{b}: probe {p:.2f} us/op  bf16 {x:.3f}  blockfp8 {y:.3f} ms/token"
                f"  ratio {x / y:.3f}",
                flush=True,
            )
