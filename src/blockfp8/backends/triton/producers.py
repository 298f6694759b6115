"""Fused quantizing producers: RMSNorm (with the residual add) and SiLU(gate) * up, each quantized per 1x128
group in the same pass, writing fp8 values and fp32 scales in the layout the consuming GEMM reads.

Bit-identical to ``quantize_activation`` of the unfused result (``quant.rms_norm`` / ``quant.silu_mul``): the
norm or SiLU-mul is computed with the same IEEE-exact steps as the torch definition, rounded to the input's
dtype as the unfused op's output would be, quantized by ``act_quant.quantize_groups`` (the fused quantizer's own
code) and stored as fp8 bytes (``act_quant.fp8_bytes``). Kernels are compiled without FMA contraction
(``enable_fp_fusion=False``): a fused multiply-add rounds once where torch's separate ops round twice. The
interpreter's casts to bf16 truncate, so values are rounded to the dtype in fp32 first (``gemm._round_bf16``).

One launch per producer. The RMSNorm kernel needs a whole row before it scales anything: each program reads its
row, and with fewer rows than SMs each row is split over several programs, each quantizing a chunk of its groups
(``act_quant.groups_per_program``); they all compute the same rstd, bit for bit, because the sum of squares is
exact. The SiLU-mul kernel runs a few 128-groups per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...format import AMAX_FLOOR, BLOCK, FP8_DTYPE, FP8_MAX, cdiv, empty_scales, next_pow2
from ...quant import EXP_HI, EXP_LN2_HI, EXP_LN2_LO, EXP_LO, EXP_LOG2E, EXP_POLY, sum_bits
from .act_quant import _max_keep_nan, fp8_bytes, groups_on, quantize_groups
from .gemm import _round_bf16
from .launch import FastLaunch, hw_fp8_cast, pdl_ok

_LOG2E = tl.constexpr(EXP_LOG2E)
_LN2_HI = tl.constexpr(EXP_LN2_HI)
_LN2_LO = tl.constexpr(EXP_LN2_LO)
_HI = tl.constexpr(EXP_HI)
_LO = tl.constexpr(EXP_LO)
_P0, _P1, _P2, _P3, _P4, _P5 = (tl.constexpr(c) for c in EXP_POLY)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to the nearest DTYPE value (ties to even), kept in fp32."""
    if DTYPE == tl.bfloat16:
        # NaN kept as is: the GPU's NaN (0x7FFFFFFF) would carry out of the rounding add into the sign.
        x = tl.where(x != x, x, _round_bf16(x))
    elif DTYPE == tl.float16:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _pow2_fp32(n):
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exp(t):
    """``quant.exp_fp32``, step for step."""
    tc = tl.where(t != t, 0.0, tl.minimum(tl.maximum(t, _LO), _HI))
    n = tl.floor(tc * _LOG2E + 0.5)
    r = tc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _P0 * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    p = p * (r * r) + r + 1.0
    ni = n.to(tl.int32)
    half = ni >> 1
    e = p * _pow2_fp32(half) * _pow2_fp32(ni - half)
    e = tl.where(t > _HI, float("inf"), tl.where(t < _LO, 0.0, e))
    return tl.where(t != t, t, e)


