"""Converting a bf16/fp16/fp32 safetensors checkpoint into a block-FP8 one: ``convert_checkpoint``."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..format import DEFAULT_BLOCK, FLOAT_DTYPES
from ..nn import DEFAULT_SKIP, check_skip_argument, check_skip_patterns, matches_pattern, short_names
from ..quant import dequantize_weight, quantize_weight
from ..reference import rel_error
from ..validate import check_finite_values, check_scale_values
from .files import (
    CONFIG_NAME,
    INDEX_NAME,
    SCALE_SUFFIX,
    WEIGHT_SUFFIX,
    Fp8QuantConfig,
    TensorInfo,
    iter_tensors,
    json_type,
    prefix_of,
    read_config,
    read_tensor_infos,
    write_config,
)
from .writing import DEFAULT_MAX_SHARD_BYTES, ShardWriter, atomic_output_dir, parse_size

# Files of other weight formats are not copied next to a converted checkpoint: they would hold the unquantized model
# (PyTorch, TensorFlow/Keras, Flax, GGUF, NumPy, ONNX and its external data, rust-bert, TF Lite).
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".keras", ".msgpack", ".gguf", ".npz",
                         ".onnx", ".onnx_data", ".ot", ".tflite")


@dataclass(repr=False)
class ConvertSummary:
    """What ``convert_checkpoint`` did: layers converted (with their quantization error) and skipped (why).

    ``repr`` is short (counts and a few names); ``str`` (``print(summary)``) lists everything.
    """

    out_dir: Path
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    copied: int = 0
    errors: dict[str, float] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    shards: int = 0
    files_copied: list[str] = field(default_factory=list)
    # Weight files in subfolders (a sentence-transformers ``2_Dense/model.safetensors``): copied as they are, since
    # their loader is not the model's and reads float weights.
    weights_copied: list[str] = field(default_factory=list)
    # Files of the input not written to the output, with why (weight files that are not the checkpoint's own nor a
    # module folder's, links that would loop).
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def worst(self) -> tuple[str, float] | None:
        """The converted layer with the largest relative quantization error, and that error (a NaN error counts
        as the largest: ``max`` alone never picks a NaN)."""
        if not self.errors:
            return None
        name = max(self.errors, key=lambda k: (math.isnan(self.errors[k]), self.errors[k]))
        return name, self.errors[name]

    def __str__(self) -> str:
        lines = [f"{self.out_dir}: converted {len(self.converted)} layer(s) to fp8, kept {len(self.skipped)} "
                 f"weight(s) as they were, copied {self.copied} other tensor(s); tensor bytes {self.bytes_before} "
                 f"-> {self.bytes_after} in {self.shards} safetensors file(s)"]
        if self.worst is not None:
            lines.append(f"  worst relative error {self.worst[1]:.4f} ({self.worst[0]})")
        lines += [f"  converted {name} (relative error {self.errors.get(name, math.nan):.4f})"
                  for name in self.converted]
        lines += [f"  kept {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  copied {name}" + (" (weights, unconverted)" if name in self.weights_copied else "")
                  for name in self.files_copied]
        lines += [f"  left out {name}: {why}" for name, why in self.left_out.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        # A real checkpoint has hundreds of layer names: the full lists would flood a notebook cell.
        return (f"ConvertSummary(out_dir: {str(self.out_dir)!r}, converted: {short_names(self.converted)}, "
                f"skipped: {short_names(self.skipped)}, tensors copied: {self.copied}, shards: {self.shards}, "
                f"files copied: {len(self.files_copied)}, left out: {len(self.left_out)}; print(summary) lists "
                "every name)")


def _not_a_layer(info: TensorInfo) -> str | None:
    """Why a tensor is no linear layer's weight (never quantized, whatever the patterns), or None."""
    if not info.name.endswith(WEIGHT_SUFFIX):
        return "not a .weight"
    if len(info.shape) != 2:
        return f"{len(info.shape)}-D, not a linear layer"
    if info.torch_dtype not in FLOAT_DTYPES:
        return f"dtype {info.dtype}"
    return None


def skip_reason(info: TensorInfo, skip: Iterable[str] = (), default_skip: bool = True) -> str | None:
    """Why ``convert_checkpoint`` keeps a tensor as it is, or None when it quantizes it.

    Quantized: 2-D float ``*.weight`` tensors of layers matching neither ``DEFAULT_SKIP`` (unless
    ``default_skip`` is False) nor ``skip`` (patterns as ``convert_model`` matches them, ``nn.PATTERN_RULE``: a
    pattern naming a parent module skips every layer under it). Everything else is copied unchanged.
    """
    reason = _not_a_layer(info)
    if reason is not None:
        return reason
    prefix = prefix_of(info.name)
    pat = matches_pattern(prefix, DEFAULT_SKIP) if default_skip else None
    if pat is not None:
        return f"default skip {pat!r}"
    pat = matches_pattern(prefix, check_skip_argument(skip))
    if pat is not None:
        return f"--skip {pat!r}"
    return None


