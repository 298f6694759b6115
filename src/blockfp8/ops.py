"""Public functional API: ``gemm`` (fp8 in) and ``linear`` (float in), both routed by the dispatcher.

Both are ``torch.library`` custom ops (``torch.ops.blockfp8.gemm`` / ``torch.ops.blockfp8.linear``) with
fake implementations, so ``torch.compile(fullgraph=True)`` treats them as single opaque nodes: the
dispatcher runs inside the op with concrete shapes, never in traced code, and CUDA-graph capture records
whatever kernels it picked. Input checks run before the op and look only at metadata.

The op is assembled here: the dispatcher names a backend, and ``quantize_for`` picks the activation
quantizer that writes the scale layout that backend reads.
"""

from __future__ import annotations

import math

import torch

from .backends import Backend, Problem, get_backend
from .dispatch import Operands, check_backend_name, choose
from .quant import quantize_activation
from .validate import check_gemm_input, check_linear_input


def _rows(shape: torch.Size) -> int:
    return math.prod(shape[:-1])


def _pick(m: int, n: int, k: int, t: torch.Tensor, out_dtype: torch.dtype, backend: str,
          operands: Operands | None = None) -> Backend:
    p = Problem.of(m, n, k, t.device, out_dtype)
    return get_backend(choose(p, backend or None, operands))


def quantize_for(be: Backend, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize 2-D float ``x`` per 1x128 group straight into the scale layout ``be`` reads: the fused Triton
    quantizer on CUDA, the torch quantizer elsewhere (both bit-identical)."""
    if x.is_cuda:
        # Imported on first CUDA use, like every kernel module: Triton reads TRITON_INTERPRET when a kernel is
        # defined, and the command line sets it (on machines without a GPU) after `import blockfp8`.
        from .backends.triton.act_quant import quantize_activation_fused

        return quantize_activation_fused(x, layout=be.scale_layout)
    return quantize_activation(x)


@torch.library.custom_op("blockfp8::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    # The operands are built only if online tuning measures this cell (its first call, when tuning is on).
    be = _pick(m, n, k, x, x.dtype, backend, lambda: (*quantize_activation(x2), weight, weight_scale_inv))
    xq, xs = quantize_for(be, x2)
    return be.run(xq, xs, weight, weight_scale_inv, bias, x.dtype).reshape(*x.shape[:-1], n)


@_linear_op.register_fake
def _linear_fake(x, weight, weight_scale_inv, bias, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("blockfp8::gemm", mutates_args=())
def _gemm_op(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    n, k = weight.shape
    lead = x_fp8.shape[:-1]
    m = _rows(x_fp8.shape)
    if m == 0:
        return x_fp8.new_empty(*lead, n, dtype=out_dtype)
    # cuBLAS and DeepGEMM need x row-major; a strided x_fp8 is copied here (M*K bytes, what they read anyway).
    x2 = x_fp8.reshape(m, k).contiguous()
    xs = x_scale.reshape(m, -1)
    be = _pick(m, n, k, x_fp8, out_dtype, backend, lambda: (x2, xs, weight, weight_scale_inv))
    out = be.run(x2, xs, weight, weight_scale_inv, bias, out_dtype)
    return out.reshape(*lead, n)


@_gemm_op.register_fake
def _gemm_fake(x_fp8, x_scale, weight, weight_scale_inv, bias, out_dtype, backend):
    return x_fp8.new_empty(*x_fp8.shape[:-1], weight.shape[0], dtype=out_dtype)


def gemm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
) -> torch.Tensor:
    """y[..., N] = dequant(x_fp8, x_scale) @ dequant(w_fp8, weight_scale_inv).T (+ bias), in ``out_dtype``.

    ``x_fp8`` is [..., K] float8_e4m3fn with fp32 ``x_scale`` [..., ceil(K/128)]; ``w_fp8`` is (N, K) with
    fp32 ``weight_scale_inv`` (ceil(N/128), ceil(K/128)). ``backend=None`` lets the dispatcher choose.
    """
    check_gemm_input(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype)
    check_backend_name(backend)
    return _gemm_op(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, backend or "")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Block-FP8 linear layer: quantize x [..., K] per 1x128 group, GEMM with the fp8 weight, add bias.

    The output has x's dtype (bf16, fp16 or fp32). ``backend=None`` lets the dispatcher choose.
    """
    check_linear_input(x, weight, weight_scale_inv, bias)
    check_backend_name(backend)
    return _linear_op(x, weight, weight_scale_inv, bias, backend or "")
