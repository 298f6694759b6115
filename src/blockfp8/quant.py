"""Block quantization and dequantization in torch: the definition of the numerics (format in ``format.py``).

Scale rule: ``scale = max(amax, AMAX_FLOOR) / 448``, from the elements that exist (tail blocks are partial).
The floor keeps all-zero groups finite (they get the floor scale and quantize to exact zeros) without touching
any group whose amax is above 1e-10. With ``ue8m0=True`` the scale is rounded *up* to a power of two, so
``|x| / scale <= 448`` still holds and nothing saturates.

The fused Triton quantizer (``backends/triton/act_quant.py``) must match this module bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .format import AMAX_FLOOR, DEFAULT_BLOCK, DEFAULT_GROUP, FP8_DTYPE, FP8_MAX, cdiv
from .validate import (
    check_activation,
    check_block_size,
    check_group_size,
    check_out_dtype,
    check_weight,
    require_dtype,
)


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to the next power of two (UE8M0), exactly.

    Works on the bit pattern rather than log2/exp2 so every platform (and the Triton kernel) gets the
    same answer: a scale whose mantissa is non-zero moves to the next exponent.
    """
    scale = scale.float().contiguous()
    bits = scale.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    # NaN's all-ones exponent would carry into the sign bit (-0.0, a finite scale); keep NaN as NaN.
    return torch.where(torch.isnan(scale), scale, (exponent << 23).view(torch.float32))


