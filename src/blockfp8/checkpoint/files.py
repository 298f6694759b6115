"""Block-FP8 checkpoint files: names, safetensors headers, streamed reading, config.json's quantization_config,
and the header-only checks of fp8 weight / scale pairs."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..format import DEFAULT_BLOCK, Fp8QuantConfig
from ..validate import check_block_size

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SCALE_SUFFIX = ".weight_scale_inv"
WEIGHT_SUFFIX = ".weight"

# safetensors dtype codes -> torch dtypes (header-only scans report dtypes as these codes).
_ST_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


# ----------------------------------------------------------------------------------------------- reading


def _safetensor_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


def _corrupt(path: Path, err: Exception, key: str | None = None) -> ValueError:
    what = f"tensor {key!r} in " if key else ""
    return ValueError(f"cannot read {what}safetensors file {path}: {err} (truncated or corrupt file?)")


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def json_type(value: object) -> str:
    """How JSON names the type of a parsed value: "an object", "an array", "a string", ..."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming the file when it is not valid JSON or not an object
    (``what`` says what the object should be, e.g. "the model config")."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({what}), got {json_type(data)}")
    return data


def _index_entries(index: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file, checked: a non-empty object of tensor name -> relative file name."""
    entries = read_json_object(index, "with a 'weight_map'").get("weight_map")
    if not isinstance(entries, dict):
        raise ValueError(f"'weight_map' in {index} must be an object (tensor name -> file name), got "
                         f"{json_type(entries)}")
    if not entries:
        raise ValueError(f"'weight_map' in {index} is empty: the index lists no tensor")
    for name, fname in entries.items():
        # A name leaving the folder would read (and ``convert`` would treat as input) a file elsewhere.
        parts = Path(fname).parts if isinstance(fname, str) else ()
        if not parts or Path(fname).is_absolute() or ".." in parts:
            raise ValueError(f"'weight_map' in {index} maps tensor {name!r} to {fname!r} ({json_type(fname)}); "
                             f"expected the name of a file in {index.parent}")
    return entries


def weight_map(checkpoint_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded via the index file, or a single file).

    Raises ``ValueError`` naming the file and the field when the index is malformed (not JSON, not an object,
    a ``weight_map`` that is not a non-empty object of file names), naming the tensor and file when the
    index points at a missing file, and naming the file when a safetensors header cannot be read.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint_dir {root} is not a folder")
    index = root / INDEX_NAME
    if index.is_file():
        out = {name: root / fname for name, fname in _index_entries(index).items()}
        for name, path in out.items():
            if not path.is_file():
                raise ValueError(f"{index} maps tensor {name!r} to file {path.name}, which does not exist in {root}")
        return out
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no {INDEX_NAME} and no *.safetensors file in {root}")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    out[name] = path
        except _safetensor_error() as e:
            raise _corrupt(path, e) from e
    return out


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, file, safetensors dtype code (e.g. ``"F8_E4M3"``) and shape, read from the header."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _ST_DTYPES.get(self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        dt = self.torch_dtype
        return n * (dt.itemsize if dt is not None else 0)


def read_tensor_infos(checkpoint_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor's file, dtype and shape from the safetensors headers only (no tensor data is read)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in weight_map(checkpoint_dir).items():
        by_file.setdefault(path, []).append(name)
    infos: dict[str, TensorInfo] = {}
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise ValueError(f"tensor {name!r} is listed in {INDEX_NAME} for file {path.name}, "
                                         f"but that file has no such tensor")
                    sl = f.get_slice(name)
                    infos[name] = TensorInfo(name, path, sl.get_dtype(), tuple(sl.get_shape()))
        except _safetensor_error() as e:
            raise _corrupt(path, e) from e
    return infos


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # stderr, so that a command's stdout holds only its result.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)


def iter_tensors(infos: Mapping[str, TensorInfo], progress: bool, description: str
                  ) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    from safetensors import safe_open

    by_file: dict[Path, list[TensorInfo]] = {}
    for info in infos.values():
        by_file.setdefault(info.file, []).append(info)
    with _progress(progress) as bar:
        task = bar.add_task(description, total=len(infos))
        for path, members in by_file.items():
            try:
                with safe_open(path, framework="pt") as f:
                    for info in members:
                        try:
                            tensor = f.get_tensor(info.name)
                        except _safetensor_error() as e:
                            raise _corrupt(path, e, info.name) from e
                        yield info, tensor
                        bar.advance(task)
            except _safetensor_error() as e:
                raise _corrupt(path, e) from e


def iter_checkpoint(checkpoint_dir: str | Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(name, tensor)`` pairs one tensor at a time, file by file, with a progress bar on stderr."""
    for info, tensor in iter_tensors(read_tensor_infos(checkpoint_dir), progress, f"reading {checkpoint_dir}"):
        yield info.name, tensor

# ----------------------------------------------------------------------------------------- the config


def _expect(field_name: str, seen: object, allowed: tuple, path: Path) -> None:
    if seen not in allowed:
        want = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"quantization_config.{field_name} in {path} is {seen!r}; expected {want}")


