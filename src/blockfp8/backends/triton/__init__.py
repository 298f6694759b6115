"""blockfp8's own Triton backend: the block-FP8 GEMM (``gemm.py``), its launch configs (``configs.py``) and the
fused activation quantizer (``act_quant.py``). Correct for every M, N, K; on CPU it runs under the Triton
interpreter (``TRITON_INTERPRET=1``, read when this package is imported)."""

from __future__ import annotations

import torch

from ..base import Backend, Limits
from .gemm import TritonGemmPlan, triton_gemm
from .launch import INTERPRET


class TritonBackend(Backend):
    def run(self, x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, out=None) -> torch.Tensor:
        return triton_gemm(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, out=out)

    def plan(self, w_fp8, weight_scale_inv, bias, out_dtype, m) -> TritonGemmPlan:
        return TritonGemmPlan(w_fp8, weight_scale_inv, bias, out_dtype, m)


BACKEND = TritonBackend(
    name="triton",
    # FP8 tensor-core dot needs sm_89+. On CPU only under the Triton interpreter (TRITON_INTERPRET=1).
    limits=Limits(
        device_types=("cpu", "cuda") if INTERPRET else ("cuda",),
        min_arch=(8, 9),
        evidence="masked tails in M, N, K; tested over the edge-shape sweep on CPU (interpreter) and H100",
        cpu_hint="set TRITON_INTERPRET=1 before importing blockfp8 to run it on the CPU (slow; for testing)",
    ),
    scale_layout="col",
)
