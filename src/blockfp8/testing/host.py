"""Host time per call in eager mode (``blockfp8 bench --host``): what a Python loop calling a layer pays per
call, for ``F.linear`` in bf16 and for blockfp8's layer and functional API on the same shape, measured in one run."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..nn import Fp8BlockLinear
from ..ops import linear
from ..quant import dequantize_weight
from .operands import random_activation, random_fp8_weight
from .shapes import Shape
from .timing import host_time_us


@dataclass
class HostRow:
    shape: str
    n: int
    k: int
    m: int
    bf16_us: float  # F.linear, bf16 weight
    layer_us: float  # Fp8BlockLinear.forward (plans kept by the layer)
    linear_us: float  # blockfp8.linear (functional, full checks every call)
    backend: str

    @property
    def ratio(self) -> float:
        """Fp8BlockLinear's host time over F.linear's."""
        return self.layer_us / self.bf16_us

    def to_json(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def _row(shape: Shape, m: int, layer: Fp8BlockLinear, wb: torch.Tensor, device: torch.device, calls: int,
         runs: int) -> HostRow:
    x = random_activation(m, shape.k, device=device)
    wq, ws = layer.weight, layer.weight_scale_inv
    with torch.inference_mode():
        layer(x)
        plan = next(reversed(layer._plans._plans.values()))[1]  # the one this M just built
        return HostRow(shape.name, shape.n, shape.k, m,
                       bf16_us=host_time_us(lambda: F.linear(x, wb), device, calls, runs),
                       layer_us=host_time_us(lambda: layer(x), device, calls, runs),
                       linear_us=host_time_us(lambda: linear(x, wq, ws), device, calls, runs),
                       backend=plan.backend.name)


def measure_host(shapes: list[Shape], ms: list[int], device: torch.device, calls: int = 2000,
                 runs: int = 5) -> list[HostRow]:
    """One ``HostRow`` per (shape, M), under ``torch.inference_mode`` as a generate loop runs."""
    rows = []
    for shape in shapes:
        wq, ws = random_fp8_weight(shape.n, shape.k, device=device)
        wb = dequantize_weight(wq, ws, dtype=torch.bfloat16)
        layer = Fp8BlockLinear.from_fp8(wq, ws, None)
        rows += [_row(shape, m, layer, wb, device, calls, runs) for m in ms]
    return rows
