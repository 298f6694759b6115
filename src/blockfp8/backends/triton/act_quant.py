"""Fused Triton activation quantizer: bf16/fp16/fp32 [M, K] -> fp8 + fp32 per-(token, 128-group) scales.

One launch reads x once and writes fp8 values and scales in the layout the GEMM reads, bit-identical to
``blockfp8.quant.quantize_activation`` (same amax floor, IEEE-rounded divisions via ``div_rn``, the same bitwise
UE8M0 round-up). Scale layouts
(``format.SCALE_LAYOUTS``): ``"row"``, or ``"col"`` -- the TMA-aligned column-major layout DeepGEMM reads
without its own transpose kernel (measured on H100: a row-major scale costs DeepGEMM an extra
``transpose_fp32`` launch per call) and the layout cuBLAS blockwise needs.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ...device import device_id
from ...format import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, cdiv, empty_scales, next_pow2
from ...validate import check_group_size, require_dtype
from .launch import FastLaunch, hw_fp8_cast, pdl_ok


@triton.jit
def _round_to_e4m3(q):
    """Round fp32 values in [-448, 448] to the nearest-even e4m3 value, exactly, in fp32 arithmetic.

    The cast that follows is then exact on every target. (The hardware cast rounds correctly by itself;
    the Triton interpreter's cast truncates and drops mantissa carries, so CPU tests need this.)
    """
    bits = q.to(tl.int32, bitcast=True)
    # Normal e4m3 (|q| >= 2^-6): keep 3 mantissa bits, ties to even, carries flow into the exponent.
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = bits.to(tl.float32, bitcast=True)
    # Subnormal e4m3 (|q| < 2^-6): a multiple of 2^-9; adding 1.5 * 2^14 makes fp32 round there. The
    # sign comes back from the input's sign bit so that -0.0 and tiny negatives round to -0.0 as torch does.
    # The sign is OR-ed back in as a bit (a float negation may compile to 0 - x, which turns -0.0 into +0.0).
    sub = (tl.abs(q) + 24576.0) - 24576.0
    sub = (sub.to(tl.int32, bitcast=True) | (q.to(tl.int32, bitcast=True) & -0x80000000)).to(tl.float32, bitcast=True)
    # NaN stays NaN: the GPU's NaN (0x7FFFFFFF) would carry out of the rounding add above and become -0.0.
    return tl.where(q != q, q, tl.where(tl.abs(q) < 0.015625, sub, normal))


@triton.jit
def e4m3_bits(q):
    """The float8_e4m3fn byte (as uint8) of fp32 ``q`` that already holds an e4m3 value or NaN, built from the bits:
    exact on every target. The interpreter's cast to fp8 maps NaN to a finite value; torch and the hardware keep
    it NaN (0x7F, with the sign bit)."""
    bits = q.to(tl.int32, bitcast=True)
    normal = ((((bits >> 23) & 0xFF) - 120) << 3) | ((bits >> 20) & 7)  # rebias the exponent from 127 to 7
    subnormal = (tl.abs(q) * 512.0).to(tl.int32)  # |q| = m * 2^-9 below 2^-6
    magnitude = tl.where(q != q, 0x7F, tl.where(tl.abs(q) < 0.015625, subnormal, normal))
    return (((bits >> 24) & 0x80) | magnitude).to(tl.uint8)


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def quantize_groups(x, UE8M0: tl.constexpr, AMAX_MIN: tl.constexpr, QMAX: tl.constexpr, HW_CAST: tl.constexpr):
    """(q, scale) of a (groups, GROUP) fp32 tile, one scale per row of the tile: q holds the e4m3 values as
    fp32 (the store's cast is exact), or with HW_CAST the clamped quotients, which the hardware's conversion to
    e4m3 rounds (``fp8_bytes``, or a cast to an fp8 pointer's type). Entries past K must be 0.0 so they leave the
    amax alone. Shared by every kernel that quantizes activations (this quantizer, the fused producers), so they
    all round alike."""
    # NaN must survive the max and the clamp as in torch's amax/clamp: tl.max and a default tl.maximum may drop
    # it (max.f32 returns the non-NaN operand), which would turn a NaN input into a finite output.
    amax = tl.maximum(tl.reduce(tl.abs(x), 1, _max_keep_nan), AMAX_MIN, propagate_nan=tl.PropagateNan.ALL)
    scale = tl.math.div_rn(amax, QMAX)
    if UE8M0:
        bits = scale.to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        # As in quant.round_scale_ue8m0: NaN must not carry into the sign bit and become -0.0.
        scale = tl.where(scale != scale, scale, (exponent << 23).to(tl.float32, bitcast=True))
    q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -QMAX, QMAX, propagate_nan=tl.PropagateNan.ALL)
    if not HW_CAST:
        q = _round_to_e4m3(q)
    return q, scale


@triton.jit
def fp8_bytes(q, HW_CAST: tl.constexpr):
    """The float8_e4m3fn bytes (uint8) of ``quantize_groups``' q: the hardware's conversion with HW_CAST, else
    built from the bits of the already rounded values (``e4m3_bits``)."""
    if HW_CAST:
        return q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        return e4m3_bits(q)


# Warps a quantizing launch aims to keep on each SM: four per scheduler, so that while one waits on its chain of
# dependent instructions another issues.
WARPS_PER_SM = 16


def groups_per_program(m: int, kb: int, programs: int, most: int) -> int:
    """How many of a row's ``kb`` groups each program of a quantizing kernel takes: a power of two, at most
    ``most`` (a power of two) and ``next_pow2(kb)``, small enough that the launch has about ``programs`` programs
    while rows are few. A program's work is a long dependent chain (amax, IEEE division, rounding): at M=1,
    K=7168 eight groups per program left 7 SMs running 440 SASS instructions each (sm_90a, Triton 3.6,
    benchmarks/sass_count.py), one group 56 SMs running 232. Many rows fill the SMs anyway, and then fewer, larger
    programs issue fewer instructions in all."""
    return min(most, next_pow2(kb), next_pow2(cdiv(m * kb, max(programs, 1))))


@lru_cache(maxsize=4096)
def groups_on(m: int, kb: int, device: torch.device, most: int, num_warps: int) -> int:
    """``groups_per_program`` for a launch of ``num_warps``-warp programs on ``device`` (about WARPS_PER_SM
    warps on each SM), cached: eager launches call it on every call. Off CUDA (the interpreter) an H100's 132
    SMs, the count the configs assume for an unknown device, so that the CPU tests launch the grids an H100
    would."""
    return groups_per_program(m, kb, (device_id(device).sms or 132) * max(1, WARPS_PER_SM // num_warps), most)


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, M, K, z_count, stride_xm, stride_qm, stride_sm, stride_sk,
    GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr, UE8M0: tl.constexpr,
    AMAX_MIN: tl.constexpr, QMAX: tl.constexpr, ZERO: tl.constexpr, PDL: tl.constexpr, HW_CAST: tl.constexpr,
):
    if PDL:
        # The GEMM that reads the result may launch now (it waits for this launch to finish before it reads).
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    if ZERO:
        # The next GEMM's split-K counters (z_count int32 at z_ptr): zeroed here, in a launch the linear makes
        # anyway, instead of by a fill kernel of their own. The GEMM runs after this launch on the same stream.
        if (row == 0) & (tl.program_id(1) == 0):
            for start in range(0, z_count, 1024):
                offs = start + tl.arange(0, 1024)
                tl.store(z_ptr + offs, tl.zeros((1024,), tl.int32), mask=offs < z_count)
    offs_g = tl.program_id(1) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    cols = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < K
    # Rows past M (padding a GEMM asked for) quantize zeros: values 0 with a finite scale.
    # (As a bound on the columns: the interpreter refuses a scalar mask and'ed with a tensor one.)
    in_cols = K * (row < M).to(tl.int32)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < in_cols, other=0.0).to(tl.float32)
    q, scale = quantize_groups(x, UE8M0, AMAX_MIN, QMAX, HW_CAST)
    tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + offs_g * stride_sk, scale, mask=offs_g * GROUP < K)


_ACT_QUANT = FastLaunch(_act_quant_kernel)


def quantize_activation_fused(
    x: torch.Tensor, group_size: int = 128, ue8m0: bool = False, layout: str = "row",
    zero: torch.Tensor | None = None, zero_count: int = 0, rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``quantize_activation`` for [..., K] input; scales in ``layout`` (2-D input only
    for "col"). ``zero``: an int32 tensor whose first ``zero_count`` entries the launch also sets to 0 (the
    split-K counters of the GEMM that reads the result, ``GemmPlan.counters``). ``rows`` (2-D input, at least
    M): the outputs get that many rows, those past M quantized from zeros (values 0, finite scales), for a
    GEMM that needs M padded (``GemmPlan.rows``) -- in this launch rather than by fills and copies."""
    require_dtype(x, "x")
    g = check_group_size(group_size)
    if g & (g - 1):
        raise ValueError(f"the fused quantizer needs a power-of-two group_size, got {g}")
    *lead, k = x.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    # Each stride() or data_ptr() call costs a fraction of a microsecond: read once (eager calls pay this).
    xs0, xs1 = x2.stride()
    if xs1 != 1:
        x2 = x2.contiguous()
        xs0 = x2.stride(0)
    m = x2.shape[0]
    kb = cdiv(k, g)
    if layout == "col" and lead and len(lead) != 1:
        raise ValueError("layout='col' needs 2-D input [M, K]")
    out_rows = m if rows is None else rows
    if out_rows < m or (out_rows != m and len(lead) != 1):
        raise ValueError(f"rows={rows} needs 2-D input with at most that many rows, got shape {tuple(x.shape)}")
    q = torch.empty(out_rows, k, dtype=FP8_DTYPE, device=x.device)
    s = empty_scales(out_rows, kb, layout, x.device)
    zeroing = zero is not None and zero_count > 0
    if m > 0 and k > 0:
        device, warps = x.device, 4
        per_prog = groups_on(out_rows, kb, device, 8, warps)
        ss0, ss1 = s.stride()
        # M, K, the input's dtype, row stride and alignment are all that can change the kernel's specialization.
        pdl, hw_cast = pdl_ok(device), hw_fp8_cast()
        key = (m, out_rows, k, x2.dtype, xs0, x2.data_ptr() % 16 == 0, ss0, ss1, g, ue8m0,
               zero_count if zeroing else 0, pdl, per_prog, hw_cast)
        _ACT_QUANT(key, (out_rows, cdiv(kb, per_prog)),
                   (x2, q, s, zero if zeroing else q, m, k, zero_count, xs0, k, ss0, ss1),
                   dict(GROUP=g, GROUPS_PER_PROG=per_prog, UE8M0=ue8m0, AMAX_MIN=AMAX_FLOOR, QMAX=FP8_MAX,
                        ZERO=zeroing, PDL=pdl, HW_CAST=hw_cast),
                   num_warps=warps, enable_fp_fusion=False)  # as the producers: torch rounds every step (no FMA)
    elif zeroing:
        zero[:zero_count].zero_()
    if layout == "row" and out_rows == m:
        return q.reshape(*lead, k), s.reshape(*lead, kb)
    return q, s
