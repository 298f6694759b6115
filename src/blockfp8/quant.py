"""Block quantization in the DeepSeek-V3 / Hugging Face FP8 convention (torch only).

Weights: ``float8_e4m3fn`` (N, K) with one fp32 ``weight_scale_inv`` per 128x128 block, shape
(ceil(N/128), ceil(K/128)). Activations: one fp32 scale per token per 1x128 group, shape
(..., ceil(K/128)). Scales *multiply* on dequantization. Blocks at the N or K tail are partial blocks:
their scale comes from the elements that exist, nothing is padded in the stored tensors.

Scale rule: ``scale = max(amax, AMAX_FLOOR) / 448``. The floor keeps all-zero groups finite (they get the
floor scale and quantize to exact zeros) without touching any group whose amax is above 1e-10. With
``ue8m0=True`` the scale is rounded *up* to a power of two, so ``|x| / scale <= 448`` still holds and
nothing saturates.

This module is the definition of the numerics: the fused Triton quantizer in ``act_quant.py`` must match
it bit for bit.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-10
DEFAULT_BLOCK = (128, 128)
DEFAULT_GROUP = 128
FLOAT_INPUTS = (torch.bfloat16, torch.float16, torch.float32)


def cdiv(a: int, b: int) -> int:
    """Ceil division for non-negative ints."""
    return -(-a // b)


def check_block_size(block_size: tuple[int, int] | list[int], name: str = "block_size") -> tuple[int, int]:
    """Validate a (block_n, block_k) pair of positive ints and return it as a tuple."""
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
        raise ValueError(f"{name} must be a pair (block_n, block_k), got {block_size!r}")
    bn, bk = block_size
    for v in (bn, bk):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must hold two positive ints, got {block_size!r}")
    return int(bn), int(bk)


def check_group_size(group_size: int, name: str = "group_size") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{name} must be a positive int, got {group_size!r}")
    return group_size


def weight_scale_shape(n: int, k: int, block_size: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for an (n, k) weight: (ceil(n/bn), ceil(k/bk))."""
    bn, bk = check_block_size(block_size)
    return cdiv(n, bn), cdiv(k, bk)


def activation_scale_shape(shape: tuple[int, ...] | torch.Size, group_size: int = DEFAULT_GROUP) -> tuple[int, ...]:
    """Shape of the activation scales for an activation of ``shape`` [..., K]."""
    return (*shape[:-1], cdiv(shape[-1], check_group_size(group_size)))


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


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_INPUTS:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")


def quantize_weight(
    w: torch.Tensor, block_size: tuple[int, int] = DEFAULT_BLOCK, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an (N, K) weight to fp8 with one fp32 scale per block.

    Returns ``(w_fp8, weight_scale_inv)``, the scale of shape (ceil(N/bn), ceil(K/bk)).
    """
    _check_float(w, "w")
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
    _check_float(x, "x")
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
    from .validate import check_weight

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
    from .validate import check_activation

    g = check_group_size(group_size)
    check_activation(x_fp8, x_scale, g)
    k = x_fp8.shape[-1]
    full = x_scale.float().repeat_interleave(g, dim=-1)[..., :k]
    return (x_fp8.float() * full).to(dtype)
