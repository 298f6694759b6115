"""``blockfp8 reliability``: every bad input tried against the public API and the error it gets, printed as
the markdown table that docs/reliability.md holds (``testing.reliability``); ``--out`` writes it to a file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..testing.reliability import DEFAULT_OUT, collect, render, time_checks
from .common import write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help=f"write the markdown to this file instead of stdout (the committed copy: {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true",
                        help="with --out: write nothing, exit 1 if the file differs from the generated text")
    parser.add_argument("--time-checks", action="store_true", help="print the per-call cost of the checks")


def run(args: argparse.Namespace) -> int:
    if args.check and args.out is None:
        raise ValueError("--check compares a file with the generated text: name it with --out FILE")
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
        write_text(args.out, text)
        print(f"wrote {args.out} ({len(outcomes)} cases)")
    if unexpected:
        print(f"{len(unexpected)} case(s) did not do what they declare: {', '.join(unexpected)}", file=sys.stderr)
        return 1
    return 0
