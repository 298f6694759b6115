"""``blockfp8 reliability``: every bad input tried against the public API and the error it gets, as the
markdown table of docs/reliability.md (``testing.reliability``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..testing.reliability import DEFAULT_OUT, collect, render, time_checks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help=f"write the markdown here (e.g. {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from the generated text")
    parser.add_argument("--time-checks", action="store_true", help="print the per-call cost of the checks")


def run(args: argparse.Namespace) -> int:
    if args.time_checks:
        for key, us in time_checks().items():
            print(f"{key}: {us:.2f} us")
        return 0
    outcomes = collect()
    text = render(outcomes)
    unexpected = [o.case.name for o in outcomes if not o.matches]
    if args.out is None:
        sys.stdout.write(text)
    elif args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is out of date: run blockfp8 reliability --out {args.out}")
            return 1
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out} ({len(outcomes)} cases)")
    if unexpected:
        print(f"{len(unexpected)} case(s) did not do what they declare: {', '.join(unexpected)}", file=sys.stderr)
        return 1
    return 0


