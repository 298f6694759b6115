"""Fused quantizing producers: the op that makes an activation also quantizes it for the next block-FP8 linear.

A separate quantizer pass (what ``blockfp8.linear`` runs on a float input) reads the activation once more and
costs a launch per linear. Engines avoid it by quantizing inside the op that produces the activation; these
functions do the same for the two producers of a transformer block:

* ``rms_norm_quant(x, weight, eps, residual=None)``: RMSNorm (optionally after the residual add, as engines
  fuse it) -> ``QuantizedActivation`` (and the new residual);
* ``silu_mul_quant(gate_up)``: SiLU(gate) * up -> ``QuantizedActivation``.

The result goes straight into ``blockfp8.linear`` / ``Fp8BlockLinear``, which then runs only the GEMM. It is
bit-identical to ``quantize_activation`` of the unfused op's output, where the unfused ops are
``quant.rms_norm`` and ``quant.silu_mul`` (re-exported here; see quant.py for their numerics).

Each is a ``torch.library`` custom op (``blockfp8::rms_norm_quant``, ``blockfp8::silu_mul_quant``) with a fake
implementation, so ``torch.compile(fullgraph=True)`` and CUDA graphs take it. An eager call with nothing to
trace and no gradient to track runs the op's implementation directly, as ``blockfp8.linear`` runs its plan
(``ops.runs_eagerly``): the op's dispatch costs host time per call (29 us on a 2-core CPU, docs/fused.md).
Inside: the Triton kernel (backends/triton/producers.py) on CUDA, and on CPU under ``TRITON_INTERPRET=1``; torch
elsewhere.

Scale layout: the producer writes the layout its consumers read best (``scale_layout_for``). Every backend
accepts both layouts, so a producer feeding several linears can never pick a wrong one, only a slower one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch

from .backends import Problem, get_backend
from .dispatch import choose
from .format import BLOCK, FLOAT_DTYPES, FP8_DTYPE, SCALE_LAYOUTS, cdiv, empty_scales
from .ops import runs_eagerly
from .quant import QuantizedActivation, quantize_activation, rms_norm, silu_mul
from .validate import require_dtype, require_tensor

__all__ = ["QuantizedActivation", "default_layout", "rms_norm", "rms_norm_quant", "scale_layout_for", "silu_mul",
           "silu_mul_quant"]


def scale_layout_for(m: int, shapes: Iterable[tuple[int, int]], device: torch.device | str,
                     out_dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> str:
    """The activation-scale layout a producer of ``m`` rows should write for linears of these (N, K) shapes.

    The dispatcher's backend for each shape says what it reads best (``Backend.scale_layout``). When they
    disagree the answer is "col": every backend reads both layouts, and the ones that prefer "col" (cuBLAS,
    DeepGEMM) would pay for a conversion, while those that read any strides (Triton, Gluon, the reference)
    pay nothing for it.
    """
    layouts = {get_backend(choose(Problem.of(m, n, k, device, out_dtype), backend)).scale_layout for n, k in shapes}
    if not layouts:
        raise ValueError("shapes must name at least one (N, K) consumer")
    return layouts.pop() if len(layouts) == 1 else "col"


def default_layout(t: torch.Tensor) -> str:
    """``scale_layout_for``'s answer without asking the dispatcher: "col" on CUDA, where every shipped backend
    but the reference prefers it, "row" elsewhere (the reference)."""
    return "col" if t.is_cuda else "row"


def _use_triton(t: torch.Tensor) -> bool:
    # Read per call: the command line sets TRITON_INTERPRET (CPU machines) after `import blockfp8`.
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _in_layout(s: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "row":
        return s
    out = empty_scales(s.shape[0], s.shape[1], layout, s.device)
    out.copy_(s)
    return out


def _empty_outputs(x2: torch.Tensor, k: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    m = x2.shape[0]
    return (torch.empty(m, k, dtype=FP8_DTYPE, device=x2.device),
            empty_scales(m, cdiv(k, BLOCK), layout, x2.device))


def _direct(*tensors: torch.Tensor | None) -> bool:
    """Whether this call may skip its op: an eager call (``runs_eagerly``) with no input autograd would track."""
    if not runs_eagerly(*tensors):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _rms_norm_quant_impl(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                         layout: str, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Without a residual the third output is an empty placeholder (an op returns a fixed number of tensors).
    if _use_triton(x):
        from .backends.triton.producers import rms_norm_quant_triton

        q, s, h = rms_norm_quant_triton(x, weight, eps, residual, layout, ue8m0)
        return q, s, x.new_empty(0) if h is None else h
    out = rms_norm(x, weight, eps, residual)
    y, h = (out, x.new_empty(0)) if residual is None else out
    q, s = quantize_activation(y, ue8m0=ue8m0)
    return q, _in_layout(s, layout), h


_rms_norm_quant_op = torch.library.custom_op("blockfp8::rms_norm_quant", mutates_args=())(_rms_norm_quant_impl)


@_rms_norm_quant_op.register_fake
def _rms_norm_quant_fake(x, weight, eps, residual, layout, ue8m0):
    q, s = _empty_outputs(x, x.shape[1], layout)
    return q, s, x.new_empty(0) if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)


def _silu_mul_quant_impl(gate_up: torch.Tensor, layout: str, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(gate_up):
        from .backends.triton.producers import silu_mul_quant_triton

        return silu_mul_quant_triton(gate_up, layout, ue8m0)
    q, s = quantize_activation(silu_mul(gate_up), ue8m0=ue8m0)
    return q, _in_layout(s, layout)


_silu_mul_quant_op = torch.library.custom_op("blockfp8::silu_mul_quant", mutates_args=())(_silu_mul_quant_impl)


@_silu_mul_quant_op.register_fake
def _silu_mul_quant_fake(gate_up, layout, ue8m0):
    return _empty_outputs(gate_up, gate_up.shape[1] // 2, layout)


def _check_layout(layout: object, ue8m0: object) -> None:
    if layout not in SCALE_LAYOUTS:
        raise ValueError(f"layout must be one of {SCALE_LAYOUTS}, got {layout!r}")
    if not isinstance(ue8m0, bool):
        raise TypeError(f"ue8m0 must be a bool, got {type(ue8m0).__name__} {ue8m0!r}")


def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a cpu or cuda device, got {t.device}")


def _check_same(t: torch.Tensor, name: str, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move both to one device")


def _packed(q: torch.Tensor, s: torch.Tensor, lead: tuple[int, ...] | torch.Size, dtype: torch.dtype,
            layout: str) -> QuantizedActivation:
    k, kb = q.shape[1], s.shape[1]
    # A "col" scale tensor (M, Kb) with strides (1, M') views as [..., Kb] without a copy; the GEMM op reshapes
    # it back to (M, Kb) with the same strides.
    return QuantizedActivation(q.view(*lead, k), s.view(*lead, kb), dtype, layout)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
                   layout: str | None = None, ue8m0: bool = False
                   ) -> QuantizedActivation | tuple[QuantizedActivation, torch.Tensor]:
    """``quantize_activation(rms_norm(x, weight, eps))`` in one pass, for the next block-FP8 linear.

    ``x`` [..., K] bf16/fp16/fp32, ``weight`` (K,) any float dtype. With ``residual`` (x's shape and dtype),
    the sum ``h = x + residual`` is normalized and returned as well: ``(QuantizedActivation, h)``.
    ``layout``: the scale layout to write (None: ``default_layout(x)``); ``ue8m0``: power-of-two scales.
    """
    # The common call, on CUDA, in one flat check (an eager decoder pays for every check on every call); anything
    # else is checked below, one named error per problem.
    if (type(x) is torch.Tensor and x.dtype in FLOAT_DTYPES and x.dim() >= 1 and type(eps) is float
            and 0.0 <= eps < math.inf and (layout is None or layout in SCALE_LAYOUTS) and type(ue8m0) is bool
            and isinstance(weight, torch.Tensor) and weight.dtype in FLOAT_DTYPES and weight.dim() == 1
            and x.shape[-1] == weight.shape[0] > 0 and x.is_cuda and weight.is_cuda
            and x.get_device() == weight.get_device()
            and (residual is None or (type(residual) is torch.Tensor and residual.dtype is x.dtype
                                      and residual.shape == x.shape and residual.is_cuda
                                      and residual.get_device() == x.get_device()))):
        return _rms_norm_quant_checked(x, weight, eps, residual, default_layout(x) if layout is None else layout,
                                       ue8m0)
    require_dtype(x, "x")
    require_dtype(weight, "weight")
    _check_device(x, "x")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension (the normalized axis), got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if tuple(weight.shape) != (k,):
        raise ValueError(f"weight must have shape ({k},) (x's last dimension), got {tuple(weight.shape)}")
    _check_same(weight, "weight", x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if residual is not None:
        require_tensor(residual, "residual")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _check_same(residual, "residual", x)
    layout = default_layout(x) if layout is None else layout
    _check_layout(layout, ue8m0)
    return _rms_norm_quant_checked(x, weight, float(eps), residual, layout, ue8m0)


def _rms_norm_quant_checked(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                            layout: str, ue8m0: bool) -> QuantizedActivation | tuple[QuantizedActivation, torch.Tensor]:
    k = x.shape[-1]
    res2 = None if residual is None else residual.reshape(-1, k)
    op = _rms_norm_quant_impl if _direct(x, weight, residual) else _rms_norm_quant_op
    q, s, h = op(x if x.dim() == 2 else x.reshape(-1, k), weight, eps, res2, layout, ue8m0)
    qa = _packed(q, s, x.shape[:-1], x.dtype, layout)
    return qa if residual is None else (qa, h.view(x.shape))


def silu_mul_quant(gate_up: torch.Tensor, *, layout: str | None = None, ue8m0: bool = False) -> QuantizedActivation:
    """``quantize_activation(silu_mul(gate_up))`` in one pass: SiLU(gate) * up for ``gate_up`` [..., 2I] =
    [gate, up] (bf16/fp16/fp32), quantized for the next block-FP8 linear (the down projection).

    ``layout``: the scale layout to write (None: ``default_layout(gate_up)``); ``ue8m0``: power-of-two scales.
    """
    if not (type(gate_up) is torch.Tensor and gate_up.dtype in FLOAT_DTYPES and gate_up.dim() >= 1
            and gate_up.shape[-1] > 0 and not gate_up.shape[-1] % 2 and (layout is None or layout in SCALE_LAYOUTS)
            and type(ue8m0) is bool and gate_up.is_cuda):
        # Not the common call on CUDA (one flat check above): one named error per problem.
        require_dtype(gate_up, "gate_up")
        _check_device(gate_up, "gate_up")
        if gate_up.dim() < 1 or gate_up.shape[-1] == 0 or gate_up.shape[-1] % 2:
            raise ValueError(f"gate_up must have an even, non-zero last dimension ([gate, up]), got shape "
                             f"{tuple(gate_up.shape)}")
        _check_layout(default_layout(gate_up) if layout is None else layout, ue8m0)
    layout = default_layout(gate_up) if layout is None else layout
    two_k = gate_up.shape[-1]
    op = _silu_mul_quant_impl if _direct(gate_up) else _silu_mul_quant_op
    q, s = op(gate_up if gate_up.dim() == 2 else gate_up.reshape(-1, two_k), layout, ue8m0)
    return _packed(q, s, gate_up.shape[:-1], gate_up.dtype, layout)
