"""Block quantization and dequantization in torch: the definition of the numerics (format in ``format.py``).

Scale rule: ``scale = max(amax, AMAX_FLOOR) / 448``, from the elements that exist (tail blocks are partial).
The floor keeps all-zero groups finite (they get the floor scale and quantize to exact zeros) without touching
any group whose amax is above 1e-10. With ``ue8m0=True`` the scale is rounded *up* to a power of two, so
``|x| / scale <= 448`` still holds and nothing saturates.

The fused Triton quantizer (``backends/triton/act_quant.py``) must match this module bit for bit.
"""

from __future__ import annotations

import torch

from .format import AMAX_FLOOR, DEFAULT_BLOCK, DEFAULT_GROUP, FP8_DTYPE, FP8_MAX, cdiv
from .validate import check_activation, check_block_size, check_group_size, check_weight, require_dtype


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
    g = check_group_size(group_size)
    check_activation(x_fp8, x_scale, g)
    k = x_fp8.shape[-1]
    full = x_scale.float().repeat_interleave(g, dim=-1)[..., :k]
    return (x_fp8.float() * full).to(dtype)
