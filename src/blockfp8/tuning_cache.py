"""The per-device tuning cache: what ``blockfp8 tune`` and online tuning measured on this machine, kept in the
user's cache folder and read by the dispatcher and the launch-config lookups with no setting needed.

Where: ``$BLOCKFP8_CACHE_DIR`` if set, else ``platformdirs.user_cache_dir("blockfp8")`` when platformdirs is
installed, else ``$XDG_CACHE_HOME/blockfp8`` or ``~/.cache/blockfp8``. platformdirs is optional: on Linux, where
the GPUs this library serves are, it gives the same XDG folder, so the library does not depend on it.

What: one JSON file per *key*. The key names the device (name, compute capability, SM count) and the software
that ran the measurement (NVIDIA driver, CUDA runtime, blockfp8, torch, triton, deep_gemm), so rows measured on
another GPU, another driver or another version of any kernel library are never reused: they live in another
file, found by a hash of the key. The file::

    {"schema": 1, "key": {...}, "tables": {"dispatch": {"N,K": {"M": [backends, fastest first]}},
                                           "triton": {"N,K": {"M": config}}, "gluon": {"N,K": {"M": config}}},
     "cells": {"N,K,M": {what was measured there}}}

A file that cannot be read, is not JSON, has another schema version, names another key or holds malformed rows
is ignored with a warning -- never an error: the dispatcher then falls back to the shipped tables and its
rules. Writes merge into the file and replace it atomically (a temporary file in the same folder, then
``os.replace``), so an interrupted ``blockfp8 tune`` keeps what it finished and a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

from .device import DeviceId

ENV_DIR = "BLOCKFP8_CACHE_DIR"
SCHEMA = 1
KINDS = ("dispatch", "triton", "gluon")


def cache_dir() -> Path:
    """The folder the tuning cache lives in (see the module docstring for the rule)."""
    override = os.environ.get(ENV_DIR)
    if override:
        return Path(override).expanduser()
    try:
        import platformdirs
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "blockfp8"
    return Path(platformdirs.user_cache_dir("blockfp8", appauthor=False))


def dist_version(*names: str) -> str | None:
    """Installed version of the first of ``names`` that is an installed distribution (None if none is)."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (Linux, read from /proc without running nvidia-smi), else the CUDA
    driver API version torch reports, else None (no NVIDIA driver)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        text = ""
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    if found:
        return found.group(1)
    import torch

    get = getattr(torch._C, "_cuda_getDriverVersion", None)  # CUDA builds of torch only
    if get is None or not torch.cuda.is_available():
        return None
    try:
        return f"cuda driver api {get()}"
    except RuntimeError:
        return None


@cache
def library_versions() -> dict[str, str | None]:
    """The software a measurement depends on besides the device, read once per process."""
    import torch
    import triton

    from . import __version__

    return {
        "driver": driver_version(),
        "cuda": torch.version.cuda,
        "blockfp8": __version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "deep_gemm": dist_version("deep_gemm", "deep-gemm", "deepinfer-gemm"),
    }


def cache_key(dev: DeviceId) -> dict:
    """Everything a measured row depends on: the device and the software versions."""
    arch = f"{dev.arch[0]}.{dev.arch[1]}" if dev.arch else None
    return {"device": dev.name, "capability": arch, "sms": dev.sms, **library_versions()}


