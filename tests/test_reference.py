"""The ground-truth GEMM against an independent float64 computation."""

import pytest
import torch

from blockfp8 import quantize_activation, quantize_weight, reference_gemm, rel_error
from blockfp8.testing.conformance import tolerance_for
from blockfp8.testing.operands import random_weight


def _float64_gemm(xq, xs, wq, ws, bias=None):
    """Independent of quant.py: expand scales by explicit loops over blocks, in float64."""
    m, k = xq.shape
    n = wq.shape[0]
    x = xq.to(torch.float64)
    w = wq.to(torch.float64)
    for g in range((k + 127) // 128):
        x[:, g * 128:(g + 1) * 128] *= xs[:, g : g + 1].to(torch.float64)
        for b in range((n + 127) // 128):
            w[b * 128:(b + 1) * 128, g * 128:(g + 1) * 128] *= float(ws[b, g])
    y = x @ w.T
    return y + bias.to(torch.float64) if bias is not None else y


# (256, 256) and (300, 300): square 2 x 2 and 3 x 3 scale grids, where a transposed grid has the right shape.
@pytest.mark.parametrize("m,n,k", [(1, 8, 100), (5, 130, 1000), (33, 200, 257), (4, 576, 2048), (7, 256, 256),
                                   (3, 300, 300)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_matches_float64(m, n, k, out_dtype):
    xq, xs = quantize_activation(torch.randn(m, k))
    # Every 128 x 128 block with its own magnitude, so a scale applied to the wrong block cannot hide.
    wq, ws = quantize_weight(random_weight(n, k, spread=2.0) * 0.1)
    bias = torch.randn(n)
    got = reference_gemm(xq, xs, wq, ws, bias, out_dtype)
    want = _float64_gemm(xq, xs, wq, ws, bias)
    assert got.dtype == out_dtype and got.shape == (m, n)
    # Rounded to the output dtype, the fp32 sum and the float64 one differ only where a rounding flips.
    assert rel_error(got, want.to(out_dtype)) <= tolerance_for(want.to(out_dtype))
    assert rel_error(got.double(), want) < {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 5e-3}[out_dtype]


def test_reference_batched_leading_dims():
    xq, xs = quantize_activation(torch.randn(2, 3, 256))
    wq, ws = quantize_weight(torch.randn(64, 256))
    out = reference_gemm(xq, xs, wq, ws)
    flat = reference_gemm(xq.reshape(6, 256), xs.reshape(6, 2), wq, ws)
    assert out.shape == (2, 3, 64) and torch.equal(out.reshape(6, 64), flat)


def test_rel_error_is_relative_frobenius():
    ref = torch.tensor([[3.0, 4.0]])
    assert rel_error(torch.tensor([[3.0, 4.5]]), ref) == pytest.approx(0.1)
    assert rel_error(ref, ref) == 0.0
