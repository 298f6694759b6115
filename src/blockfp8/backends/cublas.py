"""cuBLAS blockwise FP8 GEMM through ``torch.nn.functional.scaled_mm`` (1x128 x 128x128 scaling).

Measured on H100 with torch 2.11 (benchmarks/probe_peers.py, benchmarks/probe_h100.json): cuBLAS refuses
M % 4 != 0 (CUBLAS_STATUS_NOT_SUPPORTED), N % 16 != 0 and K % 16 != 0 (torch shape checks); activation
scales must be (M, Kb) column-major; weight scales must be padded to a multiple of 4 K-blocks, given as
the (round_up(Kb, 4), Nb) transpose of a (Nb, round_up(Kb, 4)) row-major tensor. This backend pads M to a
multiple of 4 itself (so any M runs); weight scales need no copy when Kb % 4 == 0 (``_weight_scales``).
"""

from __future__ import annotations

import torch

from ..format import cdiv, empty_scales
from .base import HOPPER_ONLY, YES, Backend, GemmPlan, Limits, Support, add_bias


def _weight_scales(weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """The weight scales as cuBLAS reads them: the (Kb4, Nb) transpose of a row-major (Nb, Kb4) tensor, Kb4 =
    round_up(Kb, 4). A contiguous tensor with Kb % 4 == 0 (every DeepSeek-V3, Llama and Qwen shape) is that
    already and is passed as it is; others are padded per call (a small copy), never cached, so the scales a
    call reads -- or a CUDA graph replays -- are always the layer's current ones."""
    nb, kb = weight_scale_inv.shape
    if kb % 4 == 0 and weight_scale_inv.stride() == (kb, 1):
        return weight_scale_inv.t()
    padded = torch.ones(nb, cdiv(kb, 4) * 4, dtype=torch.float32, device=weight_scale_inv.device)
    padded[:, :kb] = weight_scale_inv
    return padded.t()


class CublasBackend(Backend):
    def probe(self) -> Support:
        if not torch.cuda.is_available():
            return Support(False, "no CUDA device")
        from torch.nn import functional as F

        if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
            return Support(False, f"torch {torch.__version__} has no torch.nn.functional.scaled_mm with blockwise "
                                  "scaling")
        return YES

    def run(self, x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, out=None) -> torch.Tensor:
        return _gemm(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, x_fp8.shape[0], out)

    def plan(self, w_fp8, weight_scale_inv, bias, out_dtype, m) -> GemmPlan:
        return CublasPlan(out_dtype, m)


class CublasPlan(GemmPlan):
    """cuBLAS at M rows: asks ``linear``'s quantizer for activations already padded to a multiple of 4 rows in
    the column-major scale layout (``rows``), so a decode call runs the quantizer and the GEMM only."""

    def __init__(self, out_dtype: torch.dtype, m: int) -> None:
        self.out_dtype, self.m = out_dtype, m
        self.rows = cdiv(m, 4) * 4 if m % 4 else None

    def __call__(self, x_fp8, x_scale, w_fp8, weight_scale_inv, bias, work=None, out=None) -> torch.Tensor:
        return _gemm(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, self.out_dtype, self.m, out)


def _gemm(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, weight_scale_inv: torch.Tensor,
          bias: torch.Tensor | None, out_dtype: torch.dtype, m: int, out: torch.Tensor | None) -> torch.Tensor:
    """y (m, N) from activations of m or more rows (rows past m are padding and never reach y)."""
    from torch.nn.functional import ScalingType, scaled_mm

    rows, k = x_fp8.shape
    m4 = cdiv(rows, 4) * 4
    if m4 != rows or x_scale.stride() != (1, m4):
        # Pad M to a multiple of 4 (cuBLAS refuses others) and lay the scales out column-major.
        a = x_fp8.new_zeros(m4, k) if m4 != rows else x_fp8
        if m4 != rows:
            a[:rows] = x_fp8
        s = empty_scales(m4, x_scale.shape[1], "col", x_fp8.device)
        s[:rows] = x_scale
        if m4 != rows:
            s[rows:] = 1.0
        x_fp8, x_scale = a, s
    y = scaled_mm(
        x_fp8, w_fp8.t(), x_scale, ScalingType.BlockWise1x128,
        _weight_scales(weight_scale_inv), ScalingType.BlockWise128x128, output_dtype=out_dtype,
    )
    # scaled_mm takes no output tensor: a caller's ``out`` gets a copy.
    return add_bias(y[:m], bias, out)


BACKEND = CublasBackend(
    name="cublas",
    limits=Limits(
        **HOPPER_ONLY,
        n_multiple=16,
        k_multiple=16,
        out_dtypes=(torch.bfloat16,),
        evidence="benchmarks/probe_h100.json (H100, torch 2.11+cu130): N%16, K%16 required; M padded to 4 here",
    ),
    scale_layout="col",
    external=True,
    bias_epilogue=False,  # add_bias: a second bf16 rounding
)
