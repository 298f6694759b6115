"""Input checks shared by every public entry point: the one place that says what a valid call looks like.

Each check names the argument, what it got and what it expected, and raises ``TypeError`` (not a tensor, wrong
dtype, wrong argument type) or ``ValueError`` (wrong rank, shape, device, layout, value, unknown name).

Where they run:

* ``blockfp8.gemm`` / ``blockfp8.linear`` call ``check_gemm_input`` / ``check_linear_input`` *before* entering
  their custom op. These look at metadata only (type, dtype, shape, device, strides): a few microseconds a
  call (measured in docs/reliability.md). Under ``torch.compile`` Dynamo evaluates them while tracing and the
  graph holds only the op, so compiled calls skip them until a guard fails and the function is traced again.
* Weights are checked once more, with their values, where they enter the project: ``Fp8BlockLinear.from_fp8``,
  ``Fp8BlockLinear.load_state_dict``, model and checkpoint conversion, checkpoint loading and saving, and
  sharding call ``check_fp8_linear`` or its parts ``check_scale_values`` (NaN, Inf, zero, negative or too
  large scales), ``check_fp8_weight_values`` (NaN encodings among the fp8 bytes) and ``check_finite_values``
  (NaN/Inf in float weights and biases). They read the data: once per weight, never per call.

Layout rules: the persistent tensors (``weight``, ``weight_scale_inv``, ``bias``) must be contiguous -- fixing
them per call would copy the whole weight every step, so they are refused with a hint to call ``.contiguous()``
once at load time. Activations may have any strides: the quantizers copy ``x`` and the ``gemm`` op copies
``x_fp8`` (M*K bytes, the size of the data the kernel reads anyway) when a kernel needs them row-major.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch

from .format import (
    DEFAULT_BLOCK,
    DEFAULT_GROUP,
    FLOAT_DTYPES,
    FP8_DTYPE,
    FP8_NAN_BITS,
    MAX_WEIGHT_SCALE,
    cdiv,
    dtype_name,
)


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def require_tensor(t: object, name: str) -> torch.Tensor:
    """``t`` itself, or ``TypeError`` naming ``name`` when it is not a tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def require_dtype(t: object, name: str, allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> torch.Tensor:
    """The one dtype check: ``t`` must be a tensor of one of ``allowed`` (default: bf16, fp16, fp32)."""
    require_tensor(t, name)
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {_one_of([dtype_name(d) for d in allowed])}, "
                        f"got {dtype_name(t.dtype)}")
    return t


