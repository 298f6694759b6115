"""The fused producer kernels equal quantize_activation of the unfused torch result, bit for bit: every dtype,
both scale layouts, UE8M0 on and off, K not a multiple of 128, and rows of zeros, NaN, Inf and extreme values."""

import pytest
import torch

from blockfp8 import quantize_activation
from blockfp8.backends.triton import launch, producers
from blockfp8.backends.triton.act_quant import groups_on, groups_per_program
from blockfp8.backends.triton.producers import rms_norm_quant_triton, silu_mul_quant_triton
from blockfp8.quant import rms_norm, silu_mul
from blockfp8.testing import default_device
from blockfp8.testing.operands import random_activation

DEVICE = default_device()
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's warnings on the NaN/Inf inputs
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 128), (3, 200), (5, 520)]


def _special_rows(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """Random rows with a magnitude per token, then (as far as m allows): an all-zero row, a row with a NaN, a
    row with +Inf and -Inf, a row of tiny values with one huge outlier; and a -0.0."""
    x = random_activation(m, k, seed=seed, device=DEVICE, dtype=torch.float32, spread=2.0)
    if m > 1:
        x[1] = 0.0
    if m > 2:
        x[2, k // 2] = float("nan")
    if m > 3:
        x[3, 0], x[3, -1] = float("inf"), float("-inf")
    if m > 4:
        x[4] *= 1e-3 if dtype == torch.float16 else 1e-20
        x[4, 1] = torch.finfo(dtype).max / 4
    x[0, -1] = -0.0
    return x.to(dtype)


def _assert_same(q, s, q_ref, s_ref):
    """Bit for bit, except that a NaN matches any NaN: IEEE leaves a NaN's sign and payload to the hardware."""
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    nan, nan_ref = torch.isnan(q.float()), torch.isnan(q_ref.float())
    assert torch.equal(nan, nan_ref), "NaN positions differ"
    assert torch.equal(q.view(torch.uint8)[~nan], q_ref.view(torch.uint8)[~nan]), "fp8 bytes differ"
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)


def _check_layout(s, m, layout):
    if layout == "col":
        assert s.stride() == (1, (m + 3) // 4 * 4)
    else:
        assert s.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("m,k", SHAPES)
def test_rms_norm_quant_bit_exact(dtype, layout, ue8m0, m, k):
    x = _special_rows(m, k, dtype)
    w = random_activation(k, 1, seed=5, device=DEVICE, dtype=dtype).view(k)
    q, s, h = rms_norm_quant_triton(x, w, 1e-6, None, layout, ue8m0)
    assert h is None
    _assert_same(q, s, *quantize_activation(rms_norm(x, w, 1e-6), ue8m0=ue8m0))
    _check_layout(s, m, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("m,k", SHAPES)
def test_rms_norm_quant_with_residual_bit_exact(dtype, layout, m, k):
    x = _special_rows(m, k, dtype)
    res = random_activation(m, k, seed=3, device=DEVICE, dtype=dtype)
    w = torch.rand(k, device=DEVICE) + 0.5  # an fp32 weight with bf16/fp16 activations, as some models keep it
    q, s, h = rms_norm_quant_triton(x, w, 1e-5, res, layout, False)
    y_ref, h_ref = rms_norm(x, w, 1e-5, res)
    assert h.dtype == dtype and torch.equal(h.view(torch.uint8), h_ref.view(torch.uint8))
    _assert_same(q, s, *quantize_activation(y_ref))


def test_rms_norm_quant_at_the_deepseek_hidden_size_and_on_strided_rows():
    # K = 7168 (56 groups, the widest tile); rows of a wider tensor, like the latents split off fused_qkv_a.
    wide = random_activation(2, 7168 + 576, device=DEVICE, spread=3.0)
    x = wide[:, :7168]
    w = random_activation(7168, 1, seed=9, device=DEVICE).view(7168)
    q, s, _ = rms_norm_quant_triton(x, w, 1e-6, None, "col", False)
    _assert_same(q, s, *quantize_activation(rms_norm(x, w, 1e-6)))


def test_groups_per_program_spreads_few_rows_over_the_sms():
    # K = 7168 (56 groups) on 132 SMs. The RMSNorm producer's 16-warp programs (most = 64, the whole row's tile)
    # aim at one per SM and split rows until M = 100; the quantizer's and the SiLU-mul's 4-warp programs (most = 8)
    # aim at four per SM and take 8 groups from M = 64 up.
    assert [groups_per_program(m, 56, 132, 64) for m in (1, 2, 16, 64, 66, 100, 512)] == [1, 1, 8, 32, 32, 64, 64]
    assert [groups_per_program(m, 56, 528, 8) for m in (1, 9, 10, 16, 64, 4096)] == [1, 1, 2, 2, 8, 8]
    assert groups_per_program(1, 1, 132, 8) == 1 and groups_per_program(7, 5, 0, 8) == 8
    assert groups_per_program(4096, 5, 132, 64) == 8  # never past the row's own tile
    cpu = torch.device("cpu")  # sized as on an H100's 132 SMs
    assert [groups_on(16, 56, cpu, 64, 16), groups_on(16, 56, cpu, 8, 4), groups_on(64, 16, cpu, 8, 4)] == [8, 2, 2]


@pytest.mark.parametrize("chunk", [1, 2, 4, 8])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_quant_is_the_same_bits_however_rows_are_split(monkeypatch, chunk, residual):
    # K = 520: 5 groups in an 8-group tile, so chunk 8 is one program per row and chunk 4's second program holds
    # the partial group; every program of a split row must compute the same rstd and store only its own groups.
    m, k = 5, 520
    x = _special_rows(m, k, torch.bfloat16)
    res = random_activation(m, k, seed=3, device=DEVICE, dtype=torch.bfloat16) if residual else None
    w = random_activation(k, 1, seed=5, device=DEVICE, dtype=torch.bfloat16).view(k)
    monkeypatch.setattr(producers, "groups_on", lambda m, kb, device, most, warps: chunk)
    q, s, h = rms_norm_quant_triton(x, w, 1e-6, res, "col", False)
    y_ref, h_ref = rms_norm(x, w, 1e-6, res) if residual else (rms_norm(x, w, 1e-6), None)
    _assert_same(q, s, *quantize_activation(y_ref))
    if residual:
        assert torch.equal(h.view(torch.uint8), h_ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("m,k", SHAPES)
def test_silu_mul_quant_bit_exact(dtype, layout, ue8m0, m, k):
    gate = _special_rows(m, k, dtype) * 4  # |gate| up to ~100: SiLU's saturated tails and exp's range ends
    up = _special_rows(m, k, dtype, seed=2)
    gate_up = torch.cat([gate, up], -1)
    q, s = silu_mul_quant_triton(gate_up, layout, ue8m0)
    _assert_same(q, s, *quantize_activation(silu_mul(gate_up), ue8m0=ue8m0))
    _check_layout(s, m, layout)


def test_silu_mul_quant_over_the_whole_exp_range():
    # Every gate from -100 to 100 in fine steps: the exp's cutoffs (EXP_LO/EXP_HI), its range reduction and the
    # subnormal-free scaling are all crossed; the rows of a gate_up view with a padded row stride.
    gate = torch.linspace(-100, 100, 4 * 640, device=DEVICE).view(4, 640)
    buf = torch.zeros(4, 2 * 640 + 32, device=DEVICE)
    buf[:, :640], buf[:, 640:1280] = gate, 1.0
    gate_up = buf[:, :1280]
    q, s = silu_mul_quant_triton(gate_up, "row", False)
    _assert_same(q, s, *quantize_activation(silu_mul(gate_up)))


def test_zero_rows_and_empty_batches():
    x = torch.zeros(3, 300, device=DEVICE, dtype=torch.bfloat16)
    q, s, _ = rms_norm_quant_triton(x, torch.ones(300, device=DEVICE), 0.0, None, "row", False)
    # eps = 0 on an all-zero row: rstd = 1/0 = inf and 0 * inf = NaN, in the kernel as in torch.
    assert torch.isnan(s).all()
    q, s = silu_mul_quant_triton(torch.zeros(0, 256, device=DEVICE), "col", False)
    assert q.shape == (0, 128) and s.shape == (0, 1)
    q, s, h = rms_norm_quant_triton(torch.zeros(0, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-6,
                                    torch.zeros(0, 64, device=DEVICE), "row", False)
    assert q.shape == (0, 64) and s.shape == (0, 1) and h.shape == (0, 64)


@pytest.mark.skipif(DEVICE != "cuda", reason="the hardware fp8 conversion runs on a GPU only")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("m,k", SHAPES + [(64, 7168)])
def test_hardware_fp8_cast_gives_the_same_bytes(monkeypatch, dtype, ue8m0, m, k):
    """BLOCKFP8_HW_FP8_CAST: the GPU's conversion rounds the clamped quotients itself; the same bytes as the bit
    arithmetic, NaN, Inf, zeros and tiny rows included."""
    monkeypatch.setattr(launch, "HW_FP8_CAST", True)
    x = _special_rows(m, k, dtype)
    w = random_activation(k, 1, seed=5, device=DEVICE, dtype=dtype).view(k)
    res = random_activation(m, k, seed=3, device=DEVICE, dtype=dtype)
    q, s, _ = rms_norm_quant_triton(x, w, 1e-6, None, "col", ue8m0)
    _assert_same(q, s, *quantize_activation(rms_norm(x, w, 1e-6), ue8m0=ue8m0))
    q, s, h = rms_norm_quant_triton(x, w, 1e-6, res, "col", ue8m0)
    _assert_same(q, s, *quantize_activation(rms_norm(x, w, 1e-6, res)[0], ue8m0=ue8m0))
    gate_up = torch.cat([x * 4, _special_rows(m, k, dtype, seed=2)], -1)
    q, s = silu_mul_quant_triton(gate_up, "col", ue8m0)
    _assert_same(q, s, *quantize_activation(silu_mul(gate_up), ue8m0=ue8m0))