def _div_fp32(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """a / b correctly rounded to fp32 on every device.

    torch's CUDA kernels divide by a Python scalar as a multiplication by its rounded reciprocal, which can
    differ from a true division in the last bit; an fp32 quotient computed in fp64 and rounded once is the
    IEEE fp32 quotient (53 >= 2 * 24 + 2 bits), so CPU, GPU and the fused Triton quantizer agree exactly.
    """
    return (a.double() / (b.double() if isinstance(b, torch.Tensor) else b)).float()


def scales_from_amax(amax: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    """fp32 scale per group from its absolute maximum (see module docstring for the rule)."""
    scale = _div_fp32(amax.float().clamp(min=AMAX_FLOOR), FP8_MAX)
    return round_scale_ue8m0(scale) if ue8m0 else scale


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The clamp only matters for rounding right at the edge (x/scale = 448.00003); fp8 e4m3fn has no inf.
    return _div_fp32(x, scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(
    w: torch.Tensor, block_size: tuple[int, int] = DEFAULT_BLOCK, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an (N, K) weight to fp8 with one fp32 scale per block.

    Returns ``(w_fp8, weight_scale_inv)``, the scale of shape (ceil(N/bn), ceil(K/bk)).
    """
    require_dtype(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    bn, bk = check_block_size(block_size)
    n, k = w.shape
    nb, kb = cdiv(n, bn), cdiv(k, bk)
    wf = w.float()
    padded = wf.new_zeros(nb * bn, kb * bk)
    padded[:n, :k] = wf
    blocks = padded.view(nb, bn, kb, bk)
    scale = scales_from_amax(blocks.abs().amax(dim=(1, 3)), ue8m0)
    q = _to_fp8(blocks, scale[:, None, :, None]).view(nb * bn, kb * bk)[:n, :k].contiguous()
    return q, scale


def quantize_activation(
    x: torch.Tensor, group_size: int = DEFAULT_GROUP, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [..., K] activations per token in 1 x group_size groups.

    Returns ``(x_fp8, x_scale)`` with x_fp8 of x's shape and x_scale of shape [..., ceil(K/group_size)].
    """
    require_dtype(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the K axis)")
    if x.shape[-1] == 0:
        raise ValueError(f"x must have K >= 1 (its last dimension), got shape {tuple(x.shape)}")
    g = check_group_size(group_size)
    *lead, k = x.shape
    kb = cdiv(k, g)
    xf = x.reshape(-1, k).float()
    padded = xf.new_zeros(xf.shape[0], kb * g)
    padded[:, :k] = xf
    groups = padded.view(-1, kb, g)
    scale = scales_from_amax(groups.abs().amax(dim=-1), ue8m0)
    q = _to_fp8(groups, scale[:, :, None]).view(-1, kb * g)[:, :k]
    return q.reshape(*lead, k).contiguous(), scale.reshape(*lead, kb)


def expand_block_scales(scale: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor:
    """Broadcast per-block scales to one fp32 value per element of a 2-D tensor of ``shape``."""
    bn, bk = block_size
    n, k = shape
    return scale.float().repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]


def dequantize_weight(
    w_fp8: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    block_size: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """fp8 weight times its block scales, in ``dtype`` (fp32 by default)."""
    check_out_dtype(dtype, "dtype")
    bs = check_block_size(block_size)
    check_weight(w_fp8, weight_scale_inv, bs)
    return (w_fp8.float() * expand_block_scales(weight_scale_inv, tuple(w_fp8.shape), bs)).to(dtype)


def dequantize_activation(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    group_size: int = DEFAULT_GROUP,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """fp8 activation times its per-group scales, in ``dtype`` (fp32 by default)."""
    check_out_dtype(dtype, "dtype")
    g = check_group_size(group_size)
    check_activation(x_fp8, x_scale, g)
    k = x_fp8.shape[-1]
    full = x_scale.float().repeat_interleave(g, dim=-1)[..., :k]
    return (x_fp8.float() * full).to(dtype)


class QuantizedActivation(NamedTuple):
    """An activation already quantized per token in 1x128 groups, as a fused producer writes it
    (``blockfp8.fused``); ``blockfp8.linear`` and ``Fp8BlockLinear`` take it in place of a float input and run
    only the GEMM.

    ``values``: float8_e4m3fn [..., K]. ``scales``: fp32 [..., ceil(K/128)] in ``layout`` ("row", or "col":
    ``format.empty_scales``' TMA-aligned column-major; every backend reads both, see docs/fused.md).
    ``dtype``: the dtype of the activation before quantization, which is the consuming linear's output dtype.
    A NamedTuple of tensors and constants, so ``torch.compile(fullgraph=True)`` passes it through.
    """

    values: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype
    layout: str = "row"

    @property
    def shape(self) -> torch.Size:
        """The activation's shape (``values``'): code written for float inputs reads it, as transformers'
        attention does before its projections."""
        return self.values.shape


# ------------------------------------------------------------------------------------ producers' numerics
# RMSNorm and SiLU-mul as the fused producers (blockfp8.fused) compute them. Both use only operations whose
# result IEEE 754 fixes exactly (fp32/fp64 add, mul, floor, exact bit manipulation; division and sqrt in fp64
# rounded once to fp32, which is the correctly rounded fp32 result), never a library transcendental or an
# order-dependent float sum, so torch on any device and the Triton kernels (backends/triton/producers.py,
# compiled without FMA contraction) agree bit for bit.

# exp(t) = 2^n * p(r), n = floor(t * log2(e) + 1/2), r = t - n * ln 2 in two parts (the first has few bits, so
# n * EXP_LN2_HI is exact): the Cephes expf scheme, about 1 ulp.
EXP_LOG2E = 1.4426950408889634
EXP_LN2_HI = 0.693359375
EXP_LN2_LO = -2.12194440e-4
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# Above EXP_HI exp is inf. Below EXP_LO it is 0: exp(-87) is still a normal fp32 (no denormal arithmetic, which
# some GPU paths flush), and 1 + exp(t) == 1 exactly for t < -17 already, so SiLU never sees the difference.
EXP_HI = 88.72283935546875
EXP_LO = -87.0
FP64_MANTISSA_BITS = 53


def _pow2_fp32(n: torch.Tensor) -> torch.Tensor:
    """2.0 ** n for int32 n in the normal fp32 range, built from the exponent bits (exact)."""
    return ((n + 127) << 23).view(torch.float32)


def exp_fp32(t: torch.Tensor) -> torch.Tensor:
    """exp of fp32 ``t`` from IEEE-exact steps only (about 1 ulp from the true value): the exp SiLU uses."""
    tc = torch.where(torch.isnan(t), 0.0, t.clamp(EXP_LO, EXP_HI))
    n = torch.floor(tc * EXP_LOG2E + 0.5)
    r = tc - n * EXP_LN2_HI
    r = r - n * EXP_LN2_LO
    p = torch.full_like(r, EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = p * r + c
    p = p * (r * r) + r + 1.0
    # 2^n in two factors: n reaches 128 at EXP_HI, past the largest fp32 power of two.
    ni = n.to(torch.int32)
    half = ni >> 1
    e = p * _pow2_fp32(half) * _pow2_fp32(ni - half)
    e = torch.where(t > EXP_HI, float("inf"), torch.where(t < EXP_LO, 0.0, e))
    return torch.where(torch.isnan(t), t, e)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for ``gate_up`` = [gate, up] along the last axis, in gate_up's dtype.

    The dtype semantics of ``F.silu(gate) * up`` on bf16/fp16 tensors: SiLU in fp32 rounded to the dtype, then
    the product in fp32 rounded again. SiLU(g) = g / (1 + exp(-g)) with ``exp_fp32``: within an ulp or two of
    torch's fp32 SiLU, and the same on every device.
    """
    gate, up = gate_up.chunk(2, dim=-1)
    g = gate.float()
    s = _div_fp32(g, exp_fp32(-g) + 1.0).to(gate_up.dtype)
    return (s.float() * up.float()).to(gate_up.dtype)


def sum_bits(k: int) -> int:
    """Bits of fixed-point grid below the largest square in ``mean_square`` for rows of ``k`` elements: K grid
    multiples each below 2^sum_bits stay below 2^53, so their fp64 sum is exact in any order."""
    return FP64_MANTISSA_BITS - k.bit_length()


def mean_square(xf: torch.Tensor) -> torch.Tensor:
    """mean(x^2) over the last axis of fp32 ``xf`` (keepdim), in fp32, the same for every summation order.

    Each square (exact in fp64) is truncated to a grid of 2^-sum_bits(K) times the power of two above the
    row's largest square, so the fp64 sum of K of them is exact and the order a reduction takes cannot change
    it. The truncation loses less than K grid steps: at most 2^(2 * bit_length(K) - 51) of the sum (2^-25 at
    K = 7168), the order of fp32's own rounding and far below what an fp32 sum of K squares can lose.
    """
    k = xf.shape[-1]
    amax = xf.abs().amax(-1, keepdim=True).contiguous()
    # amax < 2^(e + 1), so every square < 2^(2e + 2); NaN and Inf rows get e = 128 and stay NaN / Inf.
    e = ((amax.view(torch.int32) >> 23) & 0xFF).long() - 127
    up = ((sum_bits(k) - 2 * (e + 1) + 1023) << 52).view(torch.float64)
    ss = torch.floor(xf.double().square() * up).sum(-1, keepdim=True)
    return (ss / up / k).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last axis in fp32, cast back to x's dtype: ``x * rstd * weight`` with
    ``rstd = 1 / sqrt(mean(x^2) + eps)`` (``mean_square``; fp32 eps, sqrt and division, correctly rounded).

    With ``residual``, the engines' fused residual add: ``h = x + residual`` in x's dtype is normalized and
    returned too, as ``(rms_norm(h), h)``.
    """
    h = x if residual is None else x + residual
    xf = h.float()
    # sqrt in fp64 rounded once is the correctly rounded fp32 sqrt (torch's fp32 sqrt on CPU is not always).
    rstd_denominator = torch.sqrt((mean_square(xf) + eps).double()).float()
    rstd = _div_fp32(torch.ones_like(rstd_denominator), rstd_denominator)
    y = (xf * rstd * weight.float()).to(x.dtype)
    return y if residual is None else (y, h)
