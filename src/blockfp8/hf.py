"""Hugging Face transformers models on blockfp8: ``quantize`` a loaded model in place, ``from_pretrained`` a
folder (or Hub model id) into a ready model.

Both leave the model's config saying block FP8 (``hf_config``), so ``save_pretrained`` writes a checkpoint that
transformers and blockfp8 both load. transformers is imported only inside these functions: ``import blockfp8``
works without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CONFIG_NAME, INDEX_NAME, load_fp8_model, read_quantization_config, read_tensor_infos
from .dispatch import check_backend_name
from .format import BLOCK, DEFAULT_BLOCK, FP8_DTYPE
from .hf_config import mark_fp8_model, transformers_module
from .nn import ConversionReport, Fp8BlockLinear, convert_model
from .validate import check_device, check_out_dtype

# What a Hub download fetches for ``from_pretrained``: configs and safetensors weights, nothing else.
_HUB_PATTERNS = ["*.json", "*.safetensors"]


def import_transformers():
    """The transformers module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("blockfp8.hf needs transformers: pip install 'blockfp8[hf]'") from e
    return transformers


def _transformers_fp8_linear() -> type | None:
    """transformers' ``FP8Linear`` class, if transformers is imported and has one."""
    if transformers_module() is None:
        return None
    try:
        from transformers.integrations.finegrained_fp8 import FP8Linear
    except ImportError:
        return None
    return FP8Linear


def _from_transformers_fp8(layer: nn.Module, backend: str | None, name: str) -> Fp8BlockLinear:
    """An ``Fp8BlockLinear`` on the very tensors of a transformers ``FP8Linear`` (no copy of the fp8 weight)."""
    block = tuple(layer.block_size) if layer.block_size is not None else None
    if block != DEFAULT_BLOCK:
        raise ValueError(f"{name}: transformers' FP8Linear has block_size {layer.block_size}; Fp8BlockLinear runs "
                         f"{list(DEFAULT_BLOCK)} weight blocks")
    if layer.activation_scheme != "dynamic":
        raise ValueError(f"{name}: transformers' FP8Linear has activation_scheme {layer.activation_scheme!r} (one "
                         "static activation scale); blockfp8 quantizes activations per token ('dynamic')")
    scale = layer.weight_scale_inv.data
    # ue8m0 checkpoints store powers of two in one byte: exact in fp32, and the scales are 1/16384 of the weight.
    scale = scale if scale.dtype == torch.float32 else scale.float()
    bias = layer.bias.data if layer.bias is not None else None
    return Fp8BlockLinear.from_fp8(layer.weight.data, scale, bias, backend, name=f"{name}.weight")


def _swap_transformers_fp8(model: nn.Module, backend: str | None) -> list[str]:
    """Replace every transformers ``FP8Linear`` holding fp8 weights by an ``Fp8BlockLinear`` on its tensors."""
    fp8_linear = _transformers_fp8_linear()
    if fp8_linear is None:
        return []
    swapped: list[str] = []
    done: dict[int, Fp8BlockLinear] = {}  # a layer shared by several parents stays shared
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            # Exactly FP8Linear: its subclasses (grouped linears) compute something else.
            if type(child) is not fp8_linear or child.weight.dtype != FP8_DTYPE:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) not in done:
                done[id(child)] = _from_transformers_fp8(child, backend, full)
            setattr(parent, child_name, done[id(child)])
            swapped.append(full)
    return swapped


