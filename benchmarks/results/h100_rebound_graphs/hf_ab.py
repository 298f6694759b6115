"""Eager generate(): bf16, blockfp8 with rebound graphs, blockfp8 with rebinding off (the previous behaviour),
interleaved; per-call host time of each layer class inside generate(). Usage: hf_ab.py LAYERS [ROUNDS]."""
import statistics
import sys
import time

import torch
from torch import nn

from blockfp8 import Fp8BlockLinear, graph_args
from blockfp8.cli import bench_hf as B
from blockfp8.eager_graphs import EagerGraphs

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 16
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
dev = torch.device("cuda")
bf16 = B.build_bf16(B.build_config("llama", layers, 32000), dev)
fp8 = B.build_blockfp8(bf16)
old = B.build_blockfp8(bf16)
kw = B.generation_kwargs("eager", 32)
stats = {"caps": 0}
_cap = EagerGraphs._capture


def cap(self, *a, **k):
    stats["caps"] += 1
    return _cap(self, *a, **k)


EagerGraphs._capture = cap
keeps = graph_args.keeps_graphs
print("keeps_graphs", keeps(), flush=True)


def use(model):
    """Rebinding on for fp8, off for old (read at each set's first capture)."""
    graph_args.keeps_graphs = (lambda: False) if model is old else keeps


def tok(model, batch, n=3):
    use(model)
    ids = B.prompts(32000, batch, 32, dev)
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / 32 * 1e3


models = {"bf16": bf16, "rebound": fp8, "copying": old}
with torch.inference_mode():
    for b in (1, 16):
        for m in models.values():
            tok(m, b, 10)  # past every set's captures
    print("captures in warm-up", stats["caps"], flush=True)
    stats["caps"] = 0
    allr = {1: [], 16: []}
    for rnd in range(rounds):
        for b in (1, 16):
            r = {name: tok(m, b) for name, m in models.items()}
            allr[b].append(r)
            print(f"L{layers} round {rnd} b{b}: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items())
                  + f" ms/token   rebound x bf16 {r['bf16'] / r['rebound']:.3f}"
                  f"  copying x bf16 {r['bf16'] / r['copying']:.3f}", flush=True)
    print("captures while timed", stats["caps"], flush=True)
    for b, rs in allr.items():
        med = {k: statistics.median(r[k] for r in rs) for k in models}
        mn = {k: min(r[k] for r in rs) for k in models}
        print(f"b{b} median ms/token {med}  rebound x bf16 {med['bf16'] / med['rebound']:.3f} "
              f"copying x bf16 {med['bf16'] / med['copying']:.3f} | min {mn}  rebound x bf16 "
              f"{mn['bf16'] / mn['rebound']:.3f} copying x bf16 {mn['bf16'] / mn['copying']:.3f}", flush=True)
    host = {}

    def timed(cls, label):
        orig = cls.forward

        def fwd(self, x):
            t = time.perf_counter()
            y = orig(self, x)
            h = host.setdefault(label, [0, 0.0])
            h[0] += 1
            h[1] += time.perf_counter() - t
            return y

        cls.forward = fwd
        return orig

    o1, o2 = timed(nn.Linear, "nn.Linear"), timed(Fp8BlockLinear, "Fp8BlockLinear")
    for name, m in models.items():
        host.clear()
        tok(m, 1, 2)
        per = {k: round(v[1] / v[0] * 1e6, 2) for k, v in host.items()}
        print(f"{name}: host us/call inside generate b1:", per, flush=True)
    nn.Linear.forward, Fp8BlockLinear.forward = o1, o2
