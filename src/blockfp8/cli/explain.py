"""``blockfp8 explain M N K``: the dispatcher's choice for one shape and every backend's verdict."""

from __future__ import annotations

import argparse

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
    return 0 if ex.choice else 1