@triton.jit
def _mean_square(x, K, SUM_BITS: tl.constexpr):
    """``quant.mean_square`` of a tile holding one row (zeros past K): an exact fp64 sum of truncated squares."""
    amax = tl.reduce(tl.abs(x), None, _max_keep_nan)
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    up = ((SUM_BITS - 2 * (e + 1) + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    xd = x.to(tl.float64)
    ss = tl.sum(tl.floor(xd * xd * up))
    return (ss / up / K).to(tl.float32)


@triton.jit
def _norm_input(x_ptr, r_ptr, h_ptr, row, cols, mask, K, stride_xm, stride_rm, HAS_RESIDUAL: tl.constexpr,
                STORE_H: tl.constexpr):
    """The values the norm reads at ``cols`` of ``row`` in fp32: x, or x + residual rounded to x's dtype (that
    rounded sum is the new residual, stored to h where STORE_H)."""
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
        x = _round_to(x + r, dtype)
        if STORE_H:
            tl.store(h_ptr + row * K + cols, x.to(dtype), mask=mask)
    return x


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr, w_ptr, r_ptr, h_ptr, q_ptr, s_ptr, K, eps,
    stride_xm, stride_rm, stride_qm, stride_sm, stride_sk,
    GROUPS: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, SUM_BITS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, UE8M0: tl.constexpr, AMAX_MIN: tl.constexpr, QMAX: tl.constexpr, PDL: tl.constexpr,
    HW_CAST: tl.constexpr,
):
    if PDL:
        # The consuming GEMM may launch now: it prefetches its weights and waits for this launch (launch.PDL).
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, GROUPS)
    cols = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < K
    dtype = x_ptr.dtype.element_ty
    # Every program reads its whole row for the norm (the sum of squares is exact, so each program's rstd is the
    # same bits), then normalizes and quantizes only its CHUNK groups: a few rows still spread over many SMs.
    x = _norm_input(x_ptr, r_ptr, h_ptr, row, cols, mask, K, stride_xm, stride_rm, HAS_RESIDUAL, CHUNK == GROUPS)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(_mean_square(x, K, SUM_BITS) + eps))
    if CHUNK != GROUPS:
        offs_g = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        cols = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = cols < K
        x = _norm_input(x_ptr, r_ptr, h_ptr, row, cols, mask, K, stride_xm, stride_rm, HAS_RESIDUAL, True)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(mask, _round_to(x * rstd * w, dtype), 0.0)
    q, scale = quantize_groups(y, UE8M0, AMAX_MIN, QMAX, HW_CAST)
    tl.store(q_ptr + row * stride_qm + cols, fp8_bytes(q, HW_CAST), mask=mask)
    tl.store(s_ptr + row * stride_sm + offs_g * stride_sk, scale, mask=offs_g * GROUP < K)


@triton.jit
def _silu_mul_quant_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, stride_sk,
    GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr, UE8M0: tl.constexpr,
    AMAX_MIN: tl.constexpr, QMAX: tl.constexpr, PDL: tl.constexpr, HW_CAST: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs_g = tl.program_id(1) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    cols = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < K
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_xm + K + cols, mask=mask, other=0.0).to(tl.float32)
    silu = _round_to(tl.math.div_rn(gate, _exp(-gate) + 1.0), dtype)
    y = tl.where(mask, _round_to(silu * up, dtype), 0.0)
    q, scale = quantize_groups(y, UE8M0, AMAX_MIN, QMAX, HW_CAST)
    tl.store(q_ptr + row * stride_qm + cols, fp8_bytes(q, HW_CAST), mask=mask)
    tl.store(s_ptr + row * stride_sm + offs_g * stride_sk, scale, mask=offs_g * GROUP < K)


# Later launches of a compiled kernel go straight to it (launch.py): Triton's own launch path costs 34-40 us of
# host time per call, which an eager decoder pays for every producer of every layer.
_RMS_NORM_QUANT = FastLaunch(_rms_norm_quant_kernel)
_SILU_MUL_QUANT = FastLaunch(_silu_mul_quant_kernel)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rms_warps(groups: int) -> int:
    # Each program holds a whole row: spread its groups over more warps as K grows (8192 values at K=7168).
    return 4 if groups <= 8 else 8 if groups <= 32 else 16


