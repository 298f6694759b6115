"""``blockfp8 explain M N K``: the dispatcher's choice for one shape, what decided it (a table row and where it
came from, the nearest measured shape, online tuning or a static rule) and every backend's verdict."""

from __future__ import annotations

import argparse

from .. import tuning_cache
from ..dispatch import check_backend_name, explain
from .common import positive_int, resolve_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    # M = 0 is a valid call of the library (an empty output), but there is nothing to choose for it.
    p.add_argument("m", type=positive_int, help="tokens: rows of the activation (>= 1)")
    p.add_argument("n", type=positive_int, help="output features: rows of the weight (>= 1)")
    p.add_argument("k", type=positive_int, help="input features (>= 1)")
    p.add_argument("--device", default=None, help="cpu or cuda[:INDEX] (default: cuda when available)")
    p.add_argument("--backend", default=None, help="show what forcing this backend would do")


def run(args: argparse.Namespace) -> int:
    check_backend_name(args.backend, "--backend")
    ex = explain(args.m, args.n, args.k, device=resolve_device(args.device), backend=args.backend)
    print(ex)
    found = tuning_cache.load(ex.problem.device_id)
    if found is not None:
        rows = sum(len(by_m) for by_m in found.tables["dispatch"].values())
        print(f"  tuning cache of this device: {found.path} ({rows} rows; `blockfp8 tune` adds more)")
    if not ex.choice:
        # A backend forced onto a shape it cannot run: the user's request, refused (exit 2), after the verdicts.
        raise ValueError(ex.error)
    return 0
