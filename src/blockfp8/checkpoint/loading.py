"""Loading a block-FP8 checkpoint into a float model: ``load_fp8_model``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..format import DEFAULT_BLOCK, FP8_DTYPE
from ..hf_config import mark_fp8_model
from ..nn import Fp8BlockLinear, is_convertible_linear, short_names
from ..validate import check_fp8_weight_values, check_scale_values
from .files import (
    CONFIG_NAME,
    SCALE_SUFFIX,
    WEIGHT_SUFFIX,
    check_fp8_tensors,
    iter_tensors,
    read_quantization_config,
    read_tensor_infos,
)


@dataclass(repr=False)
class LoadReport:
    """What ``load_fp8_model`` did. ``repr`` is short; ``str`` (``print(report)``) lists every missing, unexpected
    and ignored key, ``replaced`` every layer now ``Fp8BlockLinear``."""

    replaced: list[str] = field(default_factory=list)
    loaded: int = 0
    bytes_read: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensor(s) ({self.bytes_read / 1e6:.1f} MB), "
                 f"{len(self.replaced)} linear layer(s) now Fp8BlockLinear"]
        if self.missing:
            lines.append(f"  missing from the checkpoint: {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  not in the model (ignored): {', '.join(self.unexpected)}")
        if self.ignored:
            lines.append(f"  legacy or declared-optional keys (not an error): {', '.join(self.ignored)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        # A real model has hundreds of layer names: the full lists would flood a notebook cell.
        return (f"LoadReport(replaced: {short_names(self.replaced)}, loaded: {self.loaded}, "
                f"missing: {short_names(self.missing)}, unexpected: {short_names(self.unexpected)}, "
                f"ignored: {len(self.ignored)}; print(report) and report.replaced list every name)")


# Buffers transformers' loader always forgives in a checkpoint when the model has one of that name
# (PreTrainedModel._adjust_missing_and_unexpected_keys): once persistent, now created by the model's code.
_LEGACY_BUFFERS = {"position_ids": r"(^|\.)position_ids$", "rotary_emb.inv_freq": r"rotary_emb\.inv_freq"}


def _key_filters(model: nn.Module) -> tuple[re.Pattern | None, re.Pattern | None, set[str]]:
    """(regex of missing keys to forgive, regex of unexpected keys to forgive, names of non-persistent buffers),
    as transformers decides: the ``_keys_to_ignore_on_load_missing`` / ``_unexpected`` patterns declared on any
    module of the model, plus the legacy buffers above. A checkpoint key naming one of the model's non-persistent
    buffers (a buffer that used to be saved) is forgiven too: the model's code creates it."""
    missing: set[str] = set()
    unexpected: set[str] = set()
    non_persistent: set[str] = set()
    for prefix, module in model.named_modules():
        missing.update(getattr(module, "_keys_to_ignore_on_load_missing", None) or ())
        unexpected.update(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ())
        non_persistent.update(f"{prefix}.{b}" if prefix else b for b in module._non_persistent_buffers_set)
    buffers = [name for name, _ in model.named_buffers()]
    unexpected.update(pat for suffix, pat in _LEGACY_BUFFERS.items() if any(b.endswith(suffix) for b in buffers))

    def either(patterns: set[str]) -> re.Pattern | None:
        return re.compile("|".join(f"({p})" for p in sorted(patterns))) if patterns else None

    return either(missing), either(unexpected), non_persistent


