"""What checks and measures blockfp8, shared by the tests, ``blockfp8 check``/``bench``/``tune`` and the demos.

Never imported by the library itself. One of each: the operand generator (``operands``), the CUDA-graph
timer and hardware ceilings (``timing``), the environment record (``environment``), the shape sets
(``shapes``), and the status vocabulary (``blockfp8.status``, re-exported here).
"""

from __future__ import annotations

from ..status import Status

__all__ = ["Status", "default_device"]


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu" (where Triton kernels run under the interpreter)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
