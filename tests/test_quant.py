import pytest
import torch

from blockfp8 import dequantize_activation, dequantize_weight, quantize_activation, quantize_weight
from blockfp8.format import (
    AMAX_FLOOR,
    BLOCK,
    DEFAULT_BLOCK,
    DEFAULT_GROUP,
    FP8_DTYPE,
    FP8_MAX,
    next_pow2,
    weight_scale_shape,
)
from blockfp8.quant import round_scale_ue8m0, scales_from_amax

# ------------------------------------------------------------------ the format, pinned to values written here

# fp8 e4m3fn encodings (sign, 4 exponent bits with bias 7, 3 mantissa bits) of values exact in it.
E4M3_BYTES = {448.0: 0x7E, -448.0: 0xFE, 1.0: 0x38, -2.0: 0xC0, 0.5: 0x30, 3.0: 0x44, 2.0**-9: 0x01, 0.0: 0x00}


def test_format_constants():
    assert FP8_DTYPE == torch.float8_e4m3fn
    assert FP8_MAX == 448.0 == torch.finfo(torch.float8_e4m3fn).max  # the largest finite e4m3fn value
    assert AMAX_FLOOR == 1e-10
    assert BLOCK == DEFAULT_GROUP == 128 and DEFAULT_BLOCK == (128, 128)


def test_scales_of_known_groups():
    amax = torch.tensor([448.0, 1.0, 896.0, 3.5, 0.0, 1e-12])
    want = [1.0, float.fromhex("0x1.24924ap-9"), 2.0, 2.0**-7,  # 1/448 correctly rounded to fp32
            float.fromhex("0x1.f6a246p-43"), float.fromhex("0x1.f6a246p-43")]  # below the floor: fp32(1e-10)/448
    assert scales_from_amax(amax).tolist() == want
    # UE8M0: rounded up to a power of two (1/448 -> 2^-8, 500/448 -> 2), exact powers kept.
    ue8m0 = scales_from_amax(torch.tensor([448.0, 1.0, 500.0, 3.5]), ue8m0=True)
    assert ue8m0.tolist() == [1.0, 2.0**-8, 2.0, 2.0**-7]


@pytest.mark.parametrize("quantize", ["activation", "weight"])
def test_known_group_bytes(quantize):
    """A group whose amax is 448 gets scale 1 and its fp8-exact values encode to the bytes of the format."""
    values = torch.tensor(list(E4M3_BYTES))
    row = torch.cat([values, torch.zeros(BLOCK - len(values))])
    if quantize == "activation":
        q, s = quantize_activation(row[None])
    else:
        q, s = quantize_weight(row.repeat(3, 1))
    assert s.flatten().tolist() == [1.0]
    assert q[0, :len(values)].view(torch.uint8).tolist() == list(E4M3_BYTES.values())
    # amax 1.0: scale 1/448, and 1.0 itself encodes to 448's byte.
    q, _ = quantize_activation(torch.tensor([[1.0, -1.0, 0.5]]))
    assert q.view(torch.uint8).tolist() == [[0x7E, 0xFE, 0x76]]  # 0.5 / (1/448) = 224 = 1.75 * 2^7


# ------------------------------------------------------------------------------------------ shapes and rounding

