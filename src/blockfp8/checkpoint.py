"""Read and write block-FP8 checkpoints in the Hugging Face / DeepSeek format with safetensors.

Format: every quantized linear layer ``<prefix>`` stores ``<prefix>.weight`` (float8_e4m3fn, (N, K)) and
``<prefix>.weight_scale_inv`` (fp32, (ceil(N/128), ceil(K/128)), multiplies on dequantization); every other
tensor is stored as it is. ``config.json`` carries ``quantization_config`` (``quant_method: "fp8"``,
``weight_block_size: [128, 128]``, ...). Tensors live in ``model.safetensors``, or, past the shard size, in
``model-0000i-of-0000N.safetensors`` files listed by ``model.safetensors.index.json``.

Everything here streams: reading yields one tensor at a time, writing holds at most one shard in memory,
and output goes to a temporary folder that is renamed into place only once complete.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .nn import Fp8BlockLinear, is_convertible_linear, matches_pattern
from .quant import DEFAULT_BLOCK, FLOAT_INPUTS, FP8_DTYPE, check_block_size, dequantize_weight, quantize_weight
from .reference import rel_error
from .validate import check_fp8_linear, check_scale_values

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SCALE_SUFFIX = ".weight_scale_inv"
WEIGHT_SUFFIX = ".weight"
# Hugging Face's default shard size; "GB" is 10**9 bytes there too.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Tensors ``convert_checkpoint`` keeps in their original dtype unless told otherwise, as glob patterns on the
# layer name or its last component: embeddings and norms are not matmuls, lm_head and MoE routers ("gate",
# not "gate_proj") are small but sensitive to quantization error.
DEFAULT_SKIP = ("*embed*", "*norm*", "lm_head", "gate")
# Files of other weight formats are not copied next to a converted checkpoint: they would hold the unquantized model.
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")

# safetensors dtype codes -> torch dtypes (header-only scans report dtypes as these codes).
_ST_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# ----------------------------------------------------------------------------------------------- reading


def _safetensor_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


def _corrupt(path: Path, err: Exception, key: str | None = None) -> ValueError:
    what = f"tensor {key!r} in " if key else ""
    return ValueError(f"cannot read {what}safetensors file {path}: {err} (truncated or corrupt file?)")


def weight_map(checkpoint_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded via the index file, or a single file).

    Raises ``ValueError`` naming the tensor and file when the index points at a missing file, and naming the
    file when a safetensors header cannot be read.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint_dir {root} is not a folder")
    index = root / INDEX_NAME
    if index.is_file():
        try:
            with open(index) as f:
                entries = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid index file (need a 'weight_map' object): {e}") from e
        out = {name: root / fname for name, fname in entries.items()}
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


def _iter_tensors(infos: Mapping[str, TensorInfo], progress: bool, description: str
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
    for info, tensor in _iter_tensors(read_tensor_infos(checkpoint_dir), progress, f"reading {checkpoint_dir}"):
        yield info.name, tensor


# ----------------------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class Fp8QuantConfig:
    """The ``quantization_config`` of a block-FP8 checkpoint (Hugging Face ``FineGrainedFP8Config`` fields)."""

    block_size: tuple[int, int] = DEFAULT_BLOCK
    activation_scheme: str = "dynamic"
    fmt: str = "e4m3"
    modules_to_not_convert: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"quant_method": "fp8", "fmt": self.fmt, "activation_scheme": self.activation_scheme,
                "weight_block_size": list(self.block_size),
                "modules_to_not_convert": list(self.modules_to_not_convert)}


def _expect(field_name: str, seen: object, allowed: tuple, path: Path) -> None:
    if seen not in allowed:
        want = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"quantization_config.{field_name} in {path} is {seen!r}; expected {want}")


def read_quantization_config(checkpoint_dir: str | Path) -> Fp8QuantConfig:
    """The validated ``quantization_config`` of ``checkpoint_dir/config.json``.

    Accepts what this project can run: ``quant_method "fp8"``, e4m3 weights, dynamic activation scales and
    fp32 block scales. A missing ``weight_block_size`` means 128x128, as in Hugging Face's loader.
    """
    path = Path(checkpoint_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {checkpoint_dir}: cannot tell the checkpoint's quantization")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict):
        raise ValueError(f"{path} has no quantization_config object: not an FP8 checkpoint")
    _expect("quant_method", qc.get("quant_method"), ("fp8",), path)
    _expect("fmt", qc.get("fmt", "e4m3"), ("e4m3",), path)
    _expect("activation_scheme", qc.get("activation_scheme", "dynamic"), ("dynamic",), path)
    _expect("scale_fmt", qc.get("scale_fmt", "float"), ("float",), path)
    try:
        block = check_block_size(qc.get("weight_block_size", list(DEFAULT_BLOCK)), "weight_block_size")
    except ValueError as e:
        raise ValueError(f"quantization_config in {path}: {e}") from e
    skip = qc.get("modules_to_not_convert") or ()
    return Fp8QuantConfig(block, qc.get("activation_scheme", "dynamic"), qc.get("fmt", "e4m3"), tuple(skip))


def _write_config(root: Path, config: Mapping | None, qc: Fp8QuantConfig) -> None:
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


# ------------------------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` (10**9), ``"500MiB"`` (2**20) or ``"1000"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(f"size must be bytes or a number with a unit (KB, MB, GB, KiB, MiB, GiB), got {size!r}")
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be > 0 bytes, got {size!r}")
    return value


@contextmanager
def _atomic_output_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out_dir``; rename it to ``out_dir`` only if the block succeeds.

    An exception (or Ctrl-C) removes the temporary folder, so ``out_dir`` is either absent, the old one, or
    the complete new one -- never half written. A hard kill leaves only a hidden ``.NAME.partial-*`` folder.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out_dir {out} already exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _ShardWriter:
    """Collects tensors into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.names: set[str] = set()
        self.total_bytes = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add tensors that stay together in one shard (a weight and its scales)."""
        size = sum(t.nbytes for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        storages = {t.untyped_storage().data_ptr() for t in self.pending.values()}
        for name, t in tensors.items():
            if name in self.names:
                raise ValueError(f"tensor name {name!r} is written twice")
            self.names.add(name)
            t = t.detach().to("cpu").contiguous()
            # safetensors refuses tensors sharing memory in one file (tied weights): store a copy.
            if t.untyped_storage().data_ptr() in storages:
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            self.pending[name] = t
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, self.root / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        """Write the last shard, give files their final names, write the index if sharded; returns shard count."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.root / "shard-00000.tmp").rename(self.root / SINGLE_NAME)
            return 1
        entries = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.root / f"shard-{i:05d}.tmp").rename(self.root / final)
            entries.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(entries.items()))}
        (self.root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return n


def _fp8_prefixes(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [name[: -len(SCALE_SUFFIX)] for name in state if name.endswith(SCALE_SUFFIX)]


def _check_state_pair(state: Mapping[str, torch.Tensor], prefix: str) -> None:
    w, s = state.get(prefix + WEIGHT_SUFFIX), state[prefix + SCALE_SUFFIX]
    if w is None:
        raise ValueError(f"state dict has {prefix + SCALE_SUFFIX!r} but no {prefix + WEIGHT_SUFFIX!r}")
    check_fp8_linear(w, s, state.get(prefix + ".bias"), name=prefix + WEIGHT_SUFFIX)


def _unconverted_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_convertible_linear(m)]


def save_fp8_checkpoint(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    config: Mapping | None = None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    modules_to_not_convert: Iterable[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model (with ``Fp8BlockLinear`` layers) or a state dict as a block-FP8 checkpoint.

    fp8 weights and their ``weight_scale_inv`` are checked (dtype, ceil-div shape, finite positive scales) and
    written as they are, like every other tensor. ``config`` (default: ``model.config`` of a transformers
    model) goes to config.json with ``quantization_config`` added. ``modules_to_not_convert`` defaults to
    the model's remaining ``nn.Linear`` layers, so a loader knows to keep them in float. The write is atomic:
    ``out_dir`` appears only once complete. Returns ``out_dir``.
    """
    max_bytes = parse_size(max_shard_bytes)
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        state = model.state_dict()
        if config is None and hasattr(getattr(model, "config", None), "to_diff_dict"):
            # What transformers' save_pretrained writes: the fields that differ from the defaults.
            config = model.config.to_diff_dict()
            if not config.get("architectures"):
                config["architectures"] = [type(model).__name__]
        if modules_to_not_convert is None:
            modules_to_not_convert = _unconverted_linears(model)
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise TypeError(f"model_or_state_dict must be an nn.Module or a mapping of tensors, "
                        f"got {type(model_or_state_dict).__name__}")
    prefixes = _fp8_prefixes(state)
    for prefix in prefixes:
        _check_state_pair(state, prefix)
    paired = {p + WEIGHT_SUFFIX for p in prefixes} | {p + SCALE_SUFFIX for p in prefixes}
    for name, t in state.items():
        if t.dtype == FP8_DTYPE and name not in paired:
            raise ValueError(f"fp8 tensor {name!r} has no {prefix_of(name) + SCALE_SUFFIX!r}")
    qc = Fp8QuantConfig(modules_to_not_convert=tuple(modules_to_not_convert or ()))
    with _atomic_output_dir(out_dir, overwrite) as tmp:
        writer = _ShardWriter(tmp, max_bytes)
        for name, t in state.items():
            if name.endswith(SCALE_SUFFIX):
                continue
            group = {name: t}
            if name.endswith(WEIGHT_SUFFIX) and prefix_of(name) + SCALE_SUFFIX in state:
                group[prefix_of(name) + SCALE_SUFFIX] = state[prefix_of(name) + SCALE_SUFFIX]
            writer.add(group)
        writer.close()
        _write_config(tmp, config, qc)
    return Path(out_dir)


# ------------------------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What ``load_fp8_model`` did."""

    replaced: list[str] = field(default_factory=list)
    loaded: int = 0
    bytes_read: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensor(s) ({self.bytes_read / 1e6:.1f} MB), "
                 f"{len(self.replaced)} linear layer(s) now Fp8BlockLinear"]
        if self.missing:
            lines.append(f"  missing from the checkpoint: {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  not in the model (ignored): {', '.join(self.unexpected)}")
        return "\n".join(lines)


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
    dtype). Everything checkable from the headers and config.json is checked before the model is touched;
    scale values (NaN, Inf, <= 0) are checked as they stream in. ``strict`` raises on tensors missing from
    the checkpoint or unknown to the model; otherwise they are listed in the report. Works with models on the
    meta device (their tensors are replaced by the loaded ones; a tied weight stored once is installed under
    all its names), except for non-persistent buffers such as rotary tables, which no checkpoint holds: the
    model's own code must create those.
    """
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
    report.unexpected = sorted(set(infos) - expected)
    report.missing = sorted(k for k in expected - set(infos) if not (aliases.get(k, set()) & set(infos)))
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"checkpoint {root} does not match the model: missing {report.missing[:8]}"
                         f"{'...' if len(report.missing) > 8 else ''}, unexpected {report.unexpected[:8]}"
                         f"{'...' if len(report.unexpected) > 8 else ''} (pass strict=False to load anyway)")
    for name, info in infos.items():
        target = state.get(name)
        if target is not None and tuple(target.shape) != info.shape:
            raise ValueError(f"tensor {name!r} in {info.file} has shape {info.shape}; the model expects "
                             f"{tuple(target.shape)}")

    for prefix, lin in to_replace.items():
        parent_name, _, child = prefix.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = lin.bias
        layer = Fp8BlockLinear(lin.in_features, lin.out_features, bias=bias is not None, device=lin.weight.device,
                               bias_dtype=bias.dtype if bias is not None else torch.bfloat16, backend=backend)
        setattr(parent, child, layer)
        report.replaced.append(prefix)
        modules[prefix] = layer
    # Drop every reference to the replaced float layers before streaming, so they are freed now and peak
    # memory stays near the FP8 model's size.
    state = to_replace = lin = bias = None

    wanted = {k: v for k, v in infos.items() if k in expected}
    for info, tensor in _iter_tensors(wanted, progress, f"loading {root.name}"):
        if info.name.endswith(SCALE_SUFFIX):
            check_scale_values(tensor, name=f"tensor {info.name!r} in {info.file}")
        owner, _, attr = info.name.rpartition(".")
        module = modules[owner] if owner else model
        installed = _set_tensor(module, attr, tensor)
        if installed is not None:
            _tie(modules, aliases.get(info.name, set()) - {info.name}, installed)
        report.loaded += 1
        report.bytes_read += info.nbytes
    return report


# ---------------------------------------------------------------------------------------- converting


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
    if info.torch_dtype not in FLOAT_INPUTS:
        return f"dtype {info.dtype}"
    prefix = prefix_of(info.name)
    pat = matches_pattern(prefix, DEFAULT_SKIP)
    if pat is not None:
        return f"default skip {pat!r}"
    pat = matches_pattern(prefix, tuple(skip))
    if pat is not None:
        return f"--skip {pat!r}"
    return None


def _copy_side_files(in_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for path in sorted(in_dir.iterdir()):
        if not path.is_file() or path.name in (CONFIG_NAME, INDEX_NAME) or path.suffix in _WEIGHT_FILE_SUFFIXES:
            continue
        shutil.copy2(path, out_dir / path.name)
        copied.append(path.name)
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
    weights' layers as ``modules_to_not_convert``; other non-weight files (tokenizer, generation config) are
    copied. Writes into a temporary folder renamed to ``out_dir`` at the end.
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
    summary = ConvertSummary(out_dir=dst)
    with _atomic_output_dir(dst, overwrite) as tmp:
        writer = _ShardWriter(tmp, max_bytes)
        for info, tensor in _iter_tensors(infos, progress, f"converting {src.name}"):
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
        _write_config(tmp, config, Fp8QuantConfig(modules_to_not_convert=tuple(not_converted)))
        summary.files_copied = _copy_side_files(src, tmp)
    return summary
