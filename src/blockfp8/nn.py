"""``Fp8BlockLinear`` and whole-model conversion."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .autotune import tune_shapes
from .dispatch import check_backend_name
from .format import DEFAULT_BLOCK, FP8_DTYPE, weight_scale_shape
from .ops import linear
from .quant import quantize_weight
from .validate import check_block_size, check_fp8_linear


class KeepFp8Buffers:
    """Mixin for modules holding an fp8 ``weight`` and fp32 ``weight_scale_inv`` buffer.

    ``model.to(torch.bfloat16)`` / ``.half()`` cast every floating tensor, fp8 included; these two keep their
    dtypes (only device moves apply), while a bias follows the model's dtype.
    """

    def _apply(self, fn, recurse: bool = True):
        keep = {name: self._buffers[name] for name in ("weight", "weight_scale_inv")}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


def is_convertible_linear(module: nn.Module) -> bool:
    """Only plain ``nn.Linear`` layers are converted: subclasses (e.g. attention's ``out_proj``) are often
    used by their parent through ``.weight`` directly, which an fp8 buffer would break."""
    return type(module) is nn.Linear


class Fp8BlockLinear(KeepFp8Buffers, nn.Module):
    """A linear layer with a block-FP8 weight (128x128 scales) and per-token 1x128 activation quantization.

    Buffers ``weight`` (float8_e4m3fn, (N, K)) and ``weight_scale_inv`` (fp32, ceil-div block shape) use the
    Hugging Face / DeepSeek names, so a state dict loads straight from an FP8 checkpoint. ``backend`` forces a
    GEMM backend for this layer (None: the dispatcher chooses).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.bfloat16,
                 backend: str | None = None) -> None:
        super().__init__()
        check_backend_name(backend)
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer(
            "weight_scale_inv", torch.ones(weight_scale_shape(out_features, in_features), device=device)
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: str | None = None, *, name: str = "weight") -> Fp8BlockLinear:
        """Wrap existing fp8 weight + scales (checked: dtypes, ceil-div shape, finite positive scales).

        Non-contiguous tensors are copied once here, so the per-call layout check never fires. ``name`` (the
        weight's qualified tensor name) is used in error messages.
        """
        weight, weight_scale_inv, bias = (t.contiguous() if isinstance(t, torch.Tensor) else t
                                          for t in (weight, weight_scale_inv, bias))
        n, k = check_fp8_linear(weight, weight_scale_inv, bias, name=name)
        check_backend_name(backend)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.backend = k, n, backend
        layer.register_buffer("weight", weight)
        layer.register_buffer("weight_scale_inv", weight_scale_inv)
        layer.register_buffer("bias", bias)
        return layer

    @classmethod
    def from_linear(cls, lin: nn.Linear, block_size: tuple[int, int] = DEFAULT_BLOCK, ue8m0: bool = False,
                    backend: str | None = None, *, name: str = "weight") -> Fp8BlockLinear:
        """Quantize an ``nn.Linear`` (its bias is kept in the linear's dtype)."""
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"lin must be an nn.Linear, got {type(lin).__name__}")
        if tuple(check_block_size(block_size)) != DEFAULT_BLOCK:
            raise ValueError(f"Fp8BlockLinear runs 128x128 weight blocks, got block_size={block_size}")
        with torch.no_grad():
            w, s = quantize_weight(lin.weight.detach(), block_size, ue8m0)
            bias = lin.bias.detach().clone() if lin.bias is not None else None
        return cls.from_fp8(w, s, bias, backend, name=name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.weight_scale_inv, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend or 'auto'}")


@dataclass
class ConversionReport:
    """What ``convert_model`` did: converted layer names and skipped ones with the reason."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} linear layer(s), skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def matches_pattern(name: str, patterns: Iterable[str]) -> str | None:
    """The first glob pattern matching a qualified module name or its last component, else None."""
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pat) or pat == name:
            return pat
    return None


def convert_model(model: nn.Module, skip: Iterable[str] = (), ue8m0: bool = False,
                  backend: str | None = None, tune: bool = False) -> ConversionReport:
    """Replace every ``nn.Linear`` in ``model`` (in place) by an ``Fp8BlockLinear``.

    ``skip`` holds glob patterns matched against each layer's qualified name or its last component
    (e.g. ``"lm_head"``, ``"*.gate"``, ``"layers.0.*"``). ``tune=True`` turns on online tuning for the shapes
    created here (``autotune.py``): on CUDA, the first call of each (N, K, M bucket) times the backends on that
    call's inputs and keeps the fastest in the user's tuning cache. Returns a ``ConversionReport``.
    """
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    report = ConversionReport()
    done: dict[int, Fp8BlockLinear] = {}  # a Linear shared by several parents stays shared
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if id(child) in done:
                setattr(module, child_name, done[id(child)])
                report.converted.append(full)
                continue
            if not is_convertible_linear(child):
                continue
            pat = matches_pattern(full, skip)
            if pat is not None:
                report.skipped[full] = f"matches skip pattern {pat!r}"
                continue
            layer = Fp8BlockLinear.from_linear(child, ue8m0=ue8m0, backend=backend, name=f"{full}.weight")
            setattr(module, child_name, layer)
            done[id(child)] = layer
            report.converted.append(full)
    if tune:
        tune_shapes({(layer.out_features, layer.in_features) for layer in done.values()})
    return report
