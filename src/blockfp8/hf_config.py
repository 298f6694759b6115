"""What a transformers model holding block-FP8 layers says about them, and the check that its save loads back.

transformers decides how to read a checkpoint from config.json alone: without a ``quantization_config`` it loads
fp8 bytes as if they were float weights, and the only trace is an "unexpected ``weight_scale_inv``" line.
``mark_fp8_model`` runs at the end of every path that puts block-FP8 layers into a model (``convert_model``,
``load_fp8_model``, ``blockfp8.hf.quantize``). On a transformers model it sets ``config.quantization_config``
(what transformers' ``FineGrainedFP8Config`` reads: quant_method "fp8", 128x128 blocks, the float linears as
``modules_to_not_convert``) and attaches transformers' own FP8 quantizer as ``model.hf_quantizer``, as
``from_pretrained`` does for an FP8 checkpoint, with one addition: ``save_pretrained`` asks it whether the model
can be saved before creating the output folder, and there it refuses a save that cannot load back
(``check_saveable``), so a refused save leaves no folder; it asks for the state dict before writing any file, and
there the config is re-derived from the layers as they are now.

transformers is never imported here: a model of its classes exists only once the caller has imported it.
"""

from __future__ import annotations

import functools
import sys
import weakref

import torch
from torch import nn

from .format import DEFAULT_BLOCK, FP8_DTYPE, Fp8QuantConfig


def transformers_module():
    """The transformers module if the process has imported it, else None (never imports it)."""
    return sys.modules.get("transformers")


def is_transformers_model(model: object) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel``."""
    tf = transformers_module()
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def is_fp8_linear(module: nn.Module) -> bool:
    """A block-FP8 linear layer as a checkpoint stores it: an fp8 ``weight`` next to its ``weight_scale_inv``
    (blockfp8's ``Fp8BlockLinear``, or transformers' ``FP8Linear`` holding fp8 weights)."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dtype == FP8_DTYPE
            and isinstance(getattr(module, "weight_scale_inv", None), torch.Tensor))


def fp8_layout(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of the block-FP8 linear layers, names of the float ``nn.Linear`` layers) of ``model``.

    Float means exactly ``nn.Linear``: those are the layers transformers' FP8 loader would make FP8 unless a
    config names them in ``modules_to_not_convert``.
    """
    fp8, floats = [], []
    for name, module in model.named_modules():
        if is_fp8_linear(module):
            fp8.append(name)
        elif type(module) is nn.Linear:
            floats.append(name)
    return fp8, floats


def quantization_config_of(model: nn.Module) -> dict:
    """The ``quantization_config`` that describes ``model``'s layers as they are now."""
    return Fp8QuantConfig(DEFAULT_BLOCK, modules_to_not_convert=tuple(fp8_layout(model)[1])).to_dict()


def _declared_ties(model: nn.Module) -> dict[str, str]:
    """{tensor name: the name it is tied to} as transformers will re-tie them when loading."""
    expanded = getattr(model, "get_expanded_tied_weights_keys", None)
    if expanded is not None:
        try:
            return dict(expanded(all_submodels=True))
        except TypeError:  # a transformers 5 release before sub-models had their own ties
            return dict(expanded())
    # transformers before 5.0: only the output embedding follows the input embedding, when the config says so.
    config = getattr(model, "config", None)
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or out is None or inp is None:
        return {}
    names = {id(m): name for name, m in model.named_modules()}
    return {f"{names[id(out)]}.weight": f"{names[id(inp)]}.weight"}


