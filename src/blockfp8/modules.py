"""Modules built on the fused producers (``blockfp8.fused``): an RMSNorm that emits a ``QuantizedActivation``
for the block-FP8 linears it feeds, and a gated MLP whose SiLU-mul quantizes for its down projection."""

from __future__ import annotations

import torch
from torch import nn

from .fused import rms_norm_quant, silu_mul_quant
from .nn import Fp8BlockLinear
from .quant import QuantizedActivation, quantize_weight


class Fp8RMSNorm(nn.Module):
    """RMSNorm whose output is quantized in the same pass for the block-FP8 linear(s) it feeds.

    ``forward(x)`` returns a ``QuantizedActivation``; ``forward(x, residual)`` normalizes ``x + residual`` and
    returns ``(QuantizedActivation, x + residual)``, the residual add engines fuse into the norm. The weight
    multiplies in fp32 before the one cast to x's dtype (as vLLM does); Hugging Face's Llama/Qwen3 RMSNorm casts
    first and multiplies in x's dtype, which differs by at most an ulp of that dtype.
    ``layout``: the scale layout to write (None: ``fused.default_layout`` of the input).
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, layout: str | None = None, ue8m0: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps
        self.layout = layout
        self.ue8m0 = ue8m0

    @classmethod
    def from_norm(cls, norm: nn.Module, *, layout: str | None = None, ue8m0: bool = False) -> Fp8RMSNorm:
        """Wrap an RMSNorm module, sharing its weight: anything with a 1-D ``weight`` and ``eps`` (the decoder's,
        ``torch.nn.RMSNorm``) or ``variance_epsilon`` (Hugging Face's)."""
        weight = getattr(norm, "weight", None)
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise TypeError(f"norm must have a 1-D weight, got {type(norm).__name__} with weight "
                            f"{None if weight is None else tuple(weight.shape)}")
        if eps is None:
            # torch.nn.RMSNorm's eps=None means the input dtype's machine epsilon; the weight's dtype stands in.
            eps = torch.finfo(weight.dtype).eps
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight, layer.eps, layer.layout, layer.ue8m0 = weight, float(eps), layout, ue8m0
        return layer

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> QuantizedActivation | tuple[QuantizedActivation, torch.Tensor]:
        return rms_norm_quant(x, self.weight, self.eps, residual, layout=self.layout, ue8m0=self.ue8m0)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, layout={self.layout or 'auto'}, ue8m0={self.ue8m0}"


def _fp8(lin: nn.Module, name: str, backend: str | None) -> Fp8BlockLinear:
    if isinstance(lin, Fp8BlockLinear):
        return lin
    if isinstance(lin, nn.Linear):
        return Fp8BlockLinear.from_linear(lin, backend=backend, name=f"{name}.weight")
    raise TypeError(f"{name} must be an nn.Linear or an Fp8BlockLinear, got {type(lin).__name__}")


def _stack(gate: nn.Module, up: nn.Module, backend: str | None) -> Fp8BlockLinear:
    """One linear computing [gate(x), up(x)]. Float weights are stacked and quantized; fp8 ones are stacked
    with their block scales, which needs gate's out_features on a 128-row block boundary."""
    if type(gate) is not type(up) or not isinstance(gate, (nn.Linear, Fp8BlockLinear)):
        raise TypeError(f"gate_proj and up_proj must both be nn.Linear or both Fp8BlockLinear, got "
                        f"{type(gate).__name__} and {type(up).__name__}")
    if gate.in_features != up.in_features or gate.out_features != up.out_features:
        raise ValueError(f"gate_proj and up_proj must have one shape, got {gate.out_features}x{gate.in_features} "
                         f"and {up.out_features}x{up.in_features}")
    if (gate.bias is None) != (up.bias is None):
        raise ValueError("gate_proj and up_proj must both have a bias or neither")
    bias = None if gate.bias is None else torch.cat([gate.bias.detach(), up.bias.detach()])
    with torch.no_grad():
        if isinstance(gate, nn.Linear):
            w, s = quantize_weight(torch.cat([gate.weight, up.weight]))
        else:
            if gate.out_features % 128:
                raise ValueError(f"fp8 gate_proj and up_proj stack only when out_features % 128 == 0 (whole weight "
                                 f"blocks), got {gate.out_features}; stack the float weights instead")
            w = torch.cat([gate.weight, up.weight])
            s = torch.cat([gate.weight_scale_inv, up.weight_scale_inv])
    return Fp8BlockLinear.from_fp8(w, s, bias, backend, name="gate_up_proj.weight")


class Fp8GatedMLP(nn.Module):
    """SwiGLU MLP on block-FP8 linears: ``down_proj(silu_mul_quant(gate_up_proj(x)))``, where the SiLU-mul writes
    the down projection's fp8 input directly. ``x`` may be a float tensor or a ``QuantizedActivation`` (from an
    ``Fp8RMSNorm``). ``gate_up_proj`` computes [gate, up] along its output.
    """

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, *, layout: str | None = None,
                 ue8m0: bool = False, device: torch.device | str | None = None,
                 bias_dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> None:
        super().__init__()
        self.gate_up_proj = Fp8BlockLinear(hidden, 2 * intermediate, bias, device, bias_dtype, backend)
        self.down_proj = Fp8BlockLinear(intermediate, hidden, bias, device, bias_dtype, backend)
        self.layout = layout
        self.ue8m0 = ue8m0

    @classmethod
    def from_linears(cls, gate_up_proj: nn.Module, down_proj: nn.Module, *, layout: str | None = None,
                     ue8m0: bool = False, backend: str | None = None) -> Fp8GatedMLP:
        """From a fused gate-up linear and a down linear (nn.Linear ones are quantized; Fp8BlockLinear ones are
        shared, not copied)."""
        gate_up = _fp8(gate_up_proj, "gate_up_proj", backend)
        down = _fp8(down_proj, "down_proj", backend)
        if gate_up.out_features != 2 * down.in_features:
            raise ValueError(f"gate_up_proj.out_features must be 2 * down_proj.in_features = {2 * down.in_features}, "
                             f"got {gate_up.out_features}")
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.gate_up_proj, mlp.down_proj, mlp.layout, mlp.ue8m0 = gate_up, down, layout, ue8m0
        return mlp

    @classmethod
    def from_projections(cls, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, *,
                         layout: str | None = None, ue8m0: bool = False, backend: str | None = None) -> Fp8GatedMLP:
        """From separate gate, up and down linears (the Llama/Qwen3 layout): gate and up are stacked into one
        GEMM."""
        return cls.from_linears(_stack(gate_proj, up_proj, backend), down_proj, layout=layout, ue8m0=ue8m0,
                                backend=backend)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        return self.down_proj(silu_mul_quant(self.gate_up_proj(x), layout=self.layout, ue8m0=self.ue8m0))
