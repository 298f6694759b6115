"""DeepGEMM's SM90 block-FP8 GEMM (``deep_gemm.fp8_gemm_nt``), from the optional ``deepinfer-gemm`` package.

Measured on H100 with DeepGEMM 2.8.2 (benchmarks/probe_peers.py, benchmarks/probe_h100.json, 350 cells):
correct for every M tried (1..300), for N in {8, 16, 32, 64, 96, 200, 576, 2112, 7168} and K in
{128, 256, 1008, 1024, 1088, 7168}; it refuses (assertion ``num_gmem_outer_stride_bytes % 16 == 0``) every
K % 16 != 0 (the fp8 row stride) and N=130 (the bf16 output row stride, so N % 8 != 0). So the real rule is
N % 8 == 0 and K % 16 == 0 -- looser than the N % 64 / K % 128 rule engines use, and it never returned a
wrong result. Activation scales in the TMA-aligned column-major layout skip its per-call transpose kernel.

With PDL on (``triton.launch.PDL``: by default on the verified Triton releases, or ``BLOCKFP8_PDL=1``), DeepGEMM's
kernels are launched with programmatic dependent launch too (``deep_gemm.set_pdl``, a process-wide DeepGEMM
setting, turned on at the first call): its SM90 GEMMs set up their barriers while the quantizer before them still
runs and wait for it before reading anything.
"""

from __future__ import annotations

import torch

from ..device import on_device_of
from .base import HOPPER_ONLY, YES, Backend, Limits, Support, add_bias
from .triton import launch

_pdl_set = False


def _set_pdl(deep_gemm) -> None:
    global _pdl_set
    set_pdl = getattr(deep_gemm, "set_pdl", None)  # DeepGEMM releases without it launch as before
    if set_pdl is not None:
        set_pdl(True)
    _pdl_set = True


class DeepGemmBackend(Backend):
    def probe(self) -> Support:
        if not torch.cuda.is_available():
            return Support(False, "no CUDA device")
        try:
            import deep_gemm  # noqa: F401
        except ImportError:
            return Support(False, "deep_gemm not installed (pip install 'blockfp8[deepgemm]')")
        return YES

    def run(self, x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, out=None) -> torch.Tensor:
        import deep_gemm

        if launch.PDL and not _pdl_set:
            _set_pdl(deep_gemm)
        y = torch.empty(x_fp8.shape[0], w_fp8.shape[0], dtype=out_dtype, device=x_fp8.device) if out is None else out
        with on_device_of(x_fp8):  # DeepGEMM launches on the current device's stream
            deep_gemm.fp8_gemm_nt((x_fp8, x_scale), (w_fp8, weight_scale_inv), y, disable_ue8m0_cast=True)
        return add_bias(y, bias, out)


BACKEND = DeepGemmBackend(
    name="deepgemm",
    limits=Limits(
        **HOPPER_ONLY,
        n_multiple=8,
        k_multiple=16,
        out_dtypes=(torch.bfloat16,),
        evidence="benchmarks/probe_h100.json (H100, DeepGEMM 2.8.2): K%16 and N%8 required, all M correct",
    ),
    scale_layout="col",
    external=True,
    bias_epilogue=False,  # add_bias: a second bf16 rounding
)