def _module_dirs(in_dir: Path) -> set[str]:
    """The module folders a sentence-transformers model lists in its ``modules.json`` (empty when there is none or
    it cannot be read: then no subfolder counts as a module)."""
    try:
        modules = json.loads((in_dir / "modules.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return set()
    if not isinstance(modules, list):
        return set()
    # The model itself is the module at path "": only subfolders are module folders here.
    return {m["path"].strip("/") for m in modules if isinstance(m, dict) and isinstance(m.get("path"), str)} - {""}


def _allowed_roots(in_dir: Path) -> list[Path]:
    """Where a link inside ``in_dir`` may point: into ``in_dir`` itself, and, for a Hugging Face cache snapshot
    (``models--ORG--NAME/snapshots/HASH``), into its repository's ``blobs/``, where the hub keeps every file the
    snapshot links to."""
    roots = [in_dir.resolve()]
    if in_dir.parent.name == "snapshots":
        roots.append((in_dir.parent.parent / "blobs").resolve())
    return roots


def _check_link(path: Path, in_dir: Path, roots: list[Path]) -> None:
    """Refuse a link that leads out of the model folder: its target would be copied into a folder the user may
    publish (a cloned repository can carry such a link)."""
    target = path.resolve()
    if not any(target == r or target.is_relative_to(r) for r in roots):
        raise ValueError(f"{path} is a link to {target}, outside {in_dir}: convert copies only the model folder's "
                         f"own files; copy the file into the folder or remove the link")


def _side_files(in_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """Every file (and empty folder) of ``in_dir``'s tree that is copied next to a converted checkpoint, and the
    weight files left out, with why.

    Subfolders count: a sentence-transformers model keeps its pooling, normalization and dense modules there
    (``1_Pooling/``, ``2_Normalize/`` which may be empty, ``2_Dense/model.safetensors``). Weight files of a module
    folder its ``modules.json`` lists are copied unconverted: that module's own loader reads them, in float.
    Left out: the top-level config.json and index (rewritten), other weight files (``_WEIGHT_FILE_SUFFIXES``: the
    model's weights in another format or export, ``onnx/``, ``tf/``; the converted safetensors replace them)
    and hidden folders (``.git`` holds every weight file the repository ever had, ``.cache`` a download's
    bookkeeping). Links to what is copied are followed while they stay inside the folder (or, for a Hugging Face
    cache snapshot, its blobs); one leading anywhere else is refused (``_check_link``). The checkpoint's own weight
    files are read, not copied, and may link anywhere.
    """
    modules = _module_dirs(in_dir)
    roots = _allowed_roots(in_dir)
    paths, left_out = [], {}
    for root, dirs, names in os.walk(in_dir, followlinks=True):
        for d in list(dirs):
            link = Path(root) / d
            if link.is_symlink():
                _check_link(link, in_dir, roots)
                if Path(root).resolve().is_relative_to(link.resolve()):  # a folder containing the link: a loop
                    dirs.remove(d)
                    left_out[link.relative_to(in_dir).as_posix()] = "a link to a folder that contains it: not followed"
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [Path(root) / d for d in dirs if not any((Path(root) / d).iterdir())]  # others come with their files
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(in_dir).as_posix()
            if not path.is_file() or rel in (CONFIG_NAME, INDEX_NAME):
                continue
            folder = rel.split("/", 1)[0] if "/" in rel else ""
            if path.suffix not in _WEIGHT_FILE_SUFFIXES or (folder and folder in modules):
                if path.is_symlink():  # copied: its target must be the folder's own (weights read may live anywhere)
                    _check_link(path, in_dir, roots)
                paths.append(path)
            elif folder:
                left_out[rel] = ("weights of another format or export (not a module folder of modules.json): "
                                 "not converted, not copied")
            elif path.suffix != ".safetensors":
                left_out[rel] = "weights in another format: the converted safetensors replace them"
    return paths, left_out


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


def _check_input_config(config: dict, path: Path) -> None:
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc:
        raise ValueError(f"{path} already has a quantization_config (quant_method {qc.get('quant_method')!r}); "
                         f"convert reads bf16, fp16 or fp32 checkpoints")
    if qc not in (None, {}):
        raise ValueError(f"quantization_config in {path} must be an object (or absent in a float checkpoint), got "
                         f"{json_type(qc)} {qc!r:.80}")


def convert_checkpoint(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    skip: Iterable[str] = (),
    ue8m0: bool = False,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    overwrite: bool = False,
    default_skip: bool = True,
) -> ConvertSummary:
    """Convert a bf16/fp16/fp32 safetensors checkpoint (single file or sharded) into a block-FP8 checkpoint.

    Streams tensor by tensor: each 2-D float ``*.weight`` not skipped (see ``skip_reason``) is quantized to
    fp8 with 128x128 fp32 block scales (``ue8m0``: scales rounded up to powers of two, still stored as fp32);
    every other tensor is copied unchanged. A weight to quantize that holds NaN or Inf is refused, naming it; so
    is a pattern of ``skip`` that matches no 2-D float weight, before anything is written.
    config.json gets ``quantization_config`` with the skipped 2-D weights' layers as ``modules_to_not_convert``;
    every other non-weight file (tokenizer, generation config, subfolders such as sentence-transformers'
    ``1_Pooling/``) is copied with its mode (``_side_files``). Writes into a temporary folder renamed to
    ``out_dir`` at the end; ``out_dir`` may not be, contain or lie inside ``in_dir`` or any file read (symlinks
    resolved), so the input is never modified or deleted.
    """
    src, dst = Path(in_dir), Path(out_dir)
    skip = check_skip_argument(skip)
    max_bytes = parse_size(max_shard_bytes)
    infos = read_tensor_infos(src)
    for name, info in infos.items():
        if name.endswith(SCALE_SUFFIX) or info.dtype == "F8_E4M3":
            raise ValueError(f"{src} already holds fp8 tensors ({name!r} in {info.file.name}); convert reads "
                             f"bf16, fp16 or fp32 checkpoints")
    layers = [prefix_of(name) for name, info in infos.items() if _not_a_layer(info) is None]
    others = sorted({prefix_of(name) for name in infos} - set(layers))
    check_skip_patterns(skip, layers, f"2-D float weight of {src}", others=others)
    config_path = src / CONFIG_NAME
    config = read_config(src)
    _check_input_config(config, config_path)
    side_files, left_out = _side_files(src)
    read = {info.file.name for info in infos.values()}
    left_out.update({p.name: "a safetensors file the checkpoint's index does not name"
                     for p in sorted(src.glob("*.safetensors")) if p.name not in read})
    # Everything read is protected: a weight file may be a symlink into a cache folder elsewhere.
    inputs = [src, config_path, src / INDEX_NAME, *{info.file for info in infos.values()}, *side_files]
    summary = ConvertSummary(out_dir=dst, left_out=left_out)
    with atomic_output_dir(dst, overwrite, inputs) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        for info, tensor in iter_tensors(infos, progress, f"converting {src.name}"):
            summary.bytes_before += info.nbytes
            reason = skip_reason(info, skip, default_skip)
            if reason is not None:
                if info.name.endswith(WEIGHT_SUFFIX):
                    summary.skipped[prefix_of(info.name)] = reason
                else:
                    summary.copied += 1
                writer.add({info.name: tensor})
                continue
            prefix = prefix_of(info.name)
            w_fp8, scale = quantize_weight(tensor, DEFAULT_BLOCK, ue8m0)
            # A block's scale is non-finite exactly when the block holds a NaN or Inf (its amax): only then
            # is the whole weight read again, to name the element.
            if not bool(torch.isfinite(scale).all()):
                try:
                    check_finite_values(tensor, f"tensor {info.name!r} in {info.file}")
                except ValueError as e:
                    raise ValueError(f"{e} Quantizing it would write NaN/Inf scales: fix the checkpoint or keep the "
                                     f"layer in float (skip {prefix!r}).") from e
            check_scale_values(scale, f"{prefix + SCALE_SUFFIX!r} (quantized from {info.name!r} in {info.file})")
            summary.errors[prefix] = rel_error(dequantize_weight(w_fp8, scale), tensor.float())
            summary.converted.append(prefix)
            writer.add({info.name: w_fp8, prefix + SCALE_SUFFIX: scale})
        summary.shards = writer.close()
        summary.bytes_after = writer.total_bytes
        not_converted = [p for p, r in summary.skipped.items() if len(infos[p + WEIGHT_SUFFIX].shape) == 2]
        write_config(tmp, config, Fp8QuantConfig(modules_to_not_convert=tuple(not_converted)))
        summary.files_copied = _copy_side_files(src, side_files, tmp)
        summary.weights_copied = [f for f in summary.files_copied if Path(f).suffix in _WEIGHT_FILE_SUFFIXES]
    return summary
