"""Host time per call in eager mode (``blockfp8 bench --host``): what a Python loop calling a layer pays per
call, for ``nn.Linear`` / ``F.linear`` in bf16 and for blockfp8's layer (without and with autograd) and functional
API on the same shape, measured in one run."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..nn import Fp8BlockLinear
from ..ops import PLANS, gemm, linear
from ..quant import dequantize_weight, quantize_activation
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
    module_us: float  # nn.Linear.forward, bf16 weight
    layer_us: float  # Fp8BlockLinear.forward
    layer_grad_us: float  # Fp8BlockLinear.forward with autograd on (the input requires grad)
    module_grad_us: float  # nn.Linear.forward with autograd on
    linear_us: float  # blockfp8.linear (functional, full input checks every call)
    gemm_us: float  # blockfp8.gemm on an activation already quantized
    backend: str

    @property
    def ratio(self) -> float:
        """Fp8BlockLinear's host time over nn.Linear's (both modules, no autograd)."""
        return self.layer_us / self.module_us

    @property
    def grad_ratio(self) -> float:
        """Fp8BlockLinear's host time with autograd on over its time without."""
        return self.layer_grad_us / self.layer_us

    def to_json(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "grad_ratio": self.grad_ratio}


def _row(shape: Shape, m: int, layer: Fp8BlockLinear, lin: torch.nn.Linear, device: torch.device, calls: int,
         runs: int) -> HostRow:
    x = random_activation(m, shape.k, device=device)
    x_grad = x.clone().requires_grad_()
    wq, ws = layer.weight, layer.weight_scale_inv
    xq, xs = quantize_activation(x)
    with torch.enable_grad():
        layer_grad = host_time_us(lambda: layer(x_grad), device, calls, runs)
        module_grad = host_time_us(lambda: lin(x_grad), device, calls, runs)
    with torch.inference_mode():
        layer(x)
        plan = PLANS.plans_of(wq)[-1]  # the one this M just built
        return HostRow(shape.name, shape.n, shape.k, m,
                       bf16_us=host_time_us(lambda: F.linear(x, lin.weight), device, calls, runs),
                       module_us=host_time_us(lambda: lin(x), device, calls, runs),
                       layer_us=host_time_us(lambda: layer(x), device, calls, runs),
                       layer_grad_us=layer_grad, module_grad_us=module_grad,
                       linear_us=host_time_us(lambda: linear(x, wq, ws), device, calls, runs),
                       gemm_us=host_time_us(lambda: gemm(xq, xs, wq, ws), device, calls, runs),
                       backend=plan.backend.name)


def measure_host(shapes: list[Shape], ms: list[int], device: torch.device, calls: int = 2000,
                 runs: int = 5) -> list[HostRow]:
    """One ``HostRow`` per (shape, M): no-grad calls under ``torch.inference_mode`` as a generate loop runs them,
    autograd calls on an input that requires grad (an adapter trained on an FP8 base)."""
    rows = []
    for shape in shapes:
        wq, ws = random_fp8_weight(shape.n, shape.k, device=device)
        lin = torch.nn.Linear(shape.k, shape.n, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
        with torch.no_grad():
            lin.weight.copy_(dequantize_weight(wq, ws, dtype=torch.bfloat16))
        layer = Fp8BlockLinear.from_fp8(wq, ws, None)
        rows += [_row(shape, m, layer, lin, device, calls, runs) for m in ms]
    return rows
