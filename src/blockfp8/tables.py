"""Measured tables keyed by device name, then ``"N,K"``, then the M a row was measured at (as a string).

Two tables use this layout: the dispatcher's backend ranking (``data/dispatch_table.json``) and the Triton
launch configs (``data/triton_configs.json``). Both ship as package data, can be extended by a JSON file named
in an environment variable, and are written by ``blockfp8 bench --save-table`` / ``blockfp8 tune``.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path


def merge_tables(dst: dict, src: dict) -> dict:
    """Merge ``src`` into ``dst`` row by row (``src`` wins on equal keys); returns ``dst``."""
    for dev, shapes in src.items():
        for nk, by_m in shapes.items():
            dst.setdefault(dev, {}).setdefault(nk, {}).update(by_m)
    return dst


def load_table(data_name: str, env_var: str) -> dict:
    """The shipped ``data/<data_name>`` with the file named by ``env_var`` (if set) merged over it."""
    table = json.loads((resources.files("blockfp8") / "data" / data_name).read_text())
    extra = os.environ.get(env_var)
    if extra:
        with open(extra) as f:
            merge_tables(table, json.load(f))
    return table


def merge_table_file(path: str | Path, table: dict) -> dict:
    """Merge ``table`` into the JSON file at ``path`` (created if absent) and return the merged table."""
    path = Path(path)
    merged = merge_tables(json.loads(path.read_text()) if path.exists() else {}, table)
    path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    return merged


def pick_row(table: dict, device_name: str, n: int, k: int, m: int) -> tuple[int, object] | None:
    """(measured M, value) of the row measured at the smallest M >= ``m`` (else the largest), or None
    when the table has no row for this device and shape: each measured M stands for the bucket below it."""
    by_m = table.get(device_name, {}).get(f"{n},{k}")
    if not by_m:
        return None
    measured = sorted(int(x) for x in by_m)
    pick = next((t for t in measured if t >= m), measured[-1])
    return pick, by_m[str(pick)]
