"""The torch reference as a backend: any device, any shape; the CPU path and the ground truth."""

from __future__ import annotations

import torch

from ..reference import reference_gemm
from .base import Backend, Limits


class ReferenceBackend(Backend):
    def run(self, x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, out=None) -> torch.Tensor:
        y = reference_gemm(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype)
        return y if out is None else out.copy_(y)


BACKEND = ReferenceBackend(
    name="reference",
    # torch indexes with 64-bit offsets: no bound on operand sizes.
    limits=Limits(device_types=("cpu", "cuda"), max_elements=None,
                  evidence="dequantize + fp32 matmul; defines correctness"),
    # repeat_interleave (block scales to elements) synchronizes with the host on CUDA to size its output.
    capturable=False,
)