def _owner(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def _tie_problems(model: nn.Module, fp8: set[str]) -> list[str]:
    problems = []
    for target, source in _declared_ties(model).items():
        quantized = [_owner(n) for n in (target, source) if _owner(n) in fp8]
        if not quantized:
            continue
        problems.append(
            f"{target!r} is tied to {source!r} (config.tie_word_embeddings="
            f"{getattr(model.config, 'tie_word_embeddings', None)}), "
            f"but {', '.join(map(repr, quantized))} holds block-FP8 weights and a tie loads one tensor into both; "
            f"keep {quantized[0]!r} in float (skip=[{quantized[0]!r}]) or untie them "
            "(model.config.tie_word_embeddings = False) to save two tensors")
    return problems


def _matching_problems(model: nn.Module, fp8: list[str], floats: list[str]) -> list[str]:
    """Layers transformers' loader would keep in float although they are fp8: its ``modules_to_not_convert``
    patterns also match name suffixes, and ``_keep_in_fp32_modules`` always stay float."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # older transformers: nothing to check the names against
        return []
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or ())
    patterns = floats + keep_fp32
    problems = []
    for name in fp8:
        if should_convert_module(name, patterns):
            continue
        hits = [p for p in patterns if not should_convert_module(name, [p])]
        why = "is in the model's _keep_in_fp32_modules" if set(hits) <= set(keep_fp32) else \
            f"matches the float layer name(s) {hits} in modules_to_not_convert"
        problems.append(f"block-FP8 layer {name!r} {why}, so transformers would load its fp8 bytes into a float "
                        "layer; keep it in float (add it to skip) or rename the float layer")
    return problems


def _producer_problems(model: nn.Module) -> list[str]:
    """Modules ``hf.fuse_producers`` put in: their tensors (stacked projections) are not the model's own."""
    fused = [name for name, m in model.named_modules() if type(m).__module__ == "blockfp8.modules"]
    if not fused:
        return []
    return [f"{len(fused)} module(s) run blockfp8's fused producers (hf.fuse_producers), such as {fused[0]!r}, whose "
            "stacked projections (qkv, gate_up) transformers would not load; save the model before fusing, or "
            "quantize a fresh copy"]


def save_problems(model: nn.Module) -> list[str]:
    """Why a checkpoint of ``model`` would not load back as the same model, one sentence each (empty: it would)."""
    fp8, floats = fp8_layout(model)
    if not fp8 or not is_transformers_model(model):
        return []
    return _producer_problems(model) + _tie_problems(model, set(fp8)) + _matching_problems(model, fp8, floats)


def check_saveable(model: nn.Module) -> None:
    """Raise ``ValueError`` listing every reason a checkpoint of ``model`` would not load back as this model."""
    problems = save_problems(model)
    if problems:
        raise ValueError(f"cannot save this {type(model).__name__} as a block-FP8 checkpoint: "
                         + "; ".join(problems))


@functools.cache
def _save_guard_class() -> type | None:
    """transformers' FP8 quantizer with the save check added, or None where this transformers has no such class."""
    try:
        from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer
    except ImportError:
        return None

    class BlockFp8SaveGuard(FineGrainedFP8HfQuantizer):
        """What ``from_pretrained`` attaches to an FP8 model, plus: before ``save_pretrained`` creates the output
        folder, check that the checkpoint will load back; before it writes the config, describe the layers as
        they are now."""

        # The model this guard is attached to (a weak reference: a strong one would make a cycle that keeps a
        # deleted model's memory until the garbage collector runs).
        _model: weakref.ref | None = None

        def is_serializable(self, *args, **kwargs):
            # save_pretrained asks this before it creates save_directory; the quantizer is not given the model,
            # hence the reference. Refusing here leaves no folder behind.
            model = self._model() if self._model is not None else None
            if model is not None:
                check_saveable(model)
            return super().is_serializable(*args, **kwargs)

        def get_state_dict_and_metadata(self, model, *args, **kwargs):
            # Checked again: the model may have changed since is_serializable, or this guard may have lost its
            # reference (a guard pickled on its own, without its model).
            self._model = weakref.ref(model)
            check_saveable(model)
            model.config.quantization_config = quantization_config_of(model)
            self.quantization_config = _transformers_config(model.config.quantization_config)
            return super().get_state_dict_and_metadata(model, *args, **kwargs)

        def __reduce__(self):
            # The class is made at run time (transformers is optional), so pickles name the factory instead. The
            # model goes along; pickled as part of that model, it is a back-reference, so the unpickled guard
            # checks the unpickled model.
            return _make_save_guard, (self.quantization_config.to_dict(), self._model() if self._model else None)

        def __deepcopy__(self, memo):
            # copy.deepcopy(model) copies the model before its attributes: the copy's guard checks the copy.
            model = self._model() if self._model is not None else None
            return _make_save_guard(self.quantization_config.to_dict(), None if model is None else memo.get(id(model)))

    return BlockFp8SaveGuard


def _transformers_config(config: dict):
    from transformers import FineGrainedFP8Config

    return FineGrainedFP8Config.from_dict(dict(config))


def _make_save_guard(config: dict, model: nn.Module | None = None):
    guard = _save_guard_class()(_transformers_config(config), pre_quantized=True)
    if model is not None:
        guard._model = weakref.ref(model)
    return guard


def mark_fp8_model(model: nn.Module) -> None:
    """Make a transformers model holding block-FP8 layers say so in its config, and check its saves (see the
    module docstring). Anything else, or a model without block-FP8 layers, is left alone."""
    if not is_transformers_model(model) or not fp8_layout(model)[0]:
        return
    model.config.quantization_config = quantization_config_of(model)
    if _save_guard_class() is not None:
        model.hf_quantizer = _make_save_guard(model.config.quantization_config, model)
