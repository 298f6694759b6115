"""Measured tables keyed by device, then ``"N,K"``, then the M a row was measured at (as a string), and how the
layers of them combine into the rows one device sees.

Three kinds share the layout: the dispatcher's backend ranking (``"dispatch"``: backend names, fastest first)
and the launch configs of blockfp8's Triton (``"triton"``) and Gluon (``"gluon"``) kernels. A device's rows
come from four layers, each merged over the one before it per M (a higher layer replaces the row at the same M
and keeps the others):

1. shipped: package data (``data/dispatch_table.json``, ``data/triton_configs.json``, ``data/gluon_configs.json``),
   keyed by device name;
2. cache: the user's tuning cache for this exact device and software (``tuning_cache``; CUDA only);
3. recorded: rows added in this process (``blockfp8 bench --rank-in-run``);
4. override: the JSON file named by the kind's environment variable (``BLOCKFP8_DISPATCH_TABLE``,
   ``BLOCKFP8_TRITON_CONFIGS``, ``BLOCKFP8_GLUON_CONFIGS``), keyed by device name like the shipped file.

A query at M uses the row measured at the smallest M >= its own among the rows of its phase (decode M <= 64, or
prefill), else the largest of that phase: each measured M stands for the bucket below it. Rows of the other
phase never answer -- a decode ranking is no guide to a prefill GEMM.

``nearest`` looks beyond the exact shape: the closest measured shape on this device or on a device of the same
family (``device.DeviceId.family``: same compute capability and SM count, as H100 SXM and H200), within a
factor of the shape in N and in K. ``data/devices.json`` gives the family of every device the shipped tables name.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

from . import tuning_cache
from .device import DeviceId
from .format import is_decode

# The M values tables are measured at (``blockfp8 tune``/``bench`` by default, and the buckets online tuning
# fills): one per decode size class and per prefill size class.
M_BUCKETS = (1, 16, 64, 128, 512, 2048, 4096)

# kind -> (shipped data file, environment variable naming an override file)
KINDS = {
    "dispatch": ("dispatch_table.json", "BLOCKFP8_DISPATCH_TABLE"),
    "triton": ("triton_configs.json", "BLOCKFP8_TRITON_CONFIGS"),
    "gluon": ("gluon_configs.json", "BLOCKFP8_GLUON_CONFIGS"),
}
DEVICES_FILE = "devices.json"

_RECORDED: dict[str, dict] = {kind: {} for kind in KINDS}
_generation = 0
_excluded_sources: frozenset[str] = frozenset()
_excluded_shipped: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Row:
    """One measured row and where it came from."""

    value: object  # backend names (dispatch) or a launch config (dict)
    m: int  # the M it was measured at
    source: str  # "shipped", "cache" (blockfp8 tune), "online" (online tuning), "recorded" or "override"
    origin: str  # the file it was read from, or "this process"
    device: str
    n: int
    k: int

    def describe(self) -> str:
        return f"{self.source} row ({self.device}, N={self.n} K={self.k}, measured at M={self.m}) from {self.origin}"


def merge_tables(dst: dict, src: dict) -> dict:
    """Merge ``src`` into ``dst`` row by row (``src`` wins on equal keys); returns ``dst``."""
    for dev, shapes in src.items():
        for nk, by_m in shapes.items():
            dst.setdefault(dev, {}).setdefault(nk, {}).update(by_m)
    return dst


def _parse_table_file(path: Path, kind: str, name: str) -> dict:
    """The tables in the JSON file at ``path`` (device name -> "N,K" -> "M" -> value); ``ValueError`` starting with
    ``name`` (how the caller knows the file) when it cannot be read or is not shaped so. Devices named ``_...``
    are comments, as in the shipped files."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{name}: cannot read it as a JSON {kind} table file: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{name} must hold a JSON object (device name -> {kind} table), got {type(data).__name__}")
    for dev, rows in data.items():
        problem = tuning_cache.structure_problem(kind, rows)
        if problem and not str(dev).startswith("_"):
            raise ValueError(f"{name}: device {dev!r}: {problem}")
    return data


