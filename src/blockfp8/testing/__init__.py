"""What checks and measures blockfp8, shared by the tests, ``blockfp8 check``/``bench``/``tune`` and the demos.

Never imported by the library itself. One of each: the operand generator (``operands``), the CUDA-graph
timer and hardware ceilings (``timing``), the environment record (``environment``), the shape sets
(``shapes``), and the status vocabulary below.
"""

from __future__ import annotations


class Status:
    """What happened to one method on one problem, the same words in ``check``, ``bench`` and ``tune``."""

    OK = "ok"  # ran, result within tolerance of the reference
    WRONG = "wrong"  # ran, result outside tolerance
    CRASHED = "crashed"  # raised an exception
    REFUSED = "refused"  # its declared limits exclude the problem
    UNAVAILABLE = "unavailable"  # not installed, or no device for it here

    ALL = (OK, WRONG, CRASHED, REFUSED, UNAVAILABLE)
    BAD = (WRONG, CRASHED)  # a method that claims a problem and gets this has a bug


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu" (where Triton kernels run under the interpreter)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
