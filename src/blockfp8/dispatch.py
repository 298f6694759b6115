"""The one place that decides which backend runs a block-FP8 GEMM.

Rule: the fastest backend that ``supports`` the problem. "Fastest" comes from a measured ranking table
(``data/dispatch_table.json``, keyed by device name, then "N,K", then the M it was measured at; written by
``blockfp8 bench --save-table`` on the device). A query uses the row measured at the smallest M >= its own
(else the largest). With no row for the shape, the static order below applies. Any backend that does not
support the problem is skipped, so a table can never route a shape to a kernel that cannot run it.

Overrides: ``backend=`` on the call, else the ``BLOCKFP8_BACKEND`` environment variable. An override that
cannot run the problem raises ``ValueError`` with the backend's reason -- never a silent fallback.

Choices are cached per (problem, override): on the hot path a call builds the small ``Problem`` record and
hits the cache (a few microseconds of host time, none of it inside a captured CUDA graph).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache, lru_cache

import torch

from .backends import Problem, Support, backend_names, get_backend
from .format import is_decode
from .tables import load_table, merge_tables, pick_row

ENV_VAR = "BLOCKFP8_BACKEND"
ENV_TABLE = "BLOCKFP8_DISPATCH_TABLE"

# Used when the table has no row for a shape. Decode (M <= 64) is a weight-streaming problem where the
# split-K Triton kernel keeps every SM loading weights; at larger M the peers' wgmma pipelines lead, and of
# blockfp8's own kernels the Gluon wgmma kernel (Hopper only) beats the Triton one on most DeepSeek-V3 shapes
# (docs/benchmarks.md). The reference is last everywhere on CUDA and the only fast choice on CPU.
STATIC_ORDER = {
    ("cuda", "decode"): ("triton", "deepgemm", "cublas", "reference"),
    ("cuda", "prefill"): ("deepgemm", "cublas", "gluon", "triton", "reference"),
    ("cpu", "decode"): ("reference", "triton"),
    ("cpu", "prefill"): ("reference", "triton"),
}


_GENERATION = [0]  # bumped whenever a cached choice may change; plans built under an older one are rebuilt


def generation() -> int:
    """A number that changes whenever the dispatcher forgets its cached choices (new table, new ranking)."""
    return _GENERATION[0]


@cache
def dispatch_table() -> dict:
    """device name -> "N,K" -> {measured M (str): [backend names, fastest first]}."""
    return load_table("dispatch_table.json", ENV_TABLE)


def ranking(p: Problem) -> tuple[tuple[str, ...], str]:
    """Backends in preference order for ``p`` and where that order came from."""
    device_name = p.device_name or p.device_type
    row = pick_row(dispatch_table(), device_name, p.n, p.k, p.m)
    if row:
        pick, ranked = row
        ranked = tuple(ranked)
        rest = tuple(b for b in backend_names() if b not in ranked)
        return ranked + rest, f"measured table ({device_name}, M={pick})"
    phase = "decode" if is_decode(p.m) else "prefill"
    order = STATIC_ORDER.get((p.device_type, phase), ("reference",))
    return order + tuple(b for b in backend_names() if b not in order), f"static order ({phase})"


def check_backend_name(backend: object, name: str = "backend") -> None:
    """None (the dispatcher chooses) or the name of a registered backend.

    Checked on every call, M=0 included, so a typo fails at once rather than on the first non-empty batch.
    Whether the named backend can run a given shape is decided later, by ``choose``, per problem.
    """
    if backend is None:
        return
    if not isinstance(backend, str):
        raise TypeError(f"{name} must be None or a backend name (str), got {type(backend).__name__} {backend!r}")
    if backend not in backend_names():
        raise ValueError(f"{name}={backend!r} is not a backend; expected None (automatic) or one of "
                         f"{', '.join(backend_names())}")


def _override(backend: str | None) -> str | None:
    if backend is not None:
        check_backend_name(backend)
        return backend
    name = os.environ.get(ENV_VAR) or None
    check_backend_name(name, ENV_VAR)
    return name


@lru_cache(maxsize=8192)
def _choose(p: Problem, override: str | None) -> str:
    if override is not None:
        verdict = get_backend(override).supports(p)
        if not verdict:
            raise ValueError(
                f"backend {override!r} was requested but cannot run M={p.m}, N={p.n}, K={p.k} on "
                f"{p.device_type} ({p.out_dtype}): {verdict.reason}"
            )
        return override
    order, _ = ranking(p)
    for name in order:
        if get_backend(name).supports(p):
            return name
    raise ValueError(f"no backend can run M={p.m}, N={p.n}, K={p.k} on {p.device_type}")


def choose(p: Problem, backend: str | None = None) -> str:
    """Name of the backend that runs ``p`` (``backend``/``BLOCKFP8_BACKEND`` force one)."""
    return _choose(p, _override(backend))


@dataclass
class Explanation:
    problem: Problem
    choice: str | None
    source: str
    order: tuple[str, ...]
    verdicts: dict[str, Support] = field(default_factory=dict)
    error: str = ""

    def __str__(self) -> str:
        p = self.problem
        lines = [f"M={p.m} N={p.n} K={p.k} on {p.device_type} -> {self.choice or 'error: ' + self.error}",
                 f"  ranking: {self.source}: {' > '.join(self.order)}"]
        for name in self.order:
            v = self.verdicts[name]
            lines.append(f"  {name:10s} {'supported' if v else 'refused: ' + v.reason}")
        return "\n".join(lines)


def explain(m: int, n: int, k: int, device: torch.device | str | None = None,
            out_dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> Explanation:
    """The dispatcher's choice for (M, N, K) on ``device`` and every backend's verdict with its reason."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return explain_problem(Problem.of(m, n, k, device, out_dtype), backend)


def explain_problem(p: Problem, backend: str | None = None) -> Explanation:
    """``explain`` for a ready-made ``Problem`` (also a fake device's, as the tests use)."""
    order, source = ranking(p)
    verdicts = {name: get_backend(name).supports(p) for name in order}
    try:
        return Explanation(p, choose(p, backend), source, order, verdicts)
    except ValueError as e:
        return Explanation(p, None, source, order, verdicts, str(e))


def record_ranking(device_name: str, n: int, k: int, m: int, order: list[str]) -> None:
    """Add one measured row to the in-memory table (``blockfp8 bench`` ranks each cell before timing the
    dispatched op, so the dispatched column uses the ranking measured in the same run)."""
    merge_tables(dispatch_table(), {device_name: {f"{n},{k}": {str(m): list(order)}}})
    _choose.cache_clear()
    _GENERATION[0] += 1


def clear_caches() -> None:
    """Forget cached choices and tables (after installing a peer or writing a new table)."""
    _choose.cache_clear()
    dispatch_table.cache_clear()
    _GENERATION[0] += 1
