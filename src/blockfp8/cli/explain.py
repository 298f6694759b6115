"""``blockfp8 explain M N K``: the dispatcher's choice for one shape, what decided it (a table row and where it
came from, the nearest measured shape, online tuning or a static rule) and every backend's verdict."""

from __future__ import annotations

import argparse

from .. import tuning_cache
from ..dispatch import explain


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("m", type=int)
    p.add_argument("n", type=int)
    p.add_argument("k", type=int)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default=None, help="show what forcing this backend would do")


def run(args: argparse.Namespace) -> int:
    ex = explain(args.m, args.n, args.k, device=args.device, backend=args.backend)
    print(ex)
    found = tuning_cache.load(ex.problem.device_id)
    if found is not None:
        rows = sum(len(by_m) for by_m in found.tables["dispatch"].values())
        print(f"  tuning cache of this device: {found.path} ({rows} rows; `blockfp8 tune` adds more)")
    return 0 if ex.choice else 1
