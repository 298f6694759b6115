"""How fast can one kernel stream S bytes from HBM on this GPU, for the weight sizes of the decode shapes?

Times, L2-cold with ``blockfp8.testing.timing`` (CUDA graph over rotated copies whose total exceeds 4x L2),
(a) a read-only Triton kernel that sums S bytes (the access pattern of a decode GEMM: weights read once, almost
nothing written) and (b) torch's device copy of S bytes (read + write; ``timing.copy_time``). Prints one JSON
line per size with microseconds and GB/s (bytes read, and for the copy bytes read + written). Used to judge the
"80% of copy bandwidth" goal for 15-30 MB weights (docs/benchmarks.md, "The read floor").
"""

import argparse
import json

import torch
import triton
import triton.language as tl

from blockfp8.testing.timing import cold_copies, copy_time, l2_cache_bytes, time_fn


@triton.jit
def _read_kernel(src, out, n_words, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src + offs, mask=offs < n_words, other=0)
    tl.store(out + pid, tl.sum(v, axis=0))  # one word per program, so the loads are not dead code


def read_all(buf: torch.Tensor, out: torch.Tensor, block: int) -> None:
    n = buf.numel()
    _read_kernel[(triton.cdiv(n, block),)](buf, out, n, BLOCK=block, num_warps=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", default="2,4,8,15,17,30,38,60,120,264")
    ap.add_argument("--block", type=int, default=8192, help="int32 words per program of the read kernel")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    l2 = l2_cache_bytes()
    for mb in [float(v) for v in args.mb.split(",")]:
        nbytes = int(mb * 1e6) // 16 * 16
        copies = cold_copies(nbytes, l2)
        bufs = [torch.randint(0, 100, (nbytes // 4,), dtype=torch.int32, device="cuda") for _ in range(copies)]
        outs = torch.empty(triton.cdiv(nbytes // 4, args.block), dtype=torch.int32, device="cuda")
        t_read = time_fn(lambda b, o: read_all(b, o, args.block), rotate=[(b, outs) for b in bufs], reps=args.reps,
                         hot=True)
        del bufs
        t_copy = copy_time(nbytes, reps=args.reps)
        print(json.dumps({
            "mb": mb, "copies": copies,
            "read_us": round(t_read.median_us, 2), "read_GBps": round(nbytes / t_read.median_us / 1e3, 1),
            "read_l2hot_us": round(t_read.l2_hot_us, 2) if t_read.l2_hot_us else None,
            "copy_us": round(t_copy.median_us, 2), "copy_GBps_rw": round(2 * nbytes / t_copy.median_us / 1e3, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
