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
from ..nn import is_convertible_linear
from ..validate import check_fp8_linear
from .files import INDEX_NAME, SCALE_SUFFIX, SINGLE_NAME, WEIGHT_SUFFIX, Fp8QuantConfig, prefix_of, write_config

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


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
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
    mask = os.umask(0o022)  # reading the umask means setting it
    os.umask(mask)
    os.chmod(shard, 0o666 & ~mask)
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
    with atomic_output_dir(out_dir, overwrite) as tmp:
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

