"""How blockfp8 launches its Triton kernels: the interpreter switch and its lock.

``TRITON_INTERPRET=1`` (read once, when this module is imported) runs kernels on the CPU in Triton's interpreter.
The interpreter keeps process-wide state (it patches ``triton.language`` and holds the current grid), so two
threads running kernels in it at once corrupt each other: interpreted launches are serialized here. Compiled
launches on a GPU need no lock (they only enqueue work on a stream).
"""

from __future__ import annotations

import contextlib
import os
import threading

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_INTERPRETER_LOCK = threading.Lock()


def launch_guard() -> contextlib.AbstractContextManager:
    """Hold this around a kernel launch: the interpreter's lock under TRITON_INTERPRET, nothing otherwise."""
    return _INTERPRETER_LOCK if INTERPRET else contextlib.nullcontext()