def quantize(model: nn.Module, skip: Iterable[str] | None = None, backend: str | None = None) -> ConversionReport:
    """Run a transformers model's linear layers on blockfp8, in place; ``model.generate()`` then uses them.

    - transformers' ``FP8Linear`` layers (a model loaded from a block-FP8 checkpoint through transformers' own FP8
      path, ``FineGrainedFP8Config``) become ``Fp8BlockLinear`` layers on the same fp8 ``weight`` and
      ``weight_scale_inv`` tensors: nothing is copied.
    - float ``nn.Linear`` layers are quantized as ``convert_model`` does, with ``skip`` as its glob patterns.
      ``skip=None``: a model that already holds block-FP8 layers keeps the float ones its checkpoint kept;
      a float model gets ``convert_model``'s default skips.

    ``backend`` forces every new layer's GEMM backend (None: the dispatcher chooses). Afterwards the config says
    block FP8, so ``save_pretrained`` writes a checkpoint that transformers and blockfp8 both load. Returns the
    ``ConversionReport`` (swapped and quantized layers, and the float layers kept with the reason).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (an nn.Module), got {type(model).__name__}")
    check_backend_name(backend)
    swapped = _swap_transformers_fp8(model, backend)
    already_fp8 = bool(swapped) or any(isinstance(m, Fp8BlockLinear) for m in model.modules())
    if skip is None and already_fp8:
        kept = "the model already holds block-FP8 layers: its float ones stay (pass skip to quantize them)"
        report = ConversionReport(skipped={name: kept for name, m in model.named_modules() if type(m) is nn.Linear})
    else:
        report = convert_model(model, backend=backend, **({} if skip is None else {"skip": skip}))
    report.converted[:0] = swapped
    mark_fp8_model(model)
    return report


# Decoder layers whose RMSNorms compute x * rsqrt(mean(x^2) + eps) * weight, whose MLP is down(act(gate(x)) * up(x))
# and whose attention reads its input only through its shape and the q/k/v projections (transformers 5): the fused
# producers compute the same (quant.rms_norm, quant.silu_mul; docs/fused.md).
FUSABLE_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def _silu(act: object) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _norm_and_qkv(norm: nn.Module, attn: nn.Module, stack_qkv: bool) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The input norm, and with ``stack_qkv`` the q/k/v projections stacked behind it where their fp8 rows allow
    (q and k end on whole 128-row blocks): the norm module then runs the stacked GEMM and the projections become
    slices of it."""
    from .modules import Fp8NormProjections, Fp8RMSNorm, ProjectionSlice, stack_linears

    fp8_norm = Fp8RMSNorm.from_norm(norm)
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    if (not stack_qkv or q.out_features % BLOCK or k.out_features % BLOCK
            or len({q.backend, k.backend, v.backend}) > 1):
        return fp8_norm, {}
    stacked = stack_linears((q, k, v), ("q_proj", "k_proj", "v_proj"), q.backend, "qkv_proj")
    ends = (q.out_features, q.out_features + k.out_features, stacked.out_features)
    slices = {"q_proj": ProjectionSlice(stacked, 0, ends[0]), "k_proj": ProjectionSlice(stacked, ends[0], ends[1]),
              "v_proj": ProjectionSlice(stacked, ends[1], ends[2])}
    return Fp8NormProjections(fp8_norm, stacked), slices


