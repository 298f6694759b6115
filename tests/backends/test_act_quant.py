"""The fused Triton activation quantizer equals the torch quantizer bit for bit, in every scale layout."""

import pytest
import torch

from blockfp8 import quantize_activation
from blockfp8.backends.triton import act_quant, launch
from blockfp8.backends.triton.act_quant import quantize_activation_fused
from blockfp8.format import empty_scales
from blockfp8.testing import default_device

DEVICE = default_device()


# A row of the smallest magnitudes the input dtype holds: 1e-30 (fp32's subnormal range, below AMAX_FLOOR: the
# floor scale, zeros out) in bf16 and fp32; fp16 stops at 2^-24, so there the row lies in its subnormal range
# (2^-24..2^-14) instead, which still quantizes with a scale of its own.
TINY = {torch.float16: 2.0**-20}


def _input(m, k, dtype):
    x = torch.randn(m, k, device=DEVICE) * torch.exp(3 * torch.randn(m, 1, device=DEVICE))
    if k > 128:
        x[0, :128] = 0.0  # an all-zero group: scale floor, zeros out
    x[-1, -1] = -0.0
    if m > 2:
        x[1] = torch.randn(k, device=DEVICE) * TINY.get(dtype, 1e-30)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("m,k", [(1, 128), (3, 1000), (17, 7168), (64, 200)])
def test_bit_exact(dtype, layout, ue8m0, m, k):
    x = _input(m, k, dtype)
    assert torch.isfinite(x).all()
    if m > 2:
        assert (x[1] != 0).any(), "the tiny row underflowed to zeros"
    q_ref, s_ref = quantize_activation(x, ue8m0=ue8m0)
    q, s = quantize_activation_fused(x, ue8m0=ue8m0, layout=layout)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), "fp8 bytes differ"
    assert torch.equal(s, s_ref)
    if layout == "col":
        assert s.stride() == (1, (m + 3) // 4 * 4)


def test_empty_scales_layouts():
    assert empty_scales(5, 3, "row", "cpu").stride() == (3, 1)
    assert empty_scales(5, 3, "col", "cpu").stride() == (1, 8)
    with pytest.raises(ValueError, match="layout"):
        empty_scales(5, 3, "diagonal", "cpu")


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("m,rows", [(1, 4), (3, 4), (5, 8), (4, 4)])
def test_rows_pad_with_zeros_and_finite_scales(layout, m, rows):
    x = _input(m, 300, torch.bfloat16)
    q_ref, s_ref = quantize_activation(x)
    q, s = quantize_activation_fused(x, layout=layout, rows=rows)
    assert q.shape == (rows, 300) and s.shape == (rows, 3)
    assert torch.equal(q[:m].view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s[:m], s_ref)
    assert not q[m:].float().any(), "padding rows must quantize to zeros"
    assert torch.isfinite(s[m:]).all() and (s[m:] > 0).all()
    if layout == "col":
        assert s.stride() == (1, rows)


def test_rows_below_m_is_refused():
    with pytest.raises(ValueError, match="rows"):
        quantize_activation_fused(_input(5, 128, torch.bfloat16), rows=4)


@pytest.mark.parametrize("per_prog", [1, 2, 4, 8])
def test_every_split_of_a_row_is_the_same_bits(monkeypatch, per_prog):
    # K = 1000: 8 groups, the last one partial; 1-8 groups per program all give the torch quantizer's bytes.
    x = _input(3, 1000, torch.bfloat16)
    monkeypatch.setattr(act_quant, "groups_on", lambda m, kb, device, most, warps: per_prog)
    q, s = quantize_activation_fused(x, layout="col")
    q_ref, s_ref = quantize_activation(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)


# One 128-group whose amax is 448 (so its scale is exactly 1 and x / scale = x): ties between neighbouring e4m3 values,
# normal and subnormal, each with the byte round-to-nearest-even gives. Subnormal e4m3 is m * 2^-9 (byte m).
TIES = [(448.0, 0x7E), (1.0625, 0x38), (1.1875, 0x3A), (-1.0625, 0xB8), (3 * 2.0**-10, 0x02), (5 * 2.0**-10, 0x02),
        (2.0**-10, 0x00), (-(2.0**-10), 0x80), (7 * 2.0**-10, 0x04), (0.0, 0x00)]
HW_CAST = [False, pytest.param(True, marks=pytest.mark.skipif(DEVICE != "cuda", reason="a GPU's conversion"))]


@pytest.mark.parametrize("hw_cast", HW_CAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ties_round_to_even_in_bits_and_in_the_hardware_conversion(monkeypatch, hw_cast, dtype):
    monkeypatch.setattr(launch, "HW_FP8_CAST", hw_cast)
    x = torch.zeros(2, 128, device=DEVICE)
    x[:, : len(TIES)] = torch.tensor([v for v, _ in TIES])
    q, s = quantize_activation_fused(x.to(dtype))
    assert torch.equal(s, torch.ones_like(s))
    assert q[:, : len(TIES)].view(torch.uint8).tolist() == [[b for _, b in TIES]] * 2
    assert torch.equal(q.view(torch.uint8), quantize_activation(x.to(dtype))[0].view(torch.uint8))


@pytest.mark.skipif(DEVICE != "cuda", reason="the hardware fp8 conversion runs on a GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_hardware_fp8_cast_gives_the_same_bytes(monkeypatch, dtype, ue8m0):
    monkeypatch.setattr(launch, "HW_FP8_CAST", True)
    for m, k in [(1, 128), (3, 1000), (17, 7168), (64, 200)]:
        x = _input(m, k, dtype)
        q_ref, s_ref = quantize_activation(x, ue8m0=ue8m0)
        q, s = quantize_activation_fused(x, ue8m0=ue8m0, layout="col")
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), (m, k)
        torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
