"""Writing block-FP8 checkpoints: shard sizes, atomic output folders, sharded safetensors, and
``save_fp8_checkpoint``."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..format import FP8_DTYPE
from ..hf_config import check_saveable
from ..nn import is_convertible_linear
from ..tuning_cache import new_file_mode
from ..validate import check_fp8_linear, require_tensor
from .files import (
    CONFIG_NAME,
    INDEX_NAME,
    SCALE_SUFFIX,
    SINGLE_NAME,
    WEIGHT_SUFFIX,
    Fp8QuantConfig,
    prefix_of,
    write_config,
)

# Hugging Face's default shard size; "GB" is 10**9 bytes there too.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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


_RELATIONS = {
    "is": "the output would replace it",
    "contains": "replacing out_dir would delete it",
    "lies inside": "the output would be written into it",
}


def _relation(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if other.is_relative_to(out):
        return "contains"
    if out.is_relative_to(other):
        return "lies inside"
    return None


def check_output_dir(out_dir: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """``out_dir`` resolved, after refusing an output folder that could touch an input or cannot be a folder.

    ``ValueError`` naming both paths when ``out_dir`` is, contains or lies inside one of ``inputs`` (folders or
    files; symlinks resolved on both sides), and when an existing part of its path is a file.
    """
    out = Path(out_dir).resolve()
    for given in inputs:
        real = Path(given).resolve()
        relation = _relation(out, real)
        if relation is not None:
            shown = f"{given}" if Path(given) == real else f"{given} (resolved: {real})"
            raise ValueError(f"out_dir {out_dir} {relation} the input {shown}: {_RELATIONS[relation]}; choose an "
                             f"output folder outside the input")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"out_dir {out_dir} cannot be created: {parent} is a file, not a folder")
            break
    return out


def _check_replaceable(out: Path, given: str | Path) -> None:
    """Refuse to replace what no writer here produces: overwrite removes only a folder of files."""
    if not out.is_dir():
        raise ValueError(f"out_dir {given} is a file, not a folder; overwrite replaces only an output folder")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted: nothing to protect
        cwd = None
    if cwd is not None and cwd.is_relative_to(out):
        raise ValueError(f"out_dir {given} holds the current working directory {cwd}; refusing to replace it")
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    if folders and not _written_by_a_writer(out):
        raise ValueError(f"out_dir {given} holds sub-folders ({', '.join(folders[:5])}); overwrite replaces only an "
                         f"output folder, which holds files alone: remove it yourself or choose another folder")


def _written_by_a_writer(out: Path) -> bool:
    """Whether ``out`` looks like a folder a writer here produced: a config.json whose quantization_config says
    block FP8 (a converted model keeps its sub-folders, e.g. sentence-transformers' ``1_Pooling/``)."""
    try:
        qc = json.loads((out / CONFIG_NAME).read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "fp8"


def _written_here(e: OSError, tmp: Path) -> bool:
    """Whether an OSError came from writing into ``tmp`` (errors of a write or close carry no file name)."""
    return e.filename is None or Path(os.fsdecode(e.filename)).is_relative_to(tmp)


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out_dir``; rename it to ``out_dir`` only if the block succeeds.

    Refused before anything is written (``ValueError``): an ``out_dir`` that is, contains or lies inside one of
    ``inputs`` (see ``check_output_dir``), or whose path runs through a file; with ``overwrite``, an existing
    ``out_dir`` that is a file, holds sub-folders or holds the working directory. Without ``overwrite`` an
    existing ``out_dir`` is a ``FileExistsError``. An exception (or Ctrl-C) removes the temporary folder, so
    ``out_dir`` is either absent, the old one, or the complete new one -- never half written; a write that fails
    (read-only folder, full disk) is an ``OSError`` of the same errno naming ``out_dir``. A hard kill leaves only
    a hidden ``.NAME.partial-*`` folder.
    """
    out = check_output_dir(out_dir, inputs)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"out_dir {out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
        _check_replaceable(out, out_dir)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        # Name the folder that failed when it is a parent; the hidden temporary one means nothing to a user.
        failed = e.filename if e.filename is not None and Path(os.fsdecode(e.filename)) != tmp else None
        raise OSError(e.errno, f"cannot create out_dir {out_dir}: {e.strerror}", failed) from e
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None and _written_here(e, tmp):
            raise OSError(e.errno, f"cannot write out_dir {out_dir}: {e.strerror}; the partial output was removed "
                                   f"and {out_dir} was not changed") from e
        raise


def _save_shard(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:
        # safetensors reports a failed write as its own error type, with the OS error number in the text only.
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


class ShardWriter:
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
        _save_shard(self.pending, self.root / f"shard-{len(self.shards):05d}.tmp")
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        """Write the last shard, give files their final names, write the index if sharded; returns shard count."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            _publish(self.root / "shard-00000.tmp", self.root / SINGLE_NAME)
            return 1
        entries = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            _publish(self.root / f"shard-{i:05d}.tmp", self.root / final)
            entries.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(entries.items()))}
        (self.root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return n


def _publish(shard: Path, final: Path) -> None:
    """Give a written shard its final name and the mode any new file gets under the umask, as config.json and
    the copied files have: safetensors writes through a private temporary file, which leaves it 0600."""
    os.chmod(shard, new_file_mode())
    shard.rename(final)


def _fp8_prefixes(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [name[: -len(SCALE_SUFFIX)] for name in state if name.endswith(SCALE_SUFFIX)]


def _check_state_pair(state: Mapping[str, torch.Tensor], prefix: str) -> None:
    w, s = state.get(prefix + WEIGHT_SUFFIX), state[prefix + SCALE_SUFFIX]
    if w is None:
        raise ValueError(f"state dict has {prefix + SCALE_SUFFIX!r} but no {prefix + WEIGHT_SUFFIX!r}")
    check_fp8_linear(w, s, state.get(prefix + ".bias"), name=prefix + WEIGHT_SUFFIX)


def _unconverted_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_convertible_linear(m)]


def _source_dir(model: nn.Module) -> list[Path]:
    """The local folder a transformers model was loaded from, if any: writing there could delete it."""
    source = getattr(getattr(model, "config", None), "name_or_path", None)
    return [Path(source)] if isinstance(source, str) and source and Path(source).is_dir() else []


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

    fp8 weights and their ``weight_scale_inv`` are checked (dtype, ceil-div shape, scales in (0, 2^56], no NaN
    fp8 bytes) and written as they are, like every other tensor. ``config`` (default: ``model.config`` of a
    transformers model) goes to config.json with ``quantization_config`` added. ``modules_to_not_convert``
    defaults to the model's remaining ``nn.Linear`` layers, so a loader knows to keep them in float. The write
    is atomic: ``out_dir`` appears only once complete; it may not be, contain or lie inside the folder a
    transformers model was loaded from (``ValueError``). A transformers model that would not load back as
    itself (``hf_config.check_saveable``) is refused before anything is written. Returns ``out_dir``.
    """
    max_bytes = parse_size(max_shard_bytes)
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (the model's config.json fields) or None, got "
                        f"{type(config).__name__}")
    if isinstance(modules_to_not_convert, str):
        modules_to_not_convert = (modules_to_not_convert,)
    inputs: list[Path] = []
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        check_saveable(model)
        inputs = _source_dir(model)
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
    if not state:
        raise ValueError("model_or_state_dict holds no tensor: there is nothing to write")
    for name, t in state.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict keys must be tensor names (str), got {type(name).__name__} {name!r}")
        require_tensor(t, f"state dict entry {name!r}")
    prefixes = _fp8_prefixes(state)
    for prefix in prefixes:
        _check_state_pair(state, prefix)
    paired = {p + WEIGHT_SUFFIX for p in prefixes} | {p + SCALE_SUFFIX for p in prefixes}
    for name, t in state.items():
        if t.dtype == FP8_DTYPE and name not in paired:
            raise ValueError(f"fp8 tensor {name!r} has no {prefix_of(name) + SCALE_SUFFIX!r}")
    qc = Fp8QuantConfig(modules_to_not_convert=tuple(modules_to_not_convert or ()))
    with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        for name, t in state.items():
            if name.endswith(SCALE_SUFFIX):
                continue
            group = {name: t}
            if name.endswith(WEIGHT_SUFFIX) and prefix_of(name) + SCALE_SUFFIX in state:
                group[prefix_of(name) + SCALE_SUFFIX] = state[prefix_of(name) + SCALE_SUFFIX]
            writer.add(group)
        writer.close()
        write_config(tmp, config, qc)
    return Path(out_dir)
