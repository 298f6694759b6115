"""transformers generate() in eager mode (bench-hf's llama preset, 4 layers): ms per token, and how many eager
graph captures and direct launches (an earlier output still held) happen in three timed calls after one warm-up
call. Usage: python3 hf_eager.py (the original run also timed IN_PLACE = 0 and eager graphs off)."""

import statistics
import time

import torch

from blockfp8.cli import bench_hf as B
from blockfp8.eager_graphs import EagerGraphs

stats = {"direct": 0, "capture": 0}
_call, _capture = EagerGraphs.__call__, EagerGraphs._capture


def counted_call(self, inputs, run, operands):
    y = _call(self, inputs, run, operands)
    stats["direct"] += y is None
    return y


def counted_capture(self, *args):
    stats["capture"] += 1
    return _capture(self, *args)


def measure(model, label: str, device: torch.device) -> None:
    kwargs = B.generation_kwargs("eager", 32)
    for batch in (1, 16):
        ids = B.prompts(32000, batch, 32, device)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            stats.update(direct=0, capture=0)
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        print(f"{label:10s} b{batch:<3d} {statistics.median(times) / 32 * 1e3:.3f} ms/token  per 3 timed calls: "
              f"{dict(stats)}", flush=True)


def main() -> None:
    EagerGraphs.__call__, EagerGraphs._capture = counted_call, counted_capture
    device = torch.device("cuda")
    bf16 = B.build_bf16(B.build_config("llama", 4, 32000), device)
    measure(bf16, "bf16", device)
    measure(B.build_blockfp8(bf16), "default", device)


if __name__ == "__main__":
    main()