def read_table_file(path: str | Path, kind: str = "dispatch") -> dict:
    """The tables in the JSON file at ``path`` ({} when it does not exist); ``ValueError`` naming the file when it
    cannot be read or is not shaped so. Commands that will merge into a file call this before measuring, so a
    bad target fails at once rather than after the run."""
    path = Path(path)
    return _parse_table_file(path, kind, str(path)) if path.exists() else {}


def merge_table_file(path: str | Path, table: dict, kind: str = "dispatch") -> dict:
    """Merge ``table`` into the JSON file at ``path`` (created if absent, replaced atomically) and return the
    merged table."""
    path = Path(path)
    merged = merge_tables(read_table_file(path, kind), table)
    tuning_cache.write_atomic(path, json.dumps(merged, indent=1, sort_keys=True) + "\n")
    return merged


def data_path(name: str) -> Path:
    """Path of a file in the package's ``data`` folder."""
    return Path(str(resources.files("blockfp8") / "data" / name))


@cache
def shipped(kind: str) -> dict:
    """The package's table of ``kind``: device name -> "N,K" -> str(M) -> value."""
    name = KINDS[kind][0]
    return {dev: rows for dev, rows in json.loads(data_path(name).read_text()).items() if not dev.startswith("_")}


@cache
def override(kind: str) -> tuple[dict, str]:
    """The table in the file named by ``kind``'s environment variable, and that file's path (empty if unset).

    The user named this file, so a broken one is an error (naming the variable), not a warning."""
    env = KINDS[kind][1]
    path = os.environ.get(env)
    if not path:
        return {}, ""
    return _parse_table_file(Path(path), kind, f"{env}={path!r}"), path


@cache
def known_devices() -> dict[str, DeviceId]:
    """Devices the shipped tables name, with their compute capability and SM count (``data/devices.json``)."""
    data = json.loads(data_path(DEVICES_FILE).read_text())
    return {name: DeviceId(name, tuple(d["capability"]), int(d["sms"])) for name, d in data.items()
            if not name.startswith("_")}


def family_devices(dev: DeviceId) -> list[DeviceId]:
    """The other devices of ``dev``'s family that the shipped tables name."""
    if dev.family is None:
        return []
    return [d for name, d in sorted(known_devices().items()) if name != dev.name and d.family == dev.family]


def record(kind: str, device_name: str, n: int, k: int, m: int, value: object) -> None:
    """Add a row measured in this process (it ranks over the shipped and cached rows, under the override)."""
    merge_tables(_RECORDED[kind], {device_name: {f"{n},{k}": {str(m): value}}})
    invalidate()


def forget_recorded() -> None:
    """Drop the rows ``record`` added."""
    for rows in _RECORDED.values():
        rows.clear()
    invalidate()


_warned_rows: set[tuple] = set()


def _layer(rows: dict, table: dict, kind: str, source: str, origin: str, device: str) -> None:
    for nk, by_m in table.items():
        for m, value in by_m.items():
            problem = tuning_cache.row_problem(kind, nk, m, value)
            if problem:
                # A file may be shared or stale: a bad row is skipped (the next source answers), said once.
                if (kind, origin, device, nk, m) not in _warned_rows:
                    _warned_rows.add((kind, origin, device, nk, m))
                    warnings.warn(f"blockfp8: skipping the {kind} row {device} N,K={nk} M={m} from {origin}: "
                                  f"{problem}", RuntimeWarning, stacklevel=2)
                continue
            n, k = (int(v) for v in nk.split(","))
            rows.setdefault((n, k), {})[int(m)] = Row(value, int(m), source, origin, device, n, k)


def exclude(sources: tuple[str, ...] = (), shipped_of: tuple[str, ...] = ()) -> None:
    """Leave layers out of every lookup from now on: whole ``sources`` ("shipped", "cache", "recorded",
    "override") and the shipped rows of the devices named in ``shipped_of``; ``exclude()`` shows all again.

    For measurements that compare the dispatcher with and without what ships (``blockfp8 tune --verify``
    measures a device as if it had no shipped row, and the static rules with no table at all)."""
    global _excluded_sources, _excluded_shipped
    unknown = set(sources) - {"shipped", "cache", "recorded", "override"}
    if unknown:
        raise ValueError(f"sources got {sorted(unknown)}; expected shipped, cache, recorded or override")
    _excluded_sources, _excluded_shipped = frozenset(sources), frozenset(shipped_of)
    invalidate()