def rms_norm_quant_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                          layout: str = "row", ue8m0: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``quantize_activation(rms_norm(x [+ residual]))`` in one launch for 2-D ``x`` (M, K).

    Returns fp8 (M, K), fp32 scales (M, ceil(K/128)) in ``layout``, and the new residual (M, K) in x's dtype
    (None without ``residual``). Inputs are checked by the caller (``blockfp8.fused``).
    """
    x = _unit_stride(x)
    m, k = x.shape
    kb = cdiv(k, BLOCK)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = empty_scales(m, kb, layout, x.device)
    h = None
    if residual is not None:
        residual = _unit_stride(residual)
        h = torch.empty(m, k, dtype=x.dtype, device=x.device)
    if m > 0:
        groups = next_pow2(kb)
        weight = weight.contiguous()
        # Without a residual the kernel reads neither r nor h; they get the weight's address, not x's, so that x is
        # the only argument holding the activation's address (an eager graph rebinds it by value: eager_graphs.py).
        r = residual if residual is not None else weight
        xs0, rs0 = x.stride(0), r.stride(0) if residual is not None else 0
        ss0, ss1 = s.stride()
        # What can change the compiled kernel between calls: K (and the constexprs it sets), the dtypes, the
        # strides, and whether each pointer handed in is 16-byte aligned (the outputs here always are).
        device = x.device
        pdl, hw_cast = pdl_ok(device), hw_fp8_cast()
        # Whole rows once they fill the SMs; split rows before (one SM did all of an M=1 row's work).
        warps = _rms_warps(groups)
        chunk = groups_on(m, kb, device, groups, warps)
        key = (k, x.dtype, weight.dtype, residual is not None, ue8m0, xs0, rs0, ss0, ss1,
               x.data_ptr() % 16 == 0, weight.data_ptr() % 16 == 0, r.data_ptr() % 16 == 0, pdl, chunk, hw_cast)
        _RMS_NORM_QUANT(
            key, (m, cdiv(kb, chunk)),
            (x, weight, r, h if h is not None else weight, q.view(torch.uint8), s, k, float(eps), xs0, rs0, q.stride(0),
             ss0, ss1),
            dict(GROUPS=groups, GROUP=BLOCK, CHUNK=chunk, SUM_BITS=sum_bits(k), HAS_RESIDUAL=residual is not None,
                 UE8M0=ue8m0, AMAX_MIN=AMAX_FLOOR, QMAX=FP8_MAX, PDL=pdl, HW_CAST=hw_cast),
            num_warps=warps, enable_fp_fusion=False,
        )
    return q, s, h


def silu_mul_quant_triton(gate_up: torch.Tensor, layout: str = "row", ue8m0: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activation(silu_mul(gate_up))`` in one launch for 2-D ``gate_up`` (M, 2I) = [gate, up].

    Returns fp8 (M, I) and fp32 scales (M, ceil(I/128)) in ``layout``. Inputs are checked by the caller.
    """
    gate_up = _unit_stride(gate_up)
    m, k = gate_up.shape[0], gate_up.shape[1] // 2
    kb = cdiv(k, BLOCK)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=gate_up.device)
    s = empty_scales(m, kb, layout, gate_up.device)
    if m > 0 and k > 0:
        device, warps = gate_up.device, 4
        per_prog = groups_on(m, kb, device, 8, warps)
        gs0 = gate_up.stride(0)
        ss0, ss1 = s.stride()
        pdl, hw_cast = pdl_ok(device), hw_fp8_cast()
        key = (k, gate_up.dtype, per_prog, ue8m0, gs0, ss0, ss1, gate_up.data_ptr() % 16 == 0, pdl, hw_cast)
        _SILU_MUL_QUANT(
            key, (m, cdiv(kb, per_prog)),
            (gate_up, q.view(torch.uint8), s, k, gs0, q.stride(0), ss0, ss1),
            dict(GROUP=BLOCK, GROUPS_PER_PROG=per_prog, UE8M0=ue8m0, AMAX_MIN=AMAX_FLOOR, QMAX=FP8_MAX, PDL=pdl,
                 HW_CAST=hw_cast),
            num_warps=warps, enable_fp_fusion=False,
        )
    return q, s
