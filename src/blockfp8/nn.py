"""``Fp8BlockLinear`` and whole-model conversion."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .autotune import tune_shapes
from .dispatch import check_backend_name
from .format import DEFAULT_BLOCK, FP8_DTYPE, weight_scale_shape
from .hf_config import mark_fp8_model
from .ops import layer_linear
from .quant import quantize_weight
from .validate import (
    check_block_size,
    check_device,
    check_fp8_linear,
    check_fp8_state_dict,
    check_out_dtype,
    check_size,
)

# Layers ``convert_model`` and ``convert_checkpoint`` keep in float unless told otherwise, as skip patterns
# (``matches_pattern``): embeddings and norms are not matmuls, lm_head and MoE routers ("gate", not "gate_proj")
# are small but sensitive to quantization error.
DEFAULT_SKIP = ("*embed*", "*norm*", "lm_head", "gate")

# How a skip pattern matches, in the words every "matches no layer" error uses.
PATTERN_RULE = ("A pattern is a case-sensitive glob (fnmatch: '*' also crosses dots) matched against a layer's full "
                "dotted name, the full name of any module containing it, or any one component of the name, so "
                "'mlp' and 'model.layers.0.*' both skip 'model.layers.0.mlp.up_proj'")


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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # nn.Module would copy_ a bf16 weight into the fp8 buffer (a cast: output error ~1) and take any scale;
        # check dtypes, shapes and values of what arrives first, naming the key.
        shapes = {name: tuple(t.shape) for name, t in self._buffers.items()
                  if name in ("weight", "weight_scale_inv", "bias") and t is not None}
        check_fp8_state_dict(state_dict, prefix, shapes, contiguous=local_metadata.get("assign_to_params_buffers",
                                                                                         False))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


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
        check_size(in_features, "in_features")
        check_size(out_features, "out_features")
        device = check_device(device)
        check_out_dtype(bias_dtype, "bias_dtype")
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
        # The plans of this layer live with its weight tensor (ops.PLANS): replacing the weight (a device move,
        # load_state_dict with assign=True) starts new ones, and copies of the layer get their own.
        # The buffers straight from their dict: nn.Module's attribute lookup costs about 0.4 us each on every call.
        buffers = self._buffers
        try:
            weight, scales, bias = buffers["weight"], buffers["weight_scale_inv"], buffers["bias"]
        except KeyError:  # one of them was assigned as a parameter, which nn.Module keeps elsewhere
            weight, scales, bias = self.weight, self.weight_scale_inv, self.bias
        return layer_linear(x, weight, scales, bias, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend or 'auto'}")


def short_names(names: Iterable[str], limit: int = 2) -> str:
    """A count and the first ``limit`` names, for a short ``repr``: ``3 ['a', 'b', ...]`` (``0`` when empty)."""
    names = list(names)
    if not names:
        return "0"
    shown = ", ".join(repr(n) for n in names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} [{shown}]"


@dataclass(repr=False)
class ConversionReport:
    """What ``convert_model`` did: converted layer names, skipped ones with the reason, and the names that reach
    a layer already listed under another name (one module used twice stays one ``Fp8BlockLinear``).

    ``repr`` is short (counts and a few names); ``str`` (``print(report)``) lists the skipped and shared names,
    the fields every name.
    """

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        head = f"converted {len(self.converted)} linear layer(s), skipped {len(self.skipped)}"
        if self.shared:
            head += f" ({len(self.shared)} of these name(s) reach a layer listed under another name)"
        lines = [head]
        lines += [f"  {name} is the same layer as {first}" for name, first in self.shared.items()]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        # A real model has hundreds of layer names: the full lists would flood a notebook cell.
        return (f"ConversionReport(converted: {short_names(self.converted)}, skipped: {short_names(self.skipped)}, "
                f"shared: {len(self.shared)}; report.converted, .skipped and .shared list every name)")


def _module_paths(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a"]``: the layer and every module containing it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def matches_pattern(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern matching the qualified layer name ``name``, else None (the rule: ``PATTERN_RULE``).

    A module containing the layer counts as the layer, so a pattern naming a parent module (``"mlp"``,
    ``"model.layers.0"``) skips every layer under it.
    """
    paths = _module_paths(name)
    for pat in patterns:
        for path in paths:
            # Equality too: a name holding glob characters ("[") would not match itself as a pattern.
            if pat == path or fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(path.rsplit(".", 1)[-1], pat):
                return pat
    return None


