"""GEMM backends, one module each, imported lazily so a missing optional peer never breaks import.

Adding a backend: write ``backends/<name>.py`` defining ``BACKEND`` (a ``base.Backend``) and add one line to
``_MODULES``. This registry is the one list of backends; everything else derives from it.
"""

from __future__ import annotations

import importlib

from .base import Backend, Limits, Problem, Support

_MODULES = {
    "reference": "blockfp8.backends.reference",
    "triton": "blockfp8.backends.triton",
    "cublas": "blockfp8.backends.cublas",
    "deepgemm": "blockfp8.backends.deepgemm",
    "gluon": "blockfp8.backends.gluon",
}

_LOADED: dict[str, Backend] = {}


def backend_names() -> tuple[str, ...]:
    """Every registered backend, available here or not."""
    return tuple(_MODULES)


def get_backend(name: str) -> Backend:
    """The backend object for ``name`` (ValueError for an unknown name)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_MODULES)}")
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(_MODULES[name]).BACKEND
    return _LOADED[name]


__all__ = ["Backend", "Limits", "Problem", "Support", "backend_names", "get_backend"]
