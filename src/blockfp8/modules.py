"""Modules built on the fused producers (``blockfp8.fused``): an RMSNorm that emits a ``QuantizedActivation``
for the block-FP8 linears it feeds, and a gated MLP whose SiLU-mul quantizes for its down projection."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .eager_graphs import EagerGraphs
from .format import BLOCK
from .fused import rms_norm_quant, silu_mul_quant
from .nn import Fp8BlockLinear
from .ops import LinearPlan, gemm_plan_of, linear, runs_eagerly
from .quant import QuantizedActivation, quantize_weight
from .validate import check_device, check_size

_is_compiling = torch.compiler.is_compiling

# Eager graph sets of a norm's producer and the GEMM(s) after it live with the last GEMM's plan, beside its own
# sets; these tags start their keys.
_NORM_SET, _NORM_MLP_SET = "rms_norm_quant", "rms_norm_quant+mlp"


def _eager_chain(x: object, *tensors: torch.Tensor | None) -> bool:
    """Whether an eager call of a chain that starts from ``x`` (a producer reading it, then GEMMs; ``tensors``:
    the chain's other inputs a gradient or a trace could reach) may be replayed from a CUDA graph: plain tensors,
    nothing traced, no gradient to track."""
    return (type(x) is torch.Tensor and x.dim() >= 2 and EagerGraphs.enabled and runs_eagerly(x, *tensors)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors))))


def _graphed_plan(x: torch.Tensor, layer: Fp8BlockLinear
                  ) -> tuple[LinearPlan, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(plan, weight, scales, bias) of ``layer``'s GEMM at x's rows in a chain ``_eager_chain`` admitted, when an
    earlier call of the chain's modules built that plan and it is graphed (so a shape's first calls run the
    modules; a plan exists only for a device that graphs, never on the CPU)."""
    buffers = layer._buffers
    weight, scales, bias = buffers.get("weight"), buffers.get("weight_scale_inv"), buffers.get("bias")
    if weight is None or scales is None or x.get_device() != weight.get_device():
        return None
    plan = gemm_plan_of(weight, scales, bias, x.dtype, x.numel() // x.shape[-1], layer.backend)
    return None if plan is None or not plan.graphed else (plan, weight, scales, bias)


def _replay_chain(x: torch.Tensor, last: tuple[LinearPlan, torch.Tensor, torch.Tensor, torch.Tensor | None],
                  key: tuple, last_input: Callable[[torch.Tensor], QuantizedActivation]) -> torch.Tensor | None:
    """The chain's output from its set on the last GEMM's plan (``last``, from ``_graphed_plan``), or None (launch
    directly): the set's kernels are ``last_input(x)`` (the producers and GEMMs before the last GEMM) and that GEMM.
    ``key`` holds everything the chain bakes in besides the last GEMM's tensors, whose storage the plan was found
    for (``ops.weight_state``)."""
    plan, weight, scales, bias = last
    graphs = plan.graph_set(x, key)
    if graphs is None:
        return None

    def run(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        qa = last_input(x)
        return plan.run_gemm(qa.values, qa.scales, weight, scales, bias, out=out)

    return graphs((x,), run, (weight, scales, bias))


def _hooked(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has a forward or backward hook, or any module does (global hooks): a replay of a
    chain skips its modules' calls, so their hooks (a fidelity check, a profiler) would not see them."""
    g = nn.modules.module
    if (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
            or g._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def _norm_key(norm: Fp8RMSNorm) -> tuple:
    return norm.weight.data_ptr(), norm.weight.dtype, norm.eps, norm.layout, norm.ue8m0


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
        check_size(dim, "dim")
        self.weight = nn.Parameter(torch.ones(dim, device=check_device(device), dtype=dtype))
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


def stack_linears(linears: Sequence[nn.Module], names: Sequence[str], backend: str | None, name: str, *,
                  same_shape: bool = False) -> Fp8BlockLinear:
    """One linear computing the linears' outputs side by side (``name``: its name in error messages). Float
    weights are stacked and quantized; fp8 ones are stacked with their block scales, which needs every output but
    the last to end on a 128-row block."""
    first = linears[0]
    listed = " and ".join(names)
    if (any(type(lin) is not type(first) for lin in linears)
            or not isinstance(first, (nn.Linear, Fp8BlockLinear))):
        raise TypeError(f"{listed} must all be nn.Linear or all Fp8BlockLinear, got "
                        f"{', '.join(type(lin).__name__ for lin in linears)}")
    if same_shape and len({(lin.out_features, lin.in_features) for lin in linears}) > 1:
        raise ValueError(f"{listed} must have one shape, got "
                         f"{' and '.join(f'{lin.out_features}x{lin.in_features}' for lin in linears)}")
    if any(lin.in_features != first.in_features for lin in linears):
        raise ValueError(f"{listed} must share in_features, got "
                         f"{', '.join(str(lin.in_features) for lin in linears)}")
    if len({lin.bias is None for lin in linears}) > 1:
        raise ValueError(f"{listed} must all have a bias or none")
    bias = None if first.bias is None else torch.cat([lin.bias.detach() for lin in linears])
    with torch.no_grad():
        if isinstance(first, nn.Linear):
            w, s = quantize_weight(torch.cat([lin.weight for lin in linears]))
        else:
            ragged = [n for n, lin in zip(names[:-1], linears[:-1], strict=True) if lin.out_features % BLOCK]
            if ragged:
                raise ValueError(f"fp8 {listed} stack only when every output but the last ends on a whole weight "
                                 f"block (out_features % {BLOCK} == 0), not {', '.join(ragged)}; stack the float "
                                 "weights instead")
            w = torch.cat([lin.weight for lin in linears])
            s = torch.cat([lin.weight_scale_inv for lin in linears])
    return Fp8BlockLinear.from_fp8(w, s, bias, backend, name=f"{name}.weight")


class Fp8GatedMLP(nn.Module):
    """SwiGLU MLP on block-FP8 linears: ``down_proj(silu_mul_quant(gate_up_proj(x)))``, where the SiLU-mul writes
    the down projection's fp8 input directly. ``x`` may be a float tensor or a ``QuantizedActivation`` (from an
    ``Fp8RMSNorm``). ``gate_up_proj`` computes [gate, up] along its output. With ``norm`` (an ``Fp8RMSNorm``) the
    MLP normalizes its float input first, and an eager call replays the norm's producer, both GEMMs and the
    SiLU-mul from one CUDA graph (the norm module that fed it becomes an identity: ``hf.fuse_producers``).
    """

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, *, layout: str | None = None,
                 ue8m0: bool = False, device: torch.device | str | None = None,
                 bias_dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> None:
        super().__init__()
        check_size(hidden, "hidden")
        check_size(intermediate, "intermediate")
        self.gate_up_proj = Fp8BlockLinear(hidden, 2 * intermediate, bias, device, bias_dtype, backend)
        self.down_proj = Fp8BlockLinear(intermediate, hidden, bias, device, bias_dtype, backend)
        self.layout = layout
        self.ue8m0 = ue8m0
        self.norm: Fp8RMSNorm | None = None

    @classmethod
    def from_linears(cls, gate_up_proj: nn.Module, down_proj: nn.Module, *, layout: str | None = None,
                     ue8m0: bool = False, backend: str | None = None, norm: Fp8RMSNorm | None = None) -> Fp8GatedMLP:
        """From a fused gate-up linear and a down linear (nn.Linear ones are quantized; Fp8BlockLinear ones are
        shared, not copied); ``norm``: the MLP's own input norm (see the class)."""
        gate_up = _fp8(gate_up_proj, "gate_up_proj", backend)
        down = _fp8(down_proj, "down_proj", backend)
        if gate_up.out_features != 2 * down.in_features:
            raise ValueError(f"gate_up_proj.out_features must be 2 * down_proj.in_features = {2 * down.in_features}, "
                             f"got {gate_up.out_features}")
        if norm is not None and (not isinstance(norm, Fp8RMSNorm) or norm.weight.shape[0] != gate_up.in_features):
            raise ValueError(f"norm must be an Fp8RMSNorm of size {gate_up.in_features} (gate_up_proj.in_features), "
                             f"got {type(norm).__name__}")
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.gate_up_proj, mlp.down_proj, mlp.layout, mlp.ue8m0 = gate_up, down, layout, ue8m0
        mlp.norm = norm
        return mlp

    @classmethod
    def from_projections(cls, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, *,
                         layout: str | None = None, ue8m0: bool = False, backend: str | None = None,
                         norm: Fp8RMSNorm | None = None) -> Fp8GatedMLP:
        """From separate gate, up and down linears (the Llama/Qwen3 layout): gate and up are stacked into one
        GEMM."""
        gate_up = stack_linears((gate_proj, up_proj), ("gate_proj", "up_proj"), backend, "gate_up_proj",
                                same_shape=True)
        return cls.from_linears(gate_up, down_proj, layout=layout, ue8m0=ue8m0, backend=backend, norm=norm)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        norm = self.norm
        if norm is not None:
            # Under torch.compile this branch is dropped while tracing (is_compiling() is a constant there).
            y = None if _is_compiling() else self._replayed(x)
            if y is not None:
                return y
            x = norm(x)
        return self.down_proj(silu_mul_quant(self.gate_up_proj(x), layout=self.layout, ue8m0=self.ue8m0))

    def _replayed(self, x: torch.Tensor) -> torch.Tensor | None:
        """An eager call's output from one CUDA graph of the norm's producer, gate_up, the SiLU-mul and down, or
        None: the call runs the modules (``_eager_chain``, ``_graphed_plan``; the set lives with down's plan)."""
        norm, gate_up, down_proj = self.norm, self.gate_up_proj, self.down_proj
        if (_hooked(norm, gate_up, down_proj)
                or not _eager_chain(x, norm.weight, gate_up._buffers.get("bias"), down_proj._buffers.get("bias"))):
            return None
        up = _graphed_plan(x, gate_up)
        down = None if up is None else _graphed_plan(x, down_proj)
        if down is None:
            return None
        up_plan, up_weight, up_scales, up_bias = up
        eps, layout, ue8m0, act_layout, act_ue8m0 = norm.eps, norm.layout, norm.ue8m0, self.layout, self.ue8m0
        # Everything the graph bakes in besides down's tensors (which the set itself checks) is in its key.
        key = (_NORM_MLP_SET, x.shape, x.stride(), x.dtype, _norm_key(norm), act_layout, act_ue8m0,
               up_weight.data_ptr(), up_scales.data_ptr(), 0 if up_bias is None else up_bias.data_ptr())

        def down_input(x: torch.Tensor) -> QuantizedActivation:
            qa = rms_norm_quant(x, norm.weight, eps, layout=layout, ue8m0=ue8m0)
            gate_up = up_plan.run_gemm(qa.values, qa.scales, up_weight, up_scales, up_bias)
            return silu_mul_quant(gate_up, layout=act_layout, ue8m0=act_ue8m0)

        return _replay_chain(x, down, key, down_input)


class ProjectedInput(NamedTuple):
    """A normalized activation already multiplied by every projection it feeds, in one stacked GEMM
    (``Fp8NormProjections``): ``outputs`` [..., sum of their N], read by each projection's ``ProjectionSlice``.
    ``shape`` is the normalized activation's, which attention code reads before its projections."""

    outputs: torch.Tensor
    shape: torch.Size


class Fp8NormProjections(nn.Module):
    """An RMSNorm and the projections it feeds (q, k and v) as one producer and one stacked GEMM:
    ``proj(norm(x))``, returned as a ``ProjectedInput`` for the ``ProjectionSlice`` modules that stand in for the
    projections. At decode three small GEMMs, each mostly launch and ramp-up, become one."""

    def __init__(self, norm: Fp8RMSNorm, proj: Fp8BlockLinear) -> None:
        super().__init__()
        if proj.in_features != norm.weight.shape[0]:
            raise ValueError(f"proj.in_features ({proj.in_features}) must be the norm's size "
                             f"({norm.weight.shape[0]})")
        self.norm, self.proj = norm, proj

    def forward(self, x: torch.Tensor) -> ProjectedInput:
        y = None if _is_compiling() else self._replayed(x)  # (a constant while torch.compile traces)
        return ProjectedInput(self.proj(self.norm(x)) if y is None else y, x.shape)

    def _replayed(self, x: torch.Tensor) -> torch.Tensor | None:
        """An eager call's output from one CUDA graph of the norm's producer and the stacked GEMM, or None: the call
        runs the two modules (``_eager_chain``, ``_graphed_plan``)."""
        norm, proj = self.norm, self.proj
        if _hooked(norm, proj) or not _eager_chain(x, norm.weight, proj._buffers.get("bias")):
            return None
        found = _graphed_plan(x, proj)
        if found is None:
            return None
        eps, layout, ue8m0 = norm.eps, norm.layout, norm.ue8m0
        # The graph bakes in the norm's weight address, eps and scale layout: all in the set's key.
        key = (_NORM_SET, x.shape, x.stride(), x.dtype, _norm_key(norm))
        return _replay_chain(x, found, key, lambda x: rms_norm_quant(x, norm.weight, eps, layout=layout, ue8m0=ue8m0))


class ProjectionSlice(nn.Module):
    """Rows [start, end) of a stacked ``Fp8BlockLinear`` as a projection of its own. Given a ``ProjectedInput``
    it returns its columns of the stacked output (a view, no kernel); given anything else it runs its rows of
    the stacked weight as a linear. ``start`` lies on a 128-row weight block. The stacked linear is held, not
    registered: it belongs to the ``Fp8NormProjections`` that runs it."""

    def __init__(self, stacked: Fp8BlockLinear, start: int, end: int) -> None:
        super().__init__()
        if start % BLOCK or not 0 <= start < end <= stacked.out_features:
            raise ValueError(f"a projection slice needs 0 <= start < end <= {stacked.out_features} with start on a "
                             f"{BLOCK}-row block, got [{start}, {end})")
        object.__setattr__(self, "_stacked", stacked)  # not a submodule: the state dict holds it once
        self.start, self.end = start, end
        self.in_features, self.out_features = stacked.in_features, end - start

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # Views of the stacked buffers, made again only when those are replaced (a device move, a load with
        # assign=True): a layer's plans live with its weight tensor, so a new view per call would plan every call.
        stacked = self._stacked
        weight = stacked.weight
        views = self.__dict__.get("_views")
        if views is None or views[0] is not weight:
            bias = stacked.bias
            views = (weight, weight[self.start:self.end],
                     stacked.weight_scale_inv[self.start // BLOCK:-(-self.end // BLOCK)],
                     None if bias is None else bias[self.start:self.end])
            self.__dict__["_views"] = views
        return views[1:]

    @property
    def weight(self) -> torch.Tensor:
        """This projection's rows of the stacked fp8 weight (a view)."""
        return self._rows()[0]

    @property
    def weight_scale_inv(self) -> torch.Tensor:
        return self._rows()[1]

    @property
    def bias(self) -> torch.Tensor | None:
        return self._rows()[2]

    def forward(self, x: torch.Tensor | QuantizedActivation | ProjectedInput) -> torch.Tensor:
        if isinstance(x, ProjectedInput):
            return x.outputs[..., self.start:self.end]
        return linear(x, *self._rows(), backend=self._stacked.backend)

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.end}) of a stacked {self._stacked.out_features}x{self.in_features} linear"