SIZES = [1, 8, 64, 127, 128, 129, 200, 576, 1000, 2112, 7168]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", SIZES)
def test_scale_shapes(n, k):
    assert weight_scale_shape(n, k) == (-(-n // 128), -(-k // 128))
    if n * k <= 2112 * 1000:  # keep the full-quantization part cheap
        w = torch.randn(n, k)
        q, s = quantize_weight(w)
        assert q.shape == (n, k) and q.dtype == torch.float8_e4m3fn
        assert s.shape == weight_scale_shape(n, k) and s.dtype == torch.float32
    x = torch.randn(3, k)
    xq, xs = quantize_activation(x)
    assert xq.shape == (3, k) and xs.shape == (3, -(-k // 128))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_round_trip(dtype):
    w = torch.randn(300, 1000, dtype=dtype)
    q, s = quantize_weight(w)
    back = dequantize_weight(q, s)
    rel = ((back - w.float()).norm() / w.float().norm()).item()
    # e4m3 keeps 3 mantissa bits: half an ulp is 1/16 relative, ~3.6% RMS over a Gaussian block.
    assert rel < 0.045
    # elementwise: never more than half an fp8 ulp of the block max away (plus subnormal spacing)
    err = (back - w.float()).abs()
    bound = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :1000] * 16 + 1e-6
    assert (err <= bound).all()


def test_activation_round_trip_batched():
    x = torch.randn(2, 5, 300) * 7
    q, s = quantize_activation(x)
    assert q.shape == x.shape and s.shape == (2, 5, 3)
    back = dequantize_activation(q, s)
    assert ((back - x).norm() / x.norm()).item() < 0.045


def test_scales_follow_amax_and_tails_are_partial_blocks():
    w = torch.zeros(130, 260)
    w[128:, :] = 2.0  # the partial N block (2 rows) holds only 2.0
    w[:128, 256:] = 5.0  # the partial K block (4 columns)
    _, s = quantize_weight(w)
    assert s.shape == (2, 3)
    assert s[1, 0].item() == pytest.approx(2.0 / FP8_MAX)
    assert s[0, 2].item() == pytest.approx(5.0 / FP8_MAX)
    assert s[0, 0].item() == pytest.approx(AMAX_FLOOR / FP8_MAX)  # all-zero block: the documented floor


def test_all_zero_groups_give_zeros():
    x = torch.zeros(4, 256)
    q, s = quantize_activation(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert (dequantize_activation(q, s) == 0).all()


@pytest.mark.parametrize("ue8m0", [False, True])
def test_no_fp8_overflow(ue8m0):
    x = torch.randn(64, 1024) * torch.logspace(-6, 6, 64)[:, None]
    q, s = quantize_activation(x, ue8m0=ue8m0)
    assert torch.isfinite(q.float()).all()
    assert q.float().abs().max() <= FP8_MAX


def test_ue8m0_scales_are_powers_of_two_and_never_under_scale():
    w = torch.randn(256, 384) * torch.logspace(-5, 5, 256)[:, None]
    _, s_exact = quantize_weight(w)
    q, s = quantize_weight(w, ue8m0=True)
    mant, _ = torch.frexp(s)
    assert (mant == 0.5).all()  # exact powers of two
    assert (s >= s_exact).all()  # rounded up: |w| / s <= 448, no overflow
    assert (s < 2 * s_exact).all()
    assert torch.isfinite(q.float()).all()


def test_round_scale_ue8m0_exact_powers_unchanged():
    p = torch.tensor([2.0**-20, 0.25, 1.0, 8.0])
    assert torch.equal(round_scale_ue8m0(p), p)
    assert torch.equal(round_scale_ue8m0(torch.tensor([0.3, 1.0001, 5.0])), torch.tensor([0.5, 2.0, 8.0]))


def test_custom_block_sizes():
    w = torch.randn(100, 100)
    q, s = quantize_weight(w, block_size=(32, 64))
    assert s.shape == (4, 2)
    back = dequantize_weight(q, s, block_size=(32, 64))
    assert ((back - w).norm() / w.norm()).item() < 0.045
    xq, xs = quantize_activation(torch.randn(3, 100), group_size=32)
    assert xs.shape == (3, 4)


@pytest.mark.parametrize("bad", [(0, 128), (128,), (128, -1), "128", (128.0, 128), (True, 128)])
def test_invalid_block_size(bad):
    with pytest.raises(ValueError, match="block_size"):
        quantize_weight(torch.randn(8, 8), block_size=bad)


@pytest.mark.parametrize("bad", [0, -128, 1.5])
def test_invalid_group_size(bad):
    with pytest.raises(ValueError, match="group_size"):
        quantize_activation(torch.randn(8, 8), group_size=bad)


def test_bad_inputs_to_quantizers():
    with pytest.raises(TypeError, match="w must have dtype"):
        quantize_weight(torch.randint(0, 4, (8, 8)))
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(2, 8, 8))
    with pytest.raises(TypeError, match="x must have dtype"):
        quantize_activation(torch.randn(8, 8).to(torch.float8_e4m3fn))
    q, s = quantize_weight(torch.randn(200, 300))
    with pytest.raises(ValueError, match=r"weight_scale_inv must have shape \(2, 3\)"):
        dequantize_weight(q, s[:, :2])
    with pytest.raises(TypeError, match="weight_scale_inv must have dtype float32"):
        dequantize_weight(q, s.half())


def test_next_pow2():
    assert [next_pow2(x) for x in (0, 1, 2, 3, 4, 5, 56, 64, 65)] == [1, 1, 2, 4, 4, 8, 64, 64, 128]