def check_device(device: object, name: str = "device") -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None), or a ``ValueError`` naming ``name`` when it is not a
    device, or a CUDA device this machine does not have (found before any work, not by an assertion deep in torch
    after a model has loaded)."""
    if device is None:
        return None
    if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
        raise TypeError(f"{name} must be a torch.device or a string such as 'cuda', got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name} {device!r} is not a device; expected e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {str(device)!r}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_size(value: object, name: str, low: int = 1) -> int:
    """``value`` as an int >= ``low``: a ``TypeError`` for a non-int (a bool or a float included), a
    ``ValueError`` naming ``name`` for a smaller one."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # ints, numpy ints, 0-d integer tensors
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_block_size(block_size: tuple[int, int] | list[int], name: str = "block_size") -> tuple[int, int]:
    """Validate a (block_n, block_k) pair of positive ints and return it as a tuple."""
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
        raise ValueError(f"{name} must be a pair (block_n, block_k), got {block_size!r}")
    for v in block_size:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must hold two positive ints, got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def check_group_size(group_size: int, name: str = "group_size") -> int:
    """Validate a positive int group size and return it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{name} must be a positive int, got {group_size!r}")
    return group_size


def _require_same_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move both to one device")


def _scale_shape_hint(got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """A guess at the usual mistakes, so the message says more than 'wrong shape'."""
    if len(got) == len(want) == 2 and got == want[::-1]:
        return " (transposed?)"
    if len(got) == len(want) and got != want and all(g >= w for g, w in zip(got, want, strict=True)):
        return " (padded? scales are stored unpadded, one per block including partial tail blocks)"
    return ""


def check_contiguous(t: torch.Tensor, name: str) -> None:
    """Refuse a non-contiguous persistent tensor (weight, scales, bias): copying it per call costs a full read."""
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (row-major), got shape {tuple(t.shape)} with strides {t.stride()}; "
            f"call .contiguous() once when loading it"
        )


def check_weight(
    w_fp8: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    block_size: tuple[int, int] = DEFAULT_BLOCK,
    *,
    name: str = "weight",
    scale_name: str = "weight_scale_inv",
) -> tuple[int, int]:
    """Check an fp8 (N, K) weight and its (ceil(N/bn), ceil(K/bk)) fp32 block scales; returns (N, K).

    Any strides are accepted here (dequantization reads any layout); the GEMM entry points add
    ``check_contiguous``. ``name``/``scale_name`` are used in messages (e.g. checkpoint tensor names).
    """
    require_tensor(w_fp8, name)
    require_tensor(weight_scale_inv, scale_name)
    require_dtype(w_fp8, name, (FP8_DTYPE,))
    require_dtype(weight_scale_inv, scale_name, (torch.float32,))
    if w_fp8.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got shape {tuple(w_fp8.shape)}")
    n, k = w_fp8.shape
    if n == 0 or k == 0:
        raise ValueError(f"{name} must have N > 0 and K > 0, got shape {(n, k)}")
    bn, bk = check_block_size(block_size)
    want = (cdiv(n, bn), cdiv(k, bk))
    got = tuple(weight_scale_inv.shape)
    if got != want:
        raise ValueError(
            f"{scale_name} must have shape {want} (ceil-div of {name} {(n, k)} by block {(bn, bk)}), "
            f"got {got}{_scale_shape_hint(got, want)}"
        )
    _require_same_device(weight_scale_inv, scale_name, w_fp8, name)
    return n, k


def check_activation(x_fp8: torch.Tensor, x_scale: torch.Tensor, group_size: int = DEFAULT_GROUP) -> None:
    """Check fp8 activations [..., K] and their fp32 per-group scales [..., ceil(K/group)] (any strides)."""
    require_tensor(x_fp8, "x_fp8")
    require_tensor(x_scale, "x_scale")
    require_dtype(x_fp8, "x_fp8", (FP8_DTYPE,))
    require_dtype(x_scale, "x_scale", (torch.float32,))
    if x_fp8.dim() < 1:
        raise ValueError("x_fp8 must have at least one dimension (K), got a 0-d tensor")
    want = (*x_fp8.shape[:-1], cdiv(x_fp8.shape[-1], group_size))
    got = tuple(x_scale.shape)
    if got != want:
        raise ValueError(
            f"x_scale must have shape {want} (ceil-div of x_fp8 {tuple(x_fp8.shape)} by group {group_size}), "
            f"got {got}{_scale_shape_hint(got, want)}"
        )
    _require_same_device(x_scale, "x_scale", x_fp8, "x_fp8")


def check_k_match(x: torch.Tensor, k: int, name: str = "x") -> None:
    """x's last dimension must be the weight's K."""
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"{name} last dimension must equal the weight's in_features K={k}, got shape {tuple(x.shape)}"
        )


def check_same_device(x: torch.Tensor, weight: torch.Tensor, name: str = "x", weight_name: str = "weight") -> None:
    """``name`` and the weight must live on one device."""
    _require_same_device(x, name, weight, weight_name)


def check_bias(bias: torch.Tensor | None, n: int, device: torch.device, name: str = "bias") -> None:
    """None, or a contiguous float (N,) tensor on the weight's device (the Triton kernel reads it with unit stride)."""
    if bias is None:
        return
    require_tensor(bias, name)
    require_dtype(bias, name, FLOAT_DTYPES)
    if tuple(bias.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) (the weight's out_features), got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"{name} is on {bias.device} but weight is on {device}; move both to one device")
    check_contiguous(bias, name)


def check_out_dtype(out_dtype: object, name: str = "out_dtype") -> None:
    """The GEMM output dtype (or a model's compute dtype): a torch.dtype among bfloat16, float16, float32."""
    want = _one_of([dtype_name(d) for d in FLOAT_DTYPES])
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype ({want}), got {type(out_dtype).__name__} {out_dtype!r}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be {want}, got {dtype_name(out_dtype)}")


def _check_weight_for_gemm(weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                           name: str = "weight") -> tuple[int, int]:
    n, k = check_weight(weight, weight_scale_inv, name=name)
    check_contiguous(weight, name)
    check_contiguous(weight_scale_inv, "weight_scale_inv")
    return n, k


def check_linear_input(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                       bias: torch.Tensor | None) -> tuple[int, int]:
    """Checks for ``linear(x, weight, weight_scale_inv, bias)``; returns (N, K). Metadata only."""
    require_dtype(x, "x")
    n, k = _check_weight_for_gemm(weight, weight_scale_inv)
    check_k_match(x, k)
    check_same_device(x, weight)
    check_bias(bias, n, weight.device)
    return n, k


def check_gemm_input(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                     weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype) -> tuple[int, int]:
    """Checks for ``gemm(x_fp8, x_scale, weight, weight_scale_inv, ...)``; returns (N, K). Metadata only."""
    check_activation(x_fp8, x_scale)
    # Errors use the public parameter name of blockfp8.gemm for the weight: w_fp8.
    n, k = _check_weight_for_gemm(weight, weight_scale_inv, "w_fp8")
    check_k_match(x_fp8, k, "x_fp8")
    check_same_device(x_fp8, weight, "x_fp8", "w_fp8")
    check_bias(bias, n, weight.device)
    check_out_dtype(out_dtype)
    return n, k


def _refuse_values(bad: torch.Tensor, name: str, what: str, values: torch.Tensor, rule: str,
                   show: str = "{!r}") -> None:
    """ValueError naming ``name``, how many elements ``bad`` marks, and the first one's index and value."""
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        value = show.format(values[idx].item())
        raise ValueError(f"{name} holds {int(bad.sum())} {what}; first at index {idx}: {value}. {rule}")


def check_scale_values(scale: torch.Tensor, name: str = "weight_scale_inv") -> None:
    """Reject NaN, Inf, zero, negative or too large weight scales (reads the data: call at load/convert time).

    The upper bound is ``format.MAX_WEIGHT_SCALE`` (2^56): 448 * scale stays below 2^65, so dequantization and
    the kernels' scale products cannot overflow fp32 for any activation below 2^56 in magnitude. Meta tensors
    hold no values and pass (models are often built on "meta" before loading).
    """
    if scale.device.type == "meta":
        return
    bad = ~((scale > 0) & (scale <= MAX_WEIGHT_SCALE))  # NaN fails both comparisons
    _refuse_values(bad, name, "invalid value(s) (NaN, Inf, zero, negative or above 2^56)", scale,
                   "Scales must be finite, > 0 and <= 2^56 (about 7.2e16), so that 448 * scale cannot overflow.")


def check_fp8_weight_values(weight: torch.Tensor, name: str = "weight") -> None:
    """Reject NaN encodings among the bytes of a float8_e4m3fn weight (0x7F, 0xFF; e4m3fn has no Inf).

    No quantizer writes them, and backends disagree on them (the Triton path decodes them as finite values),
    so they are refused where weights enter the project. Reads the data: load/convert time only.
    """
    if weight.device.type == "meta":
        return
    bits = weight.view(torch.uint8)
    bad = (bits & FP8_NAN_BITS) == FP8_NAN_BITS
    _refuse_values(bad, name, "NaN encoding(s) (byte 0x7F or 0xFF)", bits, "An fp8 weight must hold finite values.",
                   show="byte 0x{:02X}")


def check_finite_values(t: torch.Tensor, name: str) -> None:
    """Reject NaN or Inf in a float tensor (a weight before quantization, a bias). Reads the data."""
    if t.device.type == "meta":
        return
    _refuse_values(~torch.isfinite(t), name, "NaN or Inf value(s)", t, "It must hold finite values.")


def check_fp8_linear(weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                     *, name: str = "weight", scale_name: str | None = None,
                     bias_name: str | None = None) -> tuple[int, int]:
    """Everything a stored fp8 linear layer must satisfy, values included; returns (N, K).

    For load and convert time (``Fp8BlockLinear.from_fp8``, checkpoint loaders, converters): dtypes, ceil-div
    scale shape, one device, contiguity, bias, scales in (0, 2^56], no NaN fp8 bytes and a finite bias.
    ``name`` is the weight's tensor name (e.g. ``"model.layers.0.mlp.up_proj.weight"``); the scale and bias
    names default to its siblings.
    """
    prefix = name[: -len("weight")] if name.endswith("weight") else f"{name}."
    scale_name = scale_name or f"{prefix}weight_scale_inv"
    bias_name = bias_name or f"{prefix}bias"
    n, k = check_weight(weight, weight_scale_inv, name=name, scale_name=scale_name)
    check_contiguous(weight, name)
    check_contiguous(weight_scale_inv, scale_name)
    check_bias(bias, n, weight.device, bias_name)
    check_weight_values(weight, weight_scale_inv, bias, name, scale_name, bias_name)
    return n, k


def check_weight_values(weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                        name: str = "weight", scale_name: str = "weight_scale_inv", bias_name: str = "bias") -> None:
    """The values of a layer's weight side (reads them all): scales in (0, 2^56] (``check_scale_values``), no NaN
    fp8 bytes (``check_fp8_weight_values``) and a finite bias, checked in that order."""
    check_scale_values(weight_scale_inv, scale_name)
    check_fp8_weight_values(weight, name)
    if bias is not None:
        check_finite_values(bias, bias_name)


_STATE_DTYPES = {"weight": (FP8_DTYPE,), "weight_scale_inv": (torch.float32,), "bias": FLOAT_DTYPES}


def check_fp8_state_dict(state_dict: Mapping[str, object], prefix: str, shapes: Mapping[str, tuple[int, ...]],
                         contiguous: bool = False) -> None:
    """Check the entries ``prefix + "weight"`` / ``"weight_scale_inv"`` / ``"bias"`` a state dict loads into an fp8
    layer whose buffers have ``shapes`` (attribute -> shape; no ``"bias"`` when the layer has none).

    dtypes and shapes must equal the buffers' (a bf16 weight would otherwise be cast into the fp8 buffer), the
    weight and its scales must come together (one without the other pairs new values with stale ones), and
    values are checked like ``check_fp8_linear``'s. ``contiguous``: refuse non-contiguous tensors (they replace
    the buffers with ``load_state_dict(..., assign=True)``). Entries that are absent are torch's to report.
    """
    keys = {attr: prefix + attr for attr in _STATE_DTYPES}
    has_w, has_s = keys["weight"] in state_dict, keys["weight_scale_inv"] in state_dict
    if has_w != has_s:
        have, lack = (keys["weight"], keys["weight_scale_inv"]) if has_w else (keys["weight_scale_inv"], keys["weight"])
        raise ValueError(f"state dict has {have!r} but not {lack!r}: an fp8 weight and its block scales must be "
                         f"loaded together")
    for attr, want in shapes.items():
        t = state_dict.get(keys[attr])
        if t is None:
            continue
        require_dtype(t, keys[attr], _STATE_DTYPES[attr])
        if tuple(t.shape) != tuple(want):
            hint = _scale_shape_hint(tuple(t.shape), tuple(want)) if attr == "weight_scale_inv" else ""
            raise ValueError(f"{keys[attr]} must have shape {tuple(want)} (this layer's {attr}), got "
                             f"{tuple(t.shape)}{hint}")
        if contiguous:
            check_contiguous(t, keys[attr])
    if has_w:
        check_scale_values(state_dict[keys["weight_scale_inv"]], keys["weight_scale_inv"])
        check_fp8_weight_values(state_dict[keys["weight"]], keys["weight"])
    if "bias" in shapes and state_dict.get(keys["bias"]) is not None:
        check_finite_values(state_dict[keys["bias"]], keys["bias"])