@lru_cache(maxsize=256)
def device_rows(kind: str, dev: DeviceId) -> dict[tuple[int, int], dict[int, Row]]:
    """(N, K) -> measured M -> ``Row``: every layer of ``kind`` for one device, merged (see the docstring)."""
    rows: dict[tuple[int, int], dict[int, Row]] = {}
    name = KINDS[kind][0]
    if "shipped" not in _excluded_sources and dev.name not in _excluded_shipped:
        _layer(rows, shipped(kind).get(dev.name, {}), kind, "shipped", f"the package's data/{name}", dev.name)
    cached = tuning_cache.load(dev) if "cache" not in _excluded_sources else None
    if cached is not None:
        _layer(rows, cached.tables[kind], kind, "cache", str(cached.path), dev.name)
        for (n, k), by_m in rows.items():
            for m, row in by_m.items():
                # A row online tuning wrote says so (explain names it): its cell record carries the source.
                record = cached.cells.get(f"{n},{k},{m}")
                if row.source == "cache" and isinstance(record, dict) and record.get("source") == "online":
                    by_m[m] = replace(row, source="online")
    if "recorded" not in _excluded_sources:
        _layer(rows, _RECORDED[kind].get(dev.name, {}), kind, "recorded", "this process", dev.name)
    if "override" not in _excluded_sources:
        table, path = override(kind)
        _layer(rows, table.get(dev.name, {}), kind, "override", f"{KINDS[kind][1]}={path}", dev.name)
    return rows


def pick(by_m: dict[int, Row], m: int) -> Row | None:
    """The row that answers a query at ``m``: measured at the smallest M >= ``m`` of ``m``'s phase, else the
    largest of that phase; None when no row of that phase exists."""
    same_phase = sorted(x for x in by_m if is_decode(x) == is_decode(m))
    if not same_phase:
        return None
    return by_m[next((x for x in same_phase if x >= m), same_phase[-1])]


def lookup(kind: str, dev: DeviceId, n: int, k: int, m: int) -> Row | None:
    """This device's row for (N, K) at ``m`` (``pick``), or None."""
    by_m = device_rows(kind, dev).get((n, k))
    return pick(by_m, m) if by_m else None


def nearest(kind: str, dev: DeviceId, n: int, k: int, m: int, max_ratio: float = 2.0) -> Row | None:
    """The row at ``m`` of the measured shape closest to (N, K), on this device or another of its family.

    Distance: |ln(N'/N)| + |ln(K'/K)|; only shapes within ``max_ratio`` of N and of K count (``max_ratio=1``:
    the same shape on a sibling device only). This device's own exact shape is ``lookup``'s answer and is not
    searched here. Ties go to this device, then to the smaller shape."""
    best: tuple[tuple, Row] | None = None
    for other in [dev, *family_devices(dev)]:
        for (n2, k2), by_m in device_rows(kind, other).items():
            if other == dev and (n2, k2) == (n, k):
                continue
            if max(n2 / n, n / n2) > max_ratio or max(k2 / k, k / k2) > max_ratio:
                continue
            row = pick(by_m, m)
            if row is None:
                continue
            rank = (abs(math.log(n2 / n)) + abs(math.log(k2 / k)), other != dev, n2 * k2, n2)
            if best is None or rank < best[0]:
                best = (rank, row)
    return best[1] if best else None


def tuned_config(kind: str, dev: DeviceId, n: int, k: int, m: int) -> dict | None:
    """A launch config tuned for (N, K) at ``m``: this device's row, else the same shape on a device of its family
    (launch configs depend on the shape and the SM count, so other shapes are no guide)."""
    row = lookup(kind, dev, n, k, m) or nearest(kind, dev, n, k, m, max_ratio=1.0)
    return row.value if row else None


def m_bucket(m: int) -> int:
    """The measured M (``M_BUCKETS``) whose row answers a query at ``m``."""
    return next((b for b in M_BUCKETS if b >= m), M_BUCKETS[-1])


def generation() -> int:
    """A number that changes whenever any table may have changed: part of the key of every cached lookup."""
    return _generation


def invalidate() -> None:
    """Forget every cached table (after tuning wrote the cache, or an environment variable changed)."""
    global _generation
    _generation += 1
    device_rows.cache_clear()
    override.cache_clear()
