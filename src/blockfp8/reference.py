"""The ground-truth block-FP8 GEMM: dequantize both operands in fp32, matmul, cast.

Every backend is judged against this function (``rel_error`` below, at most ``TOLERANCE`` for bf16 output).
"""

from __future__ import annotations

import torch

from .format import DEFAULT_BLOCK, DEFAULT_GROUP
from .quant import dequantize_activation, dequantize_weight
from .validate import require_tensor

# Relative Frobenius error a backend may have against the reference for bf16 output: bf16 rounding of the
# output alone gives ~1.5e-3, a misapplied scale group gives far more.
TOLERANCE = 5e-3


def reference_gemm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    block_size: tuple[int, int] = DEFAULT_BLOCK,
    group_size: int = DEFAULT_GROUP,
) -> torch.Tensor:
    """y = dequant(x) @ dequant(w).T (+ bias), computed in fp32, returned in ``out_dtype``."""
    x = dequantize_activation(x_fp8, x_scale, group_size)
    w = dequantize_weight(w_fp8, weight_scale_inv, block_size)
    y = x @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||out - ref|| / ||ref|| in fp64 (inf if out holds NaN/Inf where ref does not)."""
    require_tensor(out, "out")
    require_tensor(ref, "ref")
    if out.shape != ref.shape:
        # Broadcasting would compare a different result silently.
        raise ValueError(f"out and ref must have one shape, got {tuple(out.shape)} and {tuple(ref.shape)}")
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all() and torch.isfinite(r).all():
        return float("inf")
    denom = r.norm().item()
    diff = (o - r).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom
