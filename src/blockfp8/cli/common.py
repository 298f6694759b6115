"""What every subcommand shares: argument parsing helpers."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def parse_names(spec: str | None, default: Iterable[str], allowed: Iterable[str] | None = None,
                name: str = "") -> list[str]:
    """A comma-separated list of names (``default`` when ``spec`` is None), each checked against ``allowed``."""
    values = list(default) if spec is None else [v.strip() for v in spec.split(",") if v.strip()]
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name} got {bad}; expected names from {list(allowed)}")
    return values


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive ints."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values
