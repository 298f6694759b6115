"""Named GEMM shape sets (``data/shapes.json``): DeepSeek-V3, its TP8 shards, Qwen3, and edge cases."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class Shape:
    n: int
    k: int
    name: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.n}x{self.k})" if self.name else f"{self.n}x{self.k}"


@cache
def _data() -> dict:
    return json.loads((resources.files("blockfp8") / "data" / "shapes.json").read_text())


def shape_sets() -> list[str]:
    """Names of the shipped shape sets."""
    return [k for k, v in _data().items() if isinstance(v, list) and v and isinstance(v[0], dict)]


def shape_set(name: str) -> list[Shape]:
    """The shapes of one named set, e.g. ``shape_set("deepseek-v3")``."""
    if name not in shape_sets():
        raise ValueError(f"unknown shape set {name!r}; one of {', '.join(shape_sets())}")
    return [Shape(d["N"], d["K"], d.get("name", "")) for d in _data()[name]]


def default_m_values() -> list[int]:
    return list(_data()["m_sweep"])


def parse_shapes(spec: str) -> list[Shape]:
    """Shapes from a comma-separated mix of set names and ``N:K`` pairs, e.g. ``"edge,2112:7168"``."""
    out: list[Shape] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if ":" in item:
            try:
                n, k = (int(v) for v in item.split(":"))
            except ValueError:
                raise ValueError(f"shape {item!r} is not N:K with integers N and K") from None
            if n <= 0 or k <= 0:
                raise ValueError(f"shape {item!r} needs positive N and K")
            out.append(Shape(n, k))
        elif item in shape_sets():
            out += shape_set(item)
        else:
            raise ValueError(f"unknown shape set {item!r}; use N:K pairs or one of {', '.join(shape_sets())}")
    return list(dict.fromkeys(out))


def parse_ints(spec: str, what: str = "M") -> list[int]:
    """``"1,16,64"`` -> [1, 16, 64], each a non-negative int."""
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} list {spec!r} must be comma-separated integers") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"{what} list {spec!r} must hold non-negative integers")
    return values


def load_shapes(spec: str) -> list[Shape]:
    """Shapes from a ``--shapes`` spec (set names and/or N:K pairs); unnamed ones are named "NxK"."""
    shapes = [s if s.name else replace(s, name=f"{s.n}x{s.k}") for s in parse_shapes(spec)]
    if not shapes:
        raise ValueError(f"--shapes {spec!r} names no shape")
    return shapes


def parse_m_values(spec: str | None) -> list[int]:
    """``--m`` as a list of positive token counts (default: the ``m_sweep`` of ``data/shapes.json``)."""
    ms = parse_ints(spec, "--m") if spec else default_m_values()
    if min(ms) < 1:
        raise ValueError(f"--m values must be >= 1, got {spec!r}")
    return ms
