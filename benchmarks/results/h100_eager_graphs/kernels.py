"""Kernels per decode linear call (torch.profiler): an eager call, and one replay of a caller's CUDA graph.

Usage: python3 kernels.py TAG (writes $OUT/kernels_TAG.json)."""

import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import blockfp8
from blockfp8.testing.operands import random_activation, random_fp8_weight


def kernels(fn) -> list[str]:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name.split("<")[0][:60] for e in prof.events() if e.device_type.name == "CUDA"]


def main(tag: str) -> None:
    res = {}
    wq, ws = random_fp8_weight(2112, 7168, device="cuda")
    for be in ("triton", "deepgemm", "cublas", "gluon"):
        for m in (1, 16):
            layer = blockfp8.Fp8BlockLinear.from_fp8(wq, ws, None, backend=be)
            x = random_activation(m, 7168, device="cuda")
            with torch.inference_mode():
                for _ in range(3):
                    layer(x)
                eager = kernels(lambda: layer(x))  # noqa: B023
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        layer(x)
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    layer(x)
                g.replay()
                graph = kernels(g.replay)
            res[f"{be} M={m}"] = {"eager": eager, "graph": graph}
            print(tag, be, m, "eager:", eager, "| graph:", graph, flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"kernels_{tag}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