def fuse_producers(model: nn.Module, stack_qkv: bool = True) -> list[str]:
    """Run a quantized transformers decoder's norms and MLPs on blockfp8's fused producers, in place: in every
    decoder layer of ``FUSABLE_LAYERS`` whose projections are all ``Fp8BlockLinear`` (after ``quantize``) and whose
    MLP activation is SiLU, both RMSNorms run as ``Fp8RMSNorm`` (the norm writes the fp8 input of q/k/v, and of
    gate/up, in one kernel, shared by the projections it feeds) and the MLP becomes ``Fp8GatedMLP`` (gate and up
    stacked into one GEMM, the SiLU-mul writing down_proj's fp8 input), which runs the post-attention norm itself
    (``post_attention_layernorm`` becomes an identity), so that an eager call replays norm, GEMMs and SiLU-mul
    from one CUDA graph. With ``stack_qkv`` (the default), q, k and v are stacked into one GEMM too, where q's and
    k's rows end on whole 128-row blocks: the input norm becomes an ``Fp8NormProjections`` that runs it, and the
    attention's q/k/v projections ``ProjectionSlice`` views of its output. Per decoder layer at decode, six
    separate activation quantizers and two float kernels give way to three producers, and seven GEMMs to four.
    Inference only (no autograd formula); the norm rounds once in fp32 where transformers rounds twice (at most an
    ulp of the dtype). A fused model is not saved as a checkpoint (``save_pretrained`` refuses it): save before
    fusing. A layer whose MLP rows do not fill whole 128-row blocks stays as it is. Returns the fused layers'
    names; ``ValueError`` when no layer qualifies (the model is then unchanged)."""
    from .modules import Fp8GatedMLP, Fp8RMSNorm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (an nn.Module), got {type(model).__name__}")
    built, seen = [], 0
    for name, layer in model.named_modules():
        if type(layer).__name__ not in FUSABLE_LAYERS:
            continue
        seen += 1
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        projections = [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj")]
        projections += [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        # fp8 gate and up weights stack along whole 128-row blocks only.
        if (not all(isinstance(p, Fp8BlockLinear) for p in projections) or not _silu(getattr(mlp, "act_fn", None))
                or mlp.gate_proj.out_features % BLOCK):
            continue
        norm_in, slices = _norm_and_qkv(layer.input_layernorm, attn, stack_qkv)
        # The MLP runs its own input norm (an eager call is then one graph of norm, GEMMs and SiLU-mul); the norm
        # module the decoder calls before it passes its input through.
        built.append((name, layer, attn, norm_in, slices, nn.Identity(),
                      Fp8GatedMLP.from_projections(mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                                                   norm=Fp8RMSNorm.from_norm(layer.post_attention_layernorm))))
    if not built:
        why = (f"none of its {seen} decoder layer(s) has every projection in block FP8 (run hf.quantize first), a "
               "SiLU MLP and an intermediate size that is a multiple of 128") if seen else \
            f"it has no decoder layer of {', '.join(FUSABLE_LAYERS)}"
        raise ValueError(f"fuse_producers found nothing to fuse in this {type(model).__name__}: {why}")
    # Only now is the model touched: every new module was built without error.
    for _, layer, attn, norm_in, slices, norm_post, mlp in built:
        layer.input_layernorm, layer.post_attention_layernorm, layer.mlp = norm_in, norm_post, mlp
        for proj, piece in slices.items():
            setattr(attn, proj, piece)
    return [name for name, *_ in built]


def _checkpoint_folder(path_or_dir: str | Path) -> Path:
    """A local folder as it is; anything else is taken for a Hub model id and fetched (configs and safetensors)."""
    path = Path(path_or_dir)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"path_or_dir must be a checkpoint folder or a Hub model id, got the file {path}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_dir), allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - the hub client raises many types; one message says what was tried
        raise FileNotFoundError(f"path_or_dir {str(path_or_dir)!r} is not a folder, and fetching it as a Hub model "
                                f"id failed: {type(e).__name__}: {e}") from e


def _model_class(transformers, config, root: Path) -> type:
    """The class config.json names in ``architectures``, else the causal-LM class of its model type, else the
    base model class."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    for mapping in (transformers.MODEL_FOR_CAUSAL_LM_MAPPING, transformers.MODEL_MAPPING):
        if type(config) in mapping:
            return mapping[type(config)]
    raise ValueError(f"{root / CONFIG_NAME}: transformers has no model class for architectures "
                     f"{getattr(config, 'architectures', None)} or model_type {config.model_type!r}")


def _quant_method(config) -> str | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return str(qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None))


def _empty_model(cls: type, config, dtype: torch.dtype) -> nn.Module:
    """``cls`` built from ``config`` with its parameters on the meta device (no memory) and its buffers real:
    no checkpoint holds non-persistent buffers such as rotary tables, so the model's own code must make them."""
    try:
        from accelerate import init_empty_weights
    except ImportError as e:
        raise ImportError("blockfp8.from_pretrained needs accelerate for block-FP8 checkpoints: "
                          "pip install 'blockfp8[hf]'") from e
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    # Inside that context every parameter assignment makes a new meta tensor, which unties tied weights.
    model.tie_weights()
    return model


def _check_float_checkpoint(root: Path) -> None:
    """A checkpoint whose config.json has no quantization_config must hold no fp8 tensor: transformers would load
    fp8 values as float weights and drop their ``*_scale_inv`` tensors (thousands of times off, with only a list of
    unexpected keys to show for it). Reads the safetensors headers only, which also names a corrupt file."""
    if not (root / INDEX_NAME).is_file() and not any(root.glob("*.safetensors")):
        return  # a .bin checkpoint: transformers reads it and reports its own errors
    fp8 = [name for name, info in read_tensor_infos(root).items() if info.dtype.startswith("F8")]
    if fp8:
        raise ValueError(
            f"{root / CONFIG_NAME} has no quantization_config, but the checkpoint holds {len(fp8)} fp8 tensor(s) "
            f"(first: {fp8[0]!r}), whose values would load without their scales; add a block-FP8 quantization_config "
            '(e.g. {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", '
            '"weight_block_size": [128, 128]}) to config.json')


def from_pretrained(path_or_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str | None = None, backend: str | None = None,
                    skip: Iterable[str] | None = None, *, progress: bool = True) -> nn.Module:
    """A transformers model from a checkpoint folder (or Hub model id), its linear layers on blockfp8, in eval mode.

    The class is the one config.json names in ``architectures`` (else the causal-LM or base model of its type).
    A block-FP8 checkpoint (``quantization_config.quant_method`` "fp8") goes straight into ``Fp8BlockLinear``
    layers through ``load_fp8_model`` on a model whose parameters were never allocated, so no float copy of an
    fp8 weight ever exists; its other tensors take ``dtype``. Any other checkpoint is loaded by transformers in
    ``dtype`` and quantized by ``quantize`` (``skip``, ``backend`` as there). ``device`` moves the model at the
    end (None: it stays on the CPU, as with transformers). ``progress`` shows the block-FP8 load on stderr.
    """
    check_out_dtype(dtype, "dtype")
    check_backend_name(backend)
    check_device(device)
    transformers = import_transformers()
    root = _checkpoint_folder(path_or_dir)
    config = transformers.AutoConfig.from_pretrained(root)
    cls = _model_class(transformers, config, root)
    method = _quant_method(config)
    if method == "fp8":
        read_quantization_config(root)  # the block size, fmt and scale format blockfp8 runs, before building
        model = _empty_model(cls, config, dtype)
        load_fp8_model(model, root, progress=progress, backend=backend)
        if model.can_generate() and (root / "generation_config.json").is_file():
            model.generation_config = transformers.GenerationConfig.from_pretrained(root)
    elif method is None:
        _check_float_checkpoint(root)
        model = cls.from_pretrained(root, dtype=dtype)
    else:
        raise ValueError(f"{root / CONFIG_NAME} has quantization_config.quant_method {method!r}; "
                         "blockfp8.from_pretrained reads float checkpoints or block-FP8 ones ('fp8')")
    quantize(model, skip=skip, backend=backend)
    if device is not None:
        model.to(device)
    return model.eval()