def check_skip_patterns(skip: Iterable[str], layers: list[str], what: str,
                        others: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` for the first pattern of ``skip`` matching none of ``layers`` (the names a skip can
    keep in float; ``what`` says what they are, e.g. "linear layer of the model"). The message gives the rule,
    the names of ``others`` (modules the conversion leaves as they are) the pattern does match, or else up to 3
    close names. A pattern matching nothing would otherwise convert everything, silently. The ``DEFAULT_SKIP``
    patterns are exempt, even when passed in ``skip``: they are written for any model, not for this one."""
    for pat in skip:
        if pat in DEFAULT_SKIP or any(matches_pattern(name, (pat,)) for name in layers):
            continue
        msg = f"skip pattern {pat!r} matches no {what}"
        hits = [name for name in others if matches_pattern(name, (pat,))]
        if hits:
            msg += (f"; it matches only other modules, which this conversion leaves as they are: "
                    f"{', '.join(map(repr, hits[:3]))}{', ...' if len(hits) > 3 else ''}")
        else:
            candidates = sorted({part for name in layers for path in _module_paths(name)
                                 for part in (path, path.rsplit(".", 1)[-1])})
            close = difflib.get_close_matches(pat.strip("*?."), candidates, n=3, cutoff=0.5)
            if close:
                msg += f"; close names: {', '.join(map(repr, close))}"
            elif layers:
                msg += f"; layers are named like {', '.join(map(repr, layers[:3]))}"
            else:
                msg += f"; there is no {what}"
        raise ValueError(f"{msg}. {PATTERN_RULE}.")


def check_skip_argument(skip: Iterable[str] | str) -> tuple[str, ...]:
    """``skip`` as a tuple of patterns: one string or an iterable of strings."""
    if isinstance(skip, str):
        return (skip,)
    try:
        patterns = tuple(skip)
    except TypeError:
        raise TypeError(f"skip must be a pattern or an iterable of patterns (str), got {type(skip).__name__}") \
            from None
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"skip patterns must be str, got {type(pat).__name__} {pat!r}")
    return patterns


def _skip_reason(name: str, skip: tuple[str, ...], default_skip: bool) -> str | None:
    pat = matches_pattern(name, DEFAULT_SKIP) if default_skip else None
    if pat is not None:
        return f"default skip {pat!r}"
    pat = matches_pattern(name, skip)
    return None if pat is None else f"matches skip pattern {pat!r}"


def convert_model(model: nn.Module, skip: Iterable[str] = (), ue8m0: bool = False,
                  backend: str | None = None, tune: bool = False, *, default_skip: bool = True) -> ConversionReport:
    """Replace every plain ``nn.Linear`` in ``model`` (in place) by an ``Fp8BlockLinear``.

    Skipped, as ``convert_checkpoint`` skips them: layers matching ``DEFAULT_SKIP`` (embeddings, norms,
    ``lm_head``, MoE routers named ``gate``; ``default_skip=False`` turns these off) or a pattern of ``skip``:
    case-sensitive globs (``*`` also crosses dots) matched against a layer's full dotted name, the full name of
    any module containing it, or any one component of the name. So a pattern naming a parent module skips every
    layer under it: ``"mlp"`` skips ``model.layers.0.mlp.up_proj``, as do ``"model.layers.0"`` and
    ``"model.layers.0.*"``; ``"*.gate"`` skips MoE routers. A pattern of ``skip`` that matches no plain
    ``nn.Linear`` is a ``ValueError`` naming it and close names (a typo would otherwise convert everything);
    the ``DEFAULT_SKIP`` patterns may match nothing, here or in ``skip``. A layer reached under several names
    (one module used twice) becomes one ``Fp8BlockLinear`` under all of them, or stays float under all of them
    if any name is skipped.

    All or nothing: every layer is quantized and checked before the first one is swapped in, so an error
    (a NaN in one weight) names the layer and leaves ``model`` exactly as it was. Until the call returns, the
    float layers and their fp8 replacements are both in memory. ``model`` itself must not be an ``nn.Linear``
    (a root cannot be replaced in place): use ``Fp8BlockLinear.from_linear(layer)``.

    Returns a ``ConversionReport`` listing every name. ``tune=True`` turns on online tuning for the shapes
    created here (``autotune.py``): on CUDA, the first call of each (N, K, M bucket) times the backends on that
    call's inputs and keeps the fastest in the user's tuning cache.
    A transformers model's config then says block FP8, so ``save_pretrained`` writes a checkpoint that loads
    back (``hf_config``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise TypeError("convert_model replaces the linear layers inside a model, and model is itself an "
                        "nn.Linear, which cannot be replaced in place: use Fp8BlockLinear.from_linear(layer)")
    skip = check_skip_argument(skip)
    check_backend_name(backend)
    report = ConversionReport()
    # Every (parent, attribute, name) reaching each linear: named_modules/named_children list a module once, so a
    # second use in one parent (Sequential(lin, act, lin)) or a shared parent would keep its float layer.
    uses: dict[int, tuple[nn.Linear, list[tuple[nn.Module, str, str]]]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None and is_convertible_linear(child):
                name = f"{parent_name}.{attr}" if parent_name else attr
                uses.setdefault(id(child), (child, []))[1].append((parent, attr, name))
    layer_names = [name for _, places in uses.values() for _, _, name in places]
    check_skip_patterns(skip, layer_names, "linear layer of the model (plain nn.Linear)",
                        others=[name for name, m in model.named_modules() if name and not is_convertible_linear(m)])
    swaps: list[tuple[Fp8BlockLinear, list[tuple[nn.Module, str, str]]]] = []
    for lin, places in uses.values():
        names = [name for _, _, name in places]
        reasons = {name: _skip_reason(name, skip, default_skip) for name in names}
        matched = next((name for name in names if reasons[name] is not None), None)
        if matched is not None:
            for name in names:
                report.skipped[name] = reasons[name] or f"the same layer as {matched} ({reasons[matched]})"
            continue
        try:
            layer = Fp8BlockLinear.from_linear(lin, ue8m0=ue8m0, backend=backend, name=f"{names[0]}.weight")
        except ValueError as e:
            raise ValueError(f"cannot convert layer {names[0]!r}, so no layer was converted and the model is "
                             f"unchanged: {e}") from e
        swaps.append((layer, places))
        report.converted += names
        report.shared.update({name: names[0] for name in names[1:]})
    # Only now is the model touched: assigning a built layer cannot fail halfway through on bad data.
    for layer, places in swaps:
        for parent, attr, _ in places:
            setattr(parent, attr, layer)
    if tune:
        tune_shapes({(layer.out_features, layer.in_features) for layer, _ in swaps})
    mark_fp8_model(model)
    return report