def _alias_groups(model: nn.Module) -> dict[str, set[str]]:
    """Each state name -> every name of the same tensor (tied weights appear under several names)."""
    by_id: dict[int, set[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        by_id.setdefault(id(t), set()).add(name)
    return {name: group for group in by_id.values() for name in group}


def _set_tensor(module: nn.Module, attr: str, value: torch.Tensor) -> torch.Tensor | None:
    """Copy ``value`` into the model's tensor; on the meta device (no storage to copy into) install it instead
    and return the new tensor, which tied aliases must then share."""
    current = getattr(module, attr)
    if current.is_meta:
        value = value.to(current.dtype)
        if attr in module._parameters:
            installed = module._parameters[attr] = nn.Parameter(value, requires_grad=current.requires_grad)
        else:
            installed = module._buffers[attr] = value
        return installed
    with torch.no_grad():
        current.copy_(value)
    return None


def _tie(modules: dict[str, nn.Module], names: set[str], tensor: torch.Tensor) -> None:
    """Point every alias of a tied tensor that is still on the meta device at ``tensor``: a checkpoint stores a
    tied weight once, and on a meta-built model installing it under one name leaves the others empty."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)  # "" is the model itself
        current = getattr(module, attr, None) if module is not None else None
        # Only an alias that is still the same empty tensor: a layer replaced by Fp8BlockLinear has its own.
        if not (isinstance(current, torch.Tensor) and current.is_meta and current.dtype == tensor.dtype
                and current.shape == tensor.shape):
            continue
        if attr in module._parameters:
            module._parameters[attr] = tensor
        elif attr in module._buffers:
            module._buffers[attr] = tensor


def load_fp8_model(
    model: nn.Module,
    checkpoint_dir: str | Path,
    *,
    strict: bool = True,
    progress: bool = True,
    backend: str | None = None,
) -> LoadReport:
    """Load a block-FP8 checkpoint into a float model, in place, one tensor at a time.

    Every ``nn.Linear`` whose ``<name>.weight_scale_inv`` is in the checkpoint becomes an ``Fp8BlockLinear``
    (``backend`` forces its GEMM backend); all other tensors are copied into the model's own (cast to its
    dtype). Everything checkable from the headers and config.json is checked first; values (scales in
    (0, 2^56], no NaN fp8 weight bytes) are checked as they stream in. All or nothing: the new layers are filled
    beside the model and its other tensors are held until every tensor has been read and checked, so an error
    names the tensor (and so the layer) and leaves the model exactly as it was. On a model with real (not meta)
    tensors that means its float layers, the new fp8 ones and the other tensors read stay in memory together
    until the end. ``strict`` raises on
    tensors missing from the checkpoint or unknown to the model; otherwise they are listed in the report. Keys
    transformers forgives are not errors and are listed in ``report.ignored`` (not loaded): those matching a
    module's ``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_load_unexpected``, legacy
    ``position_ids`` / ``rotary_emb.inv_freq`` buffers, and any key naming a non-persistent buffer. Works with
    models on the meta device (their tensors are replaced by the loaded ones; a tied weight stored once is
    installed under all its names), except for non-persistent buffers such as rotary tables, which no
    checkpoint holds: the model's own code must create those. A transformers model's
    config then says block FP8 (``hf_config``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(checkpoint_dir, (str, Path)):
        raise TypeError(f"checkpoint_dir must be a folder path, got {type(checkpoint_dir).__name__}")
    root = Path(checkpoint_dir)
    qc = read_quantization_config(root)
    infos = read_tensor_infos(root)
    prefixes = check_fp8_tensors(infos, qc.block_size)
    if qc.block_size != DEFAULT_BLOCK:
        raise ValueError(f"Fp8BlockLinear runs 128x128 weight blocks; {root / CONFIG_NAME} has weight_block_size "
                         f"{list(qc.block_size)}")
    modules = dict(model.named_modules())
    report = LoadReport()
    to_replace: dict[str, nn.Linear] = {}
    for prefix in prefixes:
        mod = modules.get(prefix)
        w = infos[prefix + WEIGHT_SUFFIX]
        if isinstance(mod, nn.Linear) and not is_convertible_linear(mod):
            raise ValueError(f"checkpoint has block-FP8 weights for {prefix!r} (file {w.file}), but the model's "
                             f"{prefix!r} is a {type(mod).__name__}, a Linear subclass whose parent may read its "
                             "weight directly; convert the checkpoint with --skip for it")
        if isinstance(mod, nn.Linear):
            if (mod.out_features, mod.in_features) != w.shape:
                raise ValueError(f"tensor {w.name!r} in {w.file} has shape {w.shape}; model layer {prefix!r} is "
                                 f"{(mod.out_features, mod.in_features)} (out_features, in_features)")
            to_replace[prefix] = mod
        elif mod is not None and not isinstance(mod, Fp8BlockLinear):
            raise ValueError(f"checkpoint has block-FP8 weights for {prefix!r} (file {w.file}), but the model's "
                             f"{prefix!r} is a {type(mod).__name__}, not an nn.Linear")
    state = model.state_dict(keep_vars=True)
    expected = set(state) | {p + SCALE_SUFFIX for p in to_replace}
    aliases = _alias_groups(model)
    forgive_missing, forgive_unexpected, non_persistent = _key_filters(model)
    unexpected = set(infos) - expected
    missing = {k for k in expected - set(infos) if not (aliases.get(k, set()) & set(infos))}
    ignored = ({k for k in unexpected if k in non_persistent or (forgive_unexpected and forgive_unexpected.search(k))}
               | {k for k in missing if forgive_missing and forgive_missing.search(k)})
    report.unexpected, report.missing = sorted(unexpected - ignored), sorted(missing - ignored)
    report.ignored = sorted(ignored)
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"checkpoint {root} does not match the model: missing {report.missing[:8]}"
                         f"{'...' if len(report.missing) > 8 else ''}, unexpected {report.unexpected[:8]}"
                         f"{'...' if len(report.unexpected) > 8 else ''} (pass strict=False to load anyway)")
    for name, info in infos.items():
        target = state.get(name)
        if target is not None and tuple(target.shape) != info.shape:
            raise ValueError(f"tensor {name!r} in {info.file} has shape {info.shape}; the model expects "
                             f"{tuple(target.shape)}")
        if target is not None and target.dtype == FP8_DTYPE and info.torch_dtype != FP8_DTYPE:
            # Copying into the model's fp8 buffer would cast the values (an already converted layer).
            raise ValueError(f"tensor {name!r} in {info.file} is {info.dtype}; the model's {name!r} is an fp8 "
                             f"weight and takes F8_E4M3 with its weight_scale_inv")

    # Nothing below touches the model until every tensor has been read and checked: the new layers are built
    # beside it and filled, the model's own tensors are staged, and an error on the way leaves it as it was.
    new_layers: dict[str, Fp8BlockLinear] = {}
    for prefix, lin in to_replace.items():
        bias = lin.bias
        new_layers[prefix] = Fp8BlockLinear(lin.in_features, lin.out_features, bias=bias is not None,
                                            device=lin.weight.device,
                                            bias_dtype=bias.dtype if bias is not None else torch.bfloat16,
                                            backend=backend)
    state = to_replace = lin = bias = None
    staged: list[tuple[nn.Module, str, str, torch.Tensor]] = []  # (module, attribute, tensor name, value)
    installed: list[tuple[str, torch.Tensor]] = []  # tensors placed in a new layer on the meta device
    wanted = {k: v for k, v in infos.items() if k in expected}
    for info, tensor in iter_tensors(wanted, progress, f"loading {root.name}"):
        if info.name.endswith(SCALE_SUFFIX):
            check_scale_values(tensor, name=f"tensor {info.name!r} in {info.file}")
        elif tensor.dtype == FP8_DTYPE:
            check_fp8_weight_values(tensor, name=f"tensor {info.name!r} in {info.file}")
        owner, _, attr = info.name.rpartition(".")
        if owner in new_layers:
            new = _set_tensor(new_layers[owner], attr, tensor)
            if new is not None:
                installed.append((info.name, new))
        else:
            staged.append((modules[owner] if owner else model, attr, info.name, tensor))
        report.loaded += 1
        report.bytes_read += info.nbytes
    for prefix, layer in new_layers.items():
        parent_name, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        modules[prefix] = layer
        report.replaced.append(prefix)
    # The float layers are unreferenced now and freed, before the staged tensors are copied in.
    new_layers = None
    for name, tensor in installed:
        _tie(modules, aliases.get(name, set()) - {name}, tensor)
    for module, attr, name, tensor in staged:
        new = _set_tensor(module, attr, tensor)
        if new is not None:
            _tie(modules, aliases.get(name, set()) - {name}, new)
    mark_fp8_model(model)
    return report