def cache_path(key: dict) -> Path:
    """The file of one key: ``tuning-<device>-<hash of the key>.json`` in ``cache_dir()``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(key.get("device", ""))).strip("-").lower() or "device"
    return cache_dir() / f"tuning-{slug}-{digest}.json"


@dataclass
class TuningCache:
    """The rows one key holds (empty when its file is missing or was ignored)."""

    path: Path
    key: dict
    tables: dict = field(default_factory=lambda: {kind: {} for kind in KINDS})
    cells: dict = field(default_factory=dict)


_TILES = (16, 32, 64, 128, 256)
_BOOL = (False, True)
# The launch-config fields of each kind and the values its kernel accepts (TritonConfig, GluonConfig: a test holds
# these names to the dataclasses' fields). A row outside them would launch nothing (split_k=0 leaves the output
# uninitialised) or fail inside a kernel, so it is skipped.
CONFIG_FIELDS = {
    "triton": {"block_m": _TILES, "block_n": _TILES, "split_k": range(1, 65), "group_m": range(1, 65),
               "swap_ab": _BOOL, "num_warps": (1, 2, 4, 8, 16), "num_stages": range(1, 9), "tma": _BOOL,
               "pair_k": _BOOL},
    # Gluon stages >= 2: a K loop trip holds two groups' slots at once, so a ring of one slot waits on itself.
    "gluon": {"block_m": (64, 128), "block_n": _TILES, "num_warps": (4, 8), "stages": range(2, 9),
              "group_m": range(1, 65), "unroll": range(1, 9), "persistent": _BOOL},
}
REQUIRED_FIELDS = {"triton": ("block_m", "block_n"), "gluon": ()}


def _is_int_key(text: object, parts: int) -> bool:
    return isinstance(text, str) and bool(re.fullmatch(r"\d+" + r",\d+" * (parts - 1), text))


def _config_problem(kind: str, value: dict) -> str | None:
    spec = CONFIG_FIELDS[kind]
    unknown = sorted(str(f) for f in value if f not in spec)
    if unknown:
        return f"unknown field(s) {unknown}; a {kind} config has {sorted(spec)}"
    missing = [f for f in REQUIRED_FIELDS[kind] if f not in value]
    if missing:
        return f"missing field(s) {missing}"
    for name, v in value.items():
        allowed = spec[name]
        # bool is an int in Python: a flag must be a bool and a size must not be one.
        if (type(v) is not bool) if allowed is _BOOL else (type(v) is not int or v not in allowed):
            want = "true or false" if allowed is _BOOL else (
                f"an integer in {allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range) else
                f"one of {list(allowed)}")
            return f"{name}={v!r}, expected {want}"
    return None


def row_problem(kind: str, nk: object, m: object, value: object) -> str | None:
    """Why one table row ("N,K" -> "M" -> value) of ``kind`` must not be used (None when it may): sizes that are
    not positive integers, a ranking naming a backend that does not exist, a launch config outside what the
    kernel accepts."""
    if not _is_int_key(nk, 2) or any(int(v) < 1 for v in nk.split(",")):
        return f"shape {nk!r} is not 'N,K' with N, K >= 1"
    if not _is_int_key(m, 1) or int(m) < 1:
        return f"M {m!r} is not an integer >= 1"
    if kind == "dispatch":
        if not (isinstance(value, list) and value and all(isinstance(b, str) for b in value)):
            return f"expected a list of backend names, got {value!r}"
        from .backends import backend_names  # here: the backends import the tables' users

        unknown = [b for b in value if b not in backend_names()]
        return f"names unknown backend(s) {unknown}" if unknown else None
    if not isinstance(value, dict):
        return f"expected a launch config object, got {value!r}"
    return _config_problem(kind, value)


def structure_problem(kind: str, table: object) -> str | None:
    """Why ``table`` is not shaped as an "N,K" -> "M" -> value table of ``kind`` (None when it is); its rows are
    checked one by one where they are used (``row_problem``), so one bad row costs only itself."""
    if not isinstance(table, dict):
        return f"{kind} table is a {type(table).__name__}, expected an object"
    for nk, by_m in table.items():
        if not isinstance(by_m, dict):
            return f"{kind} table has a malformed shape entry {nk!r}: {by_m!r}"
    return None


def table_problem(kind: str, table: object) -> str | None:
    """Why ``table`` is not a valid "N,K" -> "M" -> value table of ``kind``, rows included (None when it is)."""
    problem = structure_problem(kind, table)
    if problem:
        return problem
    for nk, by_m in table.items():
        for m, value in by_m.items():
            problem = row_problem(kind, nk, m, value)
            if problem:
                return f"{kind} table row {nk} M={m} is malformed: {problem}"
    return None


def _file_problem(data: object, key: dict) -> str | None:
    if not isinstance(data, dict):
        return f"expected a JSON object, found a {type(data).__name__}"
    if data.get("schema") != SCHEMA:
        return f"schema {data.get('schema')!r}, this blockfp8 reads schema {SCHEMA} (stale cache from another version)"
    if data.get("key") != key:
        return f"it was measured for another device or software version: {data.get('key')!r}"
    tables = data.get("tables")
    if not isinstance(tables, dict) or not isinstance(data.get("cells", {}), dict):
        return "'tables' and 'cells' must be objects"
    for kind in KINDS:
        problem = structure_problem(kind, tables.get(kind, {}))
        if problem:
            return problem
    return None


def _read(path: Path, key: dict) -> TuningCache:
    found = TuningCache(path, key)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return found
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        problem = f"cannot read it ({type(e).__name__}: {e}; truncated or corrupt?)"
    else:
        problem = _file_problem(data, key)
        if problem is None:
            found.tables.update({kind: data["tables"].get(kind, {}) for kind in KINDS})
            found.cells = data.get("cells", {})
            return found
    warnings.warn(f"blockfp8: ignoring the tuning cache {path}: {problem}. The dispatcher uses the shipped tables "
                  f"and its rules instead; run `blockfp8 tune` to measure this device again.", stacklevel=3)
    return found


def load(dev: DeviceId) -> TuningCache | None:
    """What the cache holds for this device with the software installed now; None off CUDA (nothing is tuned
    there, and no file is looked for)."""
    if dev.arch is None:
        return None
    key = cache_key(dev)
    return _read(cache_path(key), key)


def save(dev: DeviceId, tables: dict | None = None, cells: dict | None = None) -> Path:
    """Merge rows (``{kind: {"N,K": {"M": value}}}``) and cell records into this device's cache file, atomically;
    returns the file's path. A file that was ignored on reading is replaced. Processes saving at once take turns
    (a lock file next to the cache file), so none loses another's rows."""
    if dev.arch is None:
        raise ValueError(f"device {dev.name!r} has no compute capability: only CUDA devices are tuned")
    for kind, table in (tables or {}).items():
        if kind not in KINDS:
            raise ValueError(f"tables has kind {kind!r}; expected one of {KINDS}")
        problem = table_problem(kind, table)
        if problem:
            raise ValueError(f"cannot save: {problem}")
    key = cache_key(dev)
    path = cache_path(key)
    with _exclusive(path):
        current = _read(path, key)
        for kind, table in (tables or {}).items():
            for nk, by_m in table.items():
                current.tables[kind].setdefault(nk, {}).update(by_m)
        current.cells.update(cells or {})
        data = {"schema": SCHEMA, "key": current.key, "tables": current.tables, "cells": current.cells}
        write_atomic(current.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return current.path


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` next to ``path`` (read-merge-write must not interleave between
    processes: two tuning runs sharing a cache folder lost rows). Without ``fcntl`` (Windows) no lock is taken."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def new_file_mode() -> int:
    """The mode a newly created file gets under the process's umask (0o644 under the usual 022)."""
    mask = os.umask(0o022)  # reading the umask means setting it
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a part. The file keeps
    the mode it had, or gets the one any new file gets under the umask: the private temporary file (0600) would
    otherwise make a shared table, such as an installed package's data, unreadable to other users."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
