"""The one place that decides which backend runs a block-FP8 GEMM.

Rule: the fastest backend that ``supports`` the problem. Which one is fastest comes from the first of:

1. this device's measured rows (``tables.lookup``): the shipped ``data/dispatch_table.json``, the user's tuning
   cache (``blockfp8 tune`` and online tuning write it; keyed by device, driver and library versions), rows
   recorded in this process, and ``BLOCKFP8_DISPATCH_TABLE`` -- merged in that order. A query uses the row
   measured at the smallest M >= its own of its phase (decode or prefill), else the largest of that phase;
2. online tuning, when on (``autotune.py``: ``BLOCKFP8_AUTOTUNE=1`` or ``set_autotune(True)``): the first call of
   a cell no row covers measures every backend on the call's own operands and writes the row of 1;
3. the nearest measured shape on this device or another device of its family (same compute capability and SM
   count, ``tables.nearest``), within 2x in N and in K;
4. the static rules of ``rules.py``, by M and weight size.

Any backend that does not support the problem (not installed, or its declared limits exclude the shape) is
skipped, so a table can never route a shape to a kernel that cannot run it: the next one in the order runs.

Overrides: ``backend=`` on the call, else the ``BLOCKFP8_BACKEND`` environment variable. An override that
cannot run the problem raises ``ValueError`` with the backend's reason -- never a silent fallback.

Below sm_89 no backend but the float32 reference runs (no FP8 tensor cores): the first such choice on a device
warns, once per device, so a slow model is never a silent surprise.

Choices are cached per (problem, override): on the hot path a call builds the small ``Problem`` record and
hits the cache (a few microseconds of host time, none of it inside a captured CUDA graph).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from . import autotune, tables
from .autotune import Operands, set_autotune
from .backends import Problem, Support, backend_names, get_backend
from .rules import MIN_FP8_ARCH, static_rule
from .validate import check_device, check_size

ENV_VAR = "BLOCKFP8_BACKEND"
ENV_TABLE = tables.KINDS["dispatch"][1]

__all__ = ["ENV_TABLE", "ENV_VAR", "Explanation", "Operands", "check_backend_name", "choose", "clear_caches", "explain",
           "explain_problem", "ranking", "record_ranking", "set_autotune"]

_warned_devices: set[str] = set()


_GENERATION = [0]  # bumped whenever a cached choice may change; plans built under an older one are rebuilt


def generation() -> int:
    """A number that changes whenever the dispatcher forgets its cached choices (new table, new ranking)."""
    return _GENERATION[0]


def _complete(order) -> tuple[str, ...]:
    """``order`` followed by every registered backend it does not name (they still run if nothing before does)."""
    order = tuple(order)
    return order + tuple(b for b in backend_names() if b not in order)


def ranking(p: Problem) -> tuple[tuple[str, ...], str]:
    """Backends in preference order for ``p`` and what decided that order (a table row, or a rule)."""
    dev = p.device_id
    row = tables.lookup("dispatch", dev, p.n, p.k, p.m)
    if row is not None:
        return _complete(row.value), row.describe()
    source = ""
    if p.device_type == "cuda":
        row = tables.nearest("dispatch", dev, p.n, p.k, p.m)
        if row is not None:
            source = f"nearest measured shape: {row.describe()}"
    order = row.value if row is not None else static_rule(p).order
    source = source or str(static_rule(p))
    note = autotune.skipped_note(p)
    if note:
        source += f"; online tuning did not run because {note}, so this is the untuned choice"
    return _complete(order), source


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


def _warn_reference_only(p: Problem) -> None:
    if p.device_type != "cuda" or p.arch is None or p.arch >= MIN_FP8_ARCH or p.device_name in _warned_devices:
        return
    _warned_devices.add(p.device_name)
    warnings.warn(
        f"blockfp8: {p.device_name or 'this GPU'} has compute capability {p.arch[0]}.{p.arch[1]}, and FP8 tensor "
        f"cores need {MIN_FP8_ARCH[0]}.{MIN_FP8_ARCH[1]} or newer (Ada, Hopper, Blackwell): block-FP8 linear layers "
        "on it run the float32 reference path (dequantize, then matmul). The results are correct but slower than "
        "the bf16 model; keep bf16 weights on this GPU for speed.", stacklevel=4)


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
            if name == "reference":
                _warn_reference_only(p)
            return name
    raise ValueError(f"no backend can run M={p.m}, N={p.n}, K={p.k} on {p.device_type}")


def choose(p: Problem, backend: str | None = None, operands: Operands | None = None) -> str:
    """Name of the backend that runs ``p`` (``backend``/``BLOCKFP8_BACKEND`` force one).

    ``operands`` (a callable returning the call's x_fp8, row-major x_scale, weight and weight_scale_inv) lets
    online tuning measure this cell on first use when it is on; without it the choice is never measured."""
    override = _override(backend)
    if override is None and operands is not None and autotune.wanted(p) and autotune.maybe_tune(p, operands):
        _choose.cache_clear()
    return _choose(p, override)


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
        lines = [f"M={p.m} N={p.n} K={p.k} on {p.device_name or p.device_type} -> "
                 f"{self.choice or 'error: ' + self.error}",
                 f"  decided by: {self.source}",
                 f"  ranking: {' > '.join(self.order)}"]
        for name in self.order:
            v = self.verdicts[name]
            lines.append(f"  {name:10s} {'supported' if v else 'refused: ' + v.reason}")
        return "\n".join(lines)


def explain(m: int, n: int, k: int, device: torch.device | str | None = None,
            out_dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> Explanation:
    """The dispatcher's choice for (M, N, K) on ``device``, what decided it, and every backend's verdict."""
    for value, name in ((m, "m"), (n, "n"), (k, "k")):
        check_size(value, name)
    check_backend_name(backend)
    device = check_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return explain_problem(Problem.of(m, n, k, device, out_dtype), backend)


def explain_problem(p: Problem, backend: str | None = None) -> Explanation:
    """``explain`` for a ready-made ``Problem`` (also a fake device's, as the tests use)."""
    order, source = ranking(p)
    verdicts = {name: get_backend(name).supports(p) for name in order}
    try:
        choice = choose(p, backend)
    except ValueError as e:
        return Explanation(p, None, source, order, verdicts, str(e))
    if _override(backend) is not None:
        source = f"forced ({'backend=' if backend else ENV_VAR + '='}{choice}); without it: {source}"
    return Explanation(p, choice, source, order, verdicts)


def record_ranking(device_name: str, n: int, k: int, m: int, order: list[str]) -> None:
    """Add one measured row to this process's tables (``blockfp8 bench`` ranks each cell before timing the
    dispatched op, so the dispatched column uses the ranking measured in the same run)."""
    tables.record("dispatch", device_name, n, k, m, list(order))
    _choose.cache_clear()
    _GENERATION[0] += 1


def clear_caches() -> None:
    """Forget cached choices, the rows recorded in this process and every cached table (after installing a peer,
    writing a table or changing a variable)."""
    _choose.cache_clear()
    tables.forget_recorded()
    autotune.forget()
    _GENERATION[0] += 1
