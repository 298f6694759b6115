"""Converting a bf16/fp16/fp32 safetensors checkpoint into a block-FP8 one: ``convert_checkpoint``."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..format import DEFAULT_BLOCK, FLOAT_DTYPES
from ..nn import matches_pattern
from ..quant import dequantize_weight, quantize_weight
from ..reference import rel_error
from .files import (
    CONFIG_NAME,
    INDEX_NAME,
    SCALE_SUFFIX,
    WEIGHT_SUFFIX,
    Fp8QuantConfig,
    TensorInfo,
    iter_tensors,
    prefix_of,
    read_tensor_infos,
    write_config,
)
from .writing import DEFAULT_MAX_SHARD_BYTES, ShardWriter, atomic_output_dir, parse_size

# Tensors ``convert_checkpoint`` keeps in their original dtype unless told otherwise, as glob patterns on the
# layer name or its last component: embeddings and norms are not matmuls, lm_head and MoE routers ("gate",
# not "gate_proj") are small but sensitive to quantization error.
DEFAULT_SKIP = ("*embed*", "*norm*", "lm_head", "gate")
# Files of other weight formats are not copied next to a converted checkpoint: they would hold the unquantized model
# (PyTorch, TensorFlow/Keras, Flax, GGUF, NumPy, ONNX and its external data, rust-bert, TF Lite).
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".keras", ".msgpack", ".gguf", ".npz",
                         ".onnx", ".onnx_data", ".ot", ".tflite")


@dataclass
class ConvertSummary:
    """What ``convert_checkpoint`` did: layers converted (with their quantization error) and skipped (why)."""

    out_dir: Path
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    copied: int = 0
    errors: dict[str, float] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    shards: int = 0
    files_copied: list[str] = field(default_factory=list)

    @property
    def worst(self) -> tuple[str, float] | None:
        """The converted layer with the largest relative quantization error, and that error."""
        if not self.errors:
            return None
        name = max(self.errors, key=self.errors.__getitem__)
        return name, self.errors[name]


def skip_reason(info: TensorInfo, skip: Iterable[str] = ()) -> str | None:
    """Why ``convert_checkpoint`` keeps a tensor as it is, or None when it quantizes it.

    Quantized: 2-D float ``*.weight`` tensors of layers matching neither ``DEFAULT_SKIP`` nor ``skip`` (glob
    patterns on the layer name or its last component). Everything else is copied unchanged.
    """
    if not info.name.endswith(WEIGHT_SUFFIX):
        return "not a .weight"
    if len(info.shape) != 2:
        return f"{len(info.shape)}-D, not a linear layer"
    if info.torch_dtype not in FLOAT_DTYPES:
        return f"dtype {info.dtype}"
    prefix = prefix_of(info.name)
    pat = matches_pattern(prefix, DEFAULT_SKIP)
    if pat is not None:
        return f"default skip {pat!r}"
    pat = matches_pattern(prefix, tuple(skip))
    if pat is not None:
        return f"--skip {pat!r}"
    return None


def _side_files(in_dir: Path) -> list[Path]:
    """Every file (and empty folder) of ``in_dir``'s tree that is copied next to a converted checkpoint.

    Subfolders count: a sentence-transformers model keeps its pooling and normalization in ``1_Pooling/``,
    ``2_Normalize/`` (which may be empty). Left out: the top-level config.json and index (rewritten), weight files
    of any format (``_WEIGHT_FILE_SUFFIXES``) and hidden folders (``.git`` holds every weight file the repository
    ever had, ``.cache`` a download's bookkeeping).
    """
    paths = []
    for root, dirs, names in os.walk(in_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [Path(root) / d for d in dirs if not any((Path(root) / d).iterdir())]  # others come with their files
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(in_dir).as_posix()
            if path.is_file() and rel not in (CONFIG_NAME, INDEX_NAME) and path.suffix not in _WEIGHT_FILE_SUFFIXES:
                paths.append(path)
    return paths


def _copy_side_files(in_dir: Path, paths: list[Path], out_dir: Path) -> list[str]:
    """Recreate ``paths`` (from ``_side_files``) under ``out_dir``: folders made, files copied with their modes
    (links followed: a Hugging Face cache snapshot links every file to its blob). Returns the files' relative
    paths."""
    copied = []
    for path in paths:
        target = out_dir / path.relative_to(in_dir)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(path.relative_to(in_dir).as_posix())
    return copied


def convert_checkpoint(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    skip: Iterable[str] = (),
    ue8m0: bool = False,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    overwrite: bool = False,
) -> ConvertSummary:
    """Convert a bf16/fp16/fp32 safetensors checkpoint (single file or sharded) into a block-FP8 checkpoint.

    Streams tensor by tensor: each 2-D float ``*.weight`` not skipped (see ``skip_reason``) is quantized to
    fp8 with 128x128 fp32 block scales (``ue8m0``: scales rounded up to powers of two, still stored as fp32);
    every other tensor is copied unchanged. config.json gets ``quantization_config`` with the skipped 2-D
    weights' layers as ``modules_to_not_convert``; every other non-weight file (tokenizer, generation config,
    subfolders such as sentence-transformers' ``1_Pooling/``) is copied with its mode (``_side_files``).
    Writes into a temporary folder renamed to ``out_dir`` at the end.
    """
    src, dst = Path(in_dir), Path(out_dir)
    if src.resolve() == dst.resolve():
        raise ValueError(f"out_dir must differ from in_dir, got {dst} for both")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    max_bytes = parse_size(max_shard_bytes)
    infos = read_tensor_infos(src)
    for name, info in infos.items():
        if name.endswith(SCALE_SUFFIX) or info.dtype == "F8_E4M3":
            raise ValueError(f"{src} already holds fp8 tensors ({name!r} in {info.file.name}); convert reads "
                             f"bf16, fp16 or fp32 checkpoints")
    config_path = src / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise ValueError(f"{config_path} already has a quantization_config (quant_method {method!r}); convert "
                         f"reads bf16, fp16 or fp32 checkpoints")
    side_files = _side_files(src)
    summary = ConvertSummary(out_dir=dst)
    with atomic_output_dir(dst, overwrite) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        for info, tensor in iter_tensors(infos, progress, f"converting {src.name}"):
            summary.bytes_before += info.nbytes
            reason = skip_reason(info, skip)
            if reason is not None:
                if info.name.endswith(WEIGHT_SUFFIX):
                    summary.skipped[prefix_of(info.name)] = reason
                else:
                    summary.copied += 1
                writer.add({info.name: tensor})
                continue
            prefix = prefix_of(info.name)
            w_fp8, scale = quantize_weight(tensor, DEFAULT_BLOCK, ue8m0)
            summary.errors[prefix] = rel_error(dequantize_weight(w_fp8, scale), tensor.float())
            summary.converted.append(prefix)
            writer.add({info.name: w_fp8, prefix + SCALE_SUFFIX: scale})
        summary.shards = writer.close()
        summary.bytes_after = writer.total_bytes
        not_converted = [p for p, r in summary.skipped.items() if len(infos[p + WEIGHT_SUFFIX].shape) == 2]
        write_config(tmp, config, Fp8QuantConfig(modules_to_not_convert=tuple(not_converted)))
        summary.files_copied = _copy_side_files(src, side_files, tmp)
    return summary
