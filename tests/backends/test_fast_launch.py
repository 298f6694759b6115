"""Relaunching compiled Triton kernels directly (backends/triton/launch.py) gives the same bytes as Triton's own
launch path, for every kind of call that could change a kernel's specialization: token counts around the
specialization boundaries (1, multiples of 16), weights with and without TMA (K % 16), activations with odd
strides and unaligned bases. GPU only: the interpreter never takes the fast path."""

from __future__ import annotations

import pytest
import torch

from blockfp8 import Fp8BlockLinear
from blockfp8.backends.triton import act_quant, launch
from blockfp8.backends.triton.gemm import TritonGemmPlan
from blockfp8.testing.operands import random_activation, random_fp8_weight

pytestmark = pytest.mark.gpu

SHAPES = [(2112, 7168), (7168, 2048), (130, 1000), (576, 7168)]
MS = [1, 2, 3, 15, 16, 17, 33, 64, 65, 130]


@pytest.fixture
def slow(monkeypatch):
    """Run the body with Triton's own launch path."""

    def use_slow(flag: bool) -> None:
        monkeypatch.setattr(launch, "FAST_LAUNCH", not flag)

    return use_slow


@pytest.mark.skipif(not launch.FAST_LAUNCH, reason="fast launches are off for this Triton version")
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemm_fast_equals_triton_launch(n, k, slow):
    wq, ws = random_fp8_weight(n, k, device="cuda")
    for m in MS:
        xq, xs = act_quant.quantize_activation_fused(random_activation(m, k, seed=m, device="cuda"), layout="col")
        plan = TritonGemmPlan(wq, ws, None, torch.bfloat16, m)
        slow(True)
        want = plan(xq, xs, wq, ws, None)
        slow(False)
        plan(xq, xs, wq, ws, None)  # compiles (or finds) the kernel for this key
        for _ in range(2):
            assert torch.equal(plan(xq, xs, wq, ws, None), want), f"M={m} N={n} K={k}"
        # Row-major scales: another key, same answer.
        xs_row = xs.contiguous()
        assert torch.equal(plan(xq, xs_row, wq, ws, None), want)


@pytest.mark.skipif(not launch.FAST_LAUNCH, reason="fast launches are off for this Triton version")
@pytest.mark.parametrize("k", [128, 1000, 7168])
def test_quantizer_fast_equals_triton_launch_with_odd_layouts(k, slow):
    base = random_activation(70, k + 8, device="cuda")
    for x in (base[:, :k], base[1:, 3:k + 3], base[:5, 8:].contiguous()[:, :k]):
        for layout in ("row", "col"):
            slow(True)
            want = act_quant.quantize_activation_fused(x, layout=layout)
            slow(False)
            for _ in range(3):
                got = act_quant.quantize_activation_fused(x, layout=layout)
                assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
                assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("n,k", SHAPES[:2])
def test_layer_eager_equals_the_op(n, k):
    wq, ws = random_fp8_weight(n, k, device="cuda")
    layer = Fp8BlockLinear.from_fp8(wq, ws, torch.randn(n, device="cuda", dtype=torch.bfloat16))
    for m in (1, 16, 64, 200):
        x = random_activation(m, k, seed=m, device="cuda")
        with torch.inference_mode():
            for _ in range(3):
                assert torch.equal(layer(x), torch.ops.blockfp8.linear(x, wq, ws, layer.bias, ""))


@pytest.mark.skipif(not launch.FAST_LAUNCH, reason="fast launches are off for this Triton version")
@pytest.mark.parametrize("k", [256, 1000, 4096])
def test_producers_fast_equal_triton_launch(k, slow):
    """The fused producers relaunched directly give Triton's own launch's bytes, over token counts, both scale
    layouts, a residual or none, and inputs with odd strides and unaligned bases."""
    from blockfp8.backends.triton import producers

    weight = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    base = random_activation(70, 2 * k + 8, device="cuda")
    for m in (1, 16, 17, 65):
        xs = (base[:m, :k], base[1:m + 1, 3:k + 3], base[:m, 8:8 + 2 * k].contiguous()[:, :k])
        for x in xs:
            for layout in ("row", "col"):
                for residual in (None, base[:m, k:2 * k]):
                    slow(True)
                    want = producers.rms_norm_quant_triton(x, weight, 1e-6, residual, layout)
                    slow(False)
                    for _ in range(2):
                        got = producers.rms_norm_quant_triton(x, weight, 1e-6, residual, layout)
                        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)), (m, k, layout)
                        assert torch.equal(got[1], want[1])
                        assert (got[2] is None) == (want[2] is None)
                        assert got[2] is None or torch.equal(got[2], want[2])
        for gate_up in (base[:m, :2 * k], base[1:m + 1, 3:2 * k + 3]):
            for layout in ("row", "col"):
                slow(True)
                want = producers.silu_mul_quant_triton(gate_up, layout)
                slow(False)
                for _ in range(2):
                    got = producers.silu_mul_quant_triton(gate_up, layout)
                    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)), (m, k, layout)
                    assert torch.equal(got[1], want[1])
