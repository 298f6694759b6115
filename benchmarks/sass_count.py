"""Compile blockfp8's quantizing kernels for sm_90a, on a machine with or without a GPU, and count what one program
runs: registers (ptxas -v) and SASS instructions (cuobjdump -sass; a static count, slow paths included).

These are the counts behind the program sizing of the quantizer and the fused producers (docs/fused.md): how much
work one program does at a given K and number of 128-groups per program. Uses the ptxas and cuobjdump that ship
with Triton's NVIDIA backend; the compile goes through Triton's internal entry points, which move between
releases. Run without TRITON_INTERPRET.

    python benchmarks/sass_count.py                          # the cells docs/fused.md quotes
    python benchmarks/sass_count.py --kernel rms --k 7168 --groups 1,8,32,64 --residual
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from blockfp8.backends.triton import act_quant, producers
from blockfp8.format import AMAX_FLOOR, BLOCK, FP8_MAX, cdiv, next_pow2
from blockfp8.quant import sum_bits

TARGET = GPUTarget("cuda", 90, 32)
_SASS_LINE = re.compile(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def sass_counts(fn, args: dict, **options) -> dict:
    """Compile ``fn`` (a @triton.jit kernel) for sm_90a as a launch with ``args`` (runtime values and constexprs
    by name) and ``options`` would, with the JIT's specialization of the arguments (16-byte aligned pointers,
    integers divisible by 16 or equal to 1), but without a GPU: {"registers", "instructions", "top" (the five most
    frequent opcodes), "sass" (the listing)}."""
    backend = make_backend(TARGET)
    bound, specialization, parsed = create_function_from_signature(fn.signature, fn.params, backend)(**args,
                                                                                                     **options)
    parsed, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, parsed)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=parsed.__dict__)
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True,
                                check=True).stderr
        sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    ops = collections.Counter(m.group(1).split(".")[0] for m in map(_SASS_LINE.match, sass.splitlines()) if m)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    return {"registers": registers, "instructions": sum(ops.values()), "top": ops.most_common(5), "sass": sass}


def rms_args(k: int, chunk: int, residual: bool, hw_cast: bool) -> tuple[dict, dict]:
    """(arguments, options) of the RMSNorm producer's kernel for one row of K, ``chunk`` groups per program."""
    groups = next_pow2(cdiv(k, BLOCK))
    x, w = torch.empty(1, k, dtype=torch.bfloat16), torch.empty(k, dtype=torch.bfloat16)
    args = dict(x_ptr=x, w_ptr=w, r_ptr=x if residual else w, h_ptr=x if residual else w,
                q_ptr=torch.empty(1, k, dtype=torch.uint8), s_ptr=torch.empty(1, cdiv(k, BLOCK)), K=k, eps=1e-6,
                stride_xm=k, stride_rm=k if residual else 0, stride_qm=k, stride_sm=1, stride_sk=1,
                GROUPS=groups, GROUP=BLOCK, CHUNK=min(chunk, groups), SUM_BITS=sum_bits(k), HAS_RESIDUAL=residual,
                UE8M0=False, AMAX_MIN=AMAX_FLOOR, QMAX=FP8_MAX, PDL=True, HW_CAST=hw_cast)
    return args, dict(num_warps=producers._rms_warps(groups), enable_fp_fusion=False)


def quant_args(k: int, per_prog: int, hw_cast: bool) -> tuple[dict, dict]:
    """(arguments, options) of the activation quantizer's kernel, ``per_prog`` groups per program."""
    args = dict(x_ptr=torch.empty(1, k, dtype=torch.bfloat16), q_ptr=torch.empty(1, k, dtype=torch.float8_e4m3fn),
                s_ptr=torch.empty(1, cdiv(k, BLOCK)), z_ptr=torch.empty(1, dtype=torch.int32), M=1, K=k, z_count=0,
                stride_xm=k, stride_qm=k, stride_sm=1, stride_sk=1, GROUP=BLOCK, GROUPS_PER_PROG=per_prog,
                UE8M0=False, AMAX_MIN=AMAX_FLOOR, QMAX=FP8_MAX, ZERO=False, PDL=True, HW_CAST=hw_cast)
    return args, dict(num_warps=4, enable_fp_fusion=False)


def silu_args(k: int, per_prog: int, hw_cast: bool) -> tuple[dict, dict]:
    """(arguments, options) of the SiLU-mul producer's kernel for gate_up of width 2K, ``per_prog`` groups."""
    args = dict(x_ptr=torch.empty(1, 2 * k, dtype=torch.bfloat16), q_ptr=torch.empty(1, k, dtype=torch.uint8),
                s_ptr=torch.empty(1, cdiv(k, BLOCK)), K=k, stride_xm=2 * k, stride_qm=k, stride_sm=1, stride_sk=1,
                GROUP=BLOCK, GROUPS_PER_PROG=per_prog, UE8M0=False, AMAX_MIN=AMAX_FLOOR, QMAX=FP8_MAX, PDL=True,
                HW_CAST=hw_cast)
    return args, dict(num_warps=4, enable_fp_fusion=False)


KERNELS = {
    "rms": lambda k, g, residual, hw: (producers._rms_norm_quant_kernel, *rms_args(k, g, residual, hw)),
    "quant": lambda k, g, residual, hw: (act_quant._act_quant_kernel, *quant_args(k, g, hw)),
    "silu": lambda k, g, residual, hw: (producers._silu_mul_quant_kernel, *silu_args(k, g, hw)),
}
# (kernel, K, groups per program, residual): the cells docs/fused.md quotes.
DEFAULT_CELLS = [("rms", 7168, 64, False), ("rms", 7168, 1, False), ("rms", 7168, 8, False), ("rms", 7168, 1, True),
                 ("quant", 7168, 8, False), ("quant", 7168, 2, False), ("quant", 7168, 1, False),
                 ("silu", 2048, 8, False), ("silu", 2048, 2, False), ("silu", 2048, 1, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=sorted(KERNELS), help="one kernel (default: the cells docs/fused.md quotes)")
    ap.add_argument("--k", type=int, default=7168, help="K (the SiLU-mul's output width)")
    ap.add_argument("--groups", default="1,2,8", help="comma-separated 128-groups per program")
    ap.add_argument("--residual", action="store_true", help="the RMSNorm with its residual add")
    ap.add_argument("--hw-cast", action="store_true",
                    help="round to e4m3 with the hardware conversion (BLOCKFP8_HW_FP8_CAST) instead of in bits")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the kernels are compiled here, not interpreted")
    cells = ([(args.kernel, args.k, int(g), args.residual) for g in args.groups.split(",")] if args.kernel
             else DEFAULT_CELLS)
    cast = "the hardware's fp8 conversion" if args.hw_cast else "fp8 rounding in bits"
    print(f"triton {triton.__version__}, sm_90a, {cast}; static SASS counts of one program")
    print(f"{'kernel':<8}{'K':>6}{'groups':>8}{'registers':>11}{'instructions':>14}  most frequent")
    for kernel, k, groups, residual in cells:
        fn, kernel_args, options = KERNELS[kernel](k, groups, residual, args.hw_cast)
        c = sass_counts(fn, kernel_args, **options)
        name = kernel + ("+res" if residual else "")
        top = " ".join(f"{op}:{n}" for op, n in c["top"])
        print(f"{name:<8}{k:>6}{groups:>8}{c['registers']:>11}{c['instructions']:>14}  {top}")


if __name__ == "__main__":
    main()
