"""Input checks shared by every public entry point.

Each check names the argument, what it got and what it expected, and raises ``TypeError`` (wrong type or
dtype) or ``ValueError`` (wrong shape, device, value). Per-call checks look only at metadata (dtype, shape,
device), so they are cheap and trace to nothing under ``torch.compile``; the value checks (NaN/Inf or
non-positive scales) read the data and run once, when a weight is loaded or converted.
"""

from __future__ import annotations

import torch

from .quant import DEFAULT_BLOCK, DEFAULT_GROUP, FLOAT_INPUTS, FP8_DTYPE, cdiv

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _require_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _require_dtype(t: torch.Tensor, name: str, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        want = " or ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype {want}, got {str(t.dtype).replace('torch.', '')}")


def check_weight(
    w_fp8: torch.Tensor, weight_scale_inv: torch.Tensor, block_size: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[int, int]:
    """Check an fp8 weight and its block scales; returns (N, K)."""
    _require_tensor(w_fp8, "weight")
    _require_tensor(weight_scale_inv, "weight_scale_inv")
    _require_dtype(w_fp8, "weight", (FP8_DTYPE,))
    _require_dtype(weight_scale_inv, "weight_scale_inv", (torch.float32,))
    if w_fp8.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(w_fp8.shape)}")
    n, k = w_fp8.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight must have N > 0 and K > 0, got shape {(n, k)}")
    want = (cdiv(n, block_size[0]), cdiv(k, block_size[1]))
    if tuple(weight_scale_inv.shape) != want:
        raise ValueError(
            f"weight_scale_inv must have shape {want} (ceil-div of weight {(n, k)} by block {tuple(block_size)}), "
            f"got {tuple(weight_scale_inv.shape)}"
        )
    if weight_scale_inv.device != w_fp8.device:
        raise ValueError(f"weight_scale_inv is on {weight_scale_inv.device} but weight is on {w_fp8.device}")
    return n, k


def check_activation(x_fp8: torch.Tensor, x_scale: torch.Tensor, group_size: int = DEFAULT_GROUP) -> None:
    """Check fp8 activations [..., K] and their per-group scales [..., ceil(K/group)]."""
    _require_tensor(x_fp8, "x_fp8")
    _require_tensor(x_scale, "x_scale")
    _require_dtype(x_fp8, "x_fp8", (FP8_DTYPE,))
    _require_dtype(x_scale, "x_scale", (torch.float32,))
    if x_fp8.dim() < 1:
        raise ValueError("x_fp8 must have at least one dimension (K)")
    want = (*x_fp8.shape[:-1], cdiv(x_fp8.shape[-1], group_size))
    if tuple(x_scale.shape) != want:
        raise ValueError(
            f"x_scale must have shape {want} (ceil-div of x_fp8 {tuple(x_fp8.shape)} by group {group_size}), "
            f"got {tuple(x_scale.shape)}"
        )
    if x_scale.device != x_fp8.device:
        raise ValueError(f"x_scale is on {x_scale.device} but x_fp8 is on {x_fp8.device}")


def check_k_match(x: torch.Tensor, k: int, name: str = "x") -> None:
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"{name} last dimension must equal the weight's in_features K={k}, got shape {tuple(x.shape)}"
        )


def check_same_device(x: torch.Tensor, weight: torch.Tensor, name: str = "x") -> None:
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but weight is on {weight.device}; move both to one device")


def check_bias(bias: torch.Tensor | None, n: int, device: torch.device) -> None:
    if bias is None:
        return
    _require_tensor(bias, "bias")
    _require_dtype(bias, "bias", FLOAT_INPUTS)
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},) (the weight's out_features), got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but weight is on {device}")


def check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")


def check_linear_input(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                       bias: torch.Tensor | None) -> tuple[int, int]:
    """Checks for ``linear(x, weight, weight_scale_inv, bias)``; returns (N, K)."""
    _require_tensor(x, "x")
    _require_dtype(x, "x", FLOAT_INPUTS)
    n, k = check_weight(weight, weight_scale_inv)
    check_k_match(x, k)
    check_same_device(x, weight)
    check_bias(bias, n, weight.device)
    return n, k


def check_gemm_input(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                     weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype) -> tuple[int, int]:
    """Checks for ``gemm(x_fp8, x_scale, weight, weight_scale_inv, ...)``; returns (N, K)."""
    check_activation(x_fp8, x_scale)
    n, k = check_weight(weight, weight_scale_inv)
    check_k_match(x_fp8, k, "x_fp8")
    check_same_device(x_fp8, weight, "x_fp8")
    check_bias(bias, n, weight.device)
    check_out_dtype(out_dtype)
    return n, k


def check_scale_values(scale: torch.Tensor, name: str = "weight_scale_inv") -> None:
    """Reject NaN, Inf, zero or negative scales (reads the data: call at load/convert time, not per step)."""
    bad = ~torch.isfinite(scale) | (scale <= 0)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} holds {int(bad.sum())} invalid value(s) (NaN, Inf, zero or negative); first at index "
            f"{idx}: {scale[idx].item()!r}. Scales must be finite and > 0."
        )