def read_config(checkpoint_dir: str | Path) -> dict:
    """``checkpoint_dir/config.json`` as a dict ({} when there is none); ``ValueError`` naming the file when it
    is not a JSON object."""
    path = Path(checkpoint_dir) / CONFIG_NAME
    return read_json_object(path, "the model config") if path.is_file() else {}


def read_quantization_config(checkpoint_dir: str | Path) -> Fp8QuantConfig:
    """The validated ``quantization_config`` of ``checkpoint_dir/config.json``.

    Accepts what this project can run: ``quant_method "fp8"``, e4m3 weights, dynamic activation scales and
    fp32 block scales. A missing ``weight_block_size`` means 128x128, as in Hugging Face's loader. Every
    malformed field is a ``ValueError`` naming the file and the field.
    """
    path = Path(checkpoint_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {checkpoint_dir}: cannot tell the checkpoint's quantization")
    qc = read_json_object(path, "the model config").get("quantization_config")
    if qc is None:
        raise ValueError(f"{path} has no quantization_config object: not an FP8 checkpoint")
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config in {path} must be an object, got {json_type(qc)} {qc!r:.80}")
    _expect("quant_method", qc.get("quant_method"), ("fp8",), path)
    _expect("fmt", qc.get("fmt", "e4m3"), ("e4m3",), path)
    _expect("activation_scheme", qc.get("activation_scheme", "dynamic"), ("dynamic",), path)
    _expect("scale_fmt", qc.get("scale_fmt", "float"), ("float",), path)
    try:
        block = check_block_size(qc.get("weight_block_size", list(DEFAULT_BLOCK)), "weight_block_size")
    except ValueError as e:
        raise ValueError(f"quantization_config in {path}: {e}") from e
    skip = qc.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
        raise ValueError(f"quantization_config.modules_to_not_convert in {path} must be a list of layer names, got "
                         f"{skip!r:.80}")
    return Fp8QuantConfig(block, qc.get("activation_scheme", "dynamic"), qc.get("fmt", "e4m3"), tuple(skip))


def write_config(root: Path, config: Mapping | None, qc: Fp8QuantConfig) -> None:
    out = dict(config or {})
    out["quantization_config"] = qc.to_dict()
    (root / CONFIG_NAME).write_text(json.dumps(out, indent=2) + "\n")

# -------------------------------------------------------------------------------------- validation


def _ceil_div_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def check_fp8_tensors(infos: Mapping[str, TensorInfo], block_size: tuple[int, int]) -> list[str]:
    """Check every fp8 weight / scale pair from the headers; returns the quantized layer prefixes.

    Each failure is a ``ValueError`` naming the tensor and its file: a scale without its weight, an fp8
    weight without its scale, wrong dtypes, or a scale shape that is not the ceil-div of the weight shape by
    ``block_size`` (said as a disagreement with config.json when the tensors fit the default 128x128).
    """
    prefixes = []
    for name, info in infos.items():
        if name.endswith(SCALE_SUFFIX):
            prefix = name[: -len(SCALE_SUFFIX)]
            if prefix + WEIGHT_SUFFIX not in infos:
                raise ValueError(f"tensor {name!r} in {info.file} has no weight {prefix + WEIGHT_SUFFIX!r}")
            prefixes.append(prefix)
        elif info.dtype == "F8_E4M3" and prefix_of(name) + SCALE_SUFFIX not in infos:
            raise ValueError(f"fp8 tensor {name!r} in {info.file} has no {prefix_of(name) + SCALE_SUFFIX!r} "
                             f"(block-FP8 weights need their block scales)")
    for prefix in prefixes:
        w, s = infos[prefix + WEIGHT_SUFFIX], infos[prefix + SCALE_SUFFIX]
        if w.dtype != "F8_E4M3" or len(w.shape) != 2:
            raise ValueError(f"tensor {w.name!r} in {w.file} must be a 2-D F8_E4M3 weight next to its "
                             f"weight_scale_inv, got {w.dtype} of shape {w.shape}")
        if s.dtype != "F32":
            raise ValueError(f"tensor {s.name!r} in {s.file} must be F32, got {s.dtype}")
        want = _ceil_div_shape(w.shape, block_size)
        if s.shape == want:
            continue
        if len(s.shape) == 2 and s.shape == _ceil_div_shape(w.shape, DEFAULT_BLOCK):
            raise ValueError(
                f"config.json weight_block_size {list(block_size)} disagrees with the tensors: {s.name!r} in "
                f"{s.file} has shape {s.shape}, the ceil-div of weight {w.shape} by {list(DEFAULT_BLOCK)}, "
                f"not {want}")
        raise ValueError(f"tensor {s.name!r} in {s.file} has shape {s.shape}; expected {want}, the ceil-div of "
                         f"weight {w.shape} by block {list(block_size)}")
    return prefixes


def prefix_of(name: str) -> str:
    """Layer prefix of a tensor name: ``"a.b.weight"`` -> ``"a.b"``."""
    return name.rsplit(".", 1)[0] if "." in name else name

