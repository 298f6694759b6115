"""The validation contract: every bad input raises TypeError/ValueError naming the argument; edge cases succeed;
docs/reliability.md is the generator's current output; checks cost nothing inside compiled graphs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from blockfp8 import dequantize_weight, gemm, linear, quantize_activation, quantize_weight
from blockfp8.dispatch import check_backend_name
from blockfp8.testing import default_device
from blockfp8.testing.reliability import cases, collect, render
from blockfp8.validate import (
    check_bias,
    check_contiguous,
    check_finite_values,
    check_fp8_linear,
    check_fp8_weight_values,
    check_out_dtype,
    check_scale_values,
    check_weight,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = default_device()
DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
CASES = cases()
BAD = [c for c in CASES if c.bad]
OTHER = [c for c in CASES if not c.bad]


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_bad_input_raises_naming_the_argument(case):
    with pytest.raises((TypeError, ValueError)) as info:
        case.run()
    assert type(info.value) is case.expect, f"{case.call}: {type(info.value).__name__}: {info.value}"
    assert case.arg in str(info.value), f"{case.call}: message does not name {case.arg!r}: {info.value}"


@pytest.mark.parametrize("case", OTHER, ids=[c.name for c in OTHER])
def test_edge_case_does_what_it_declares(case):
    if case.expect is None:
        case.run()
    else:
        with pytest.raises(case.expect):
            case.run()


def test_generator_outcomes_and_committed_doc():
    outcomes = collect()
    assert len(outcomes) == len(CASES)
    for o in outcomes:
        if o.case.bad:
            assert type(o.error) in (TypeError, ValueError), f"{o.case.name}: {o.result}"
        assert o.matches, f"{o.case.name}: {o.result}"
    if HAS_CUDA:
        pytest.skip("docs/reliability.md records the CPU outcomes (forced-backend rows differ on a GPU host)")
    assert DOC.is_file(), "run: blockfp8 reliability --out docs/reliability.md"
    assert DOC.read_text() == render(outcomes), "stale: run blockfp8 reliability --out docs/reliability.md"


# ---------------------------------------------------------------------------------------- the check functions


def _weight(n=200, k=300):
    return quantize_weight(torch.randn(n, k))


def test_check_weight_names_checkpoint_tensors():
    w, s = _weight()
    with pytest.raises(ValueError, match=r"model\.l0\.weight_scale_inv must have shape \(2, 3\)"):
        check_weight(w, s[:, :2], name="model.l0.weight", scale_name="model.l0.weight_scale_inv")
    with pytest.raises(TypeError, match=r"model\.l0\.weight must have dtype float8_e4m3fn"):
        check_weight(w.float(), s, name="model.l0.weight")
    assert check_weight(w, s) == (200, 300)


@pytest.mark.parametrize("n,k", [(1, 1), (128, 128), (129, 257), (7168, 18432)])
def test_check_weight_accepts_ceil_div_scales(n, k):
    w = torch.empty(n, k, dtype=torch.float8_e4m3fn, device="meta")
    s = torch.empty((n + 127) // 128, (k + 127) // 128, device="meta")
    assert check_weight(w, s) == (n, k)


def test_scale_shape_hints():
    w, s = _weight()
    with pytest.raises(ValueError, match=r"transposed\?"):
        check_weight(w, s.t())
    with pytest.raises(ValueError, match=r"padded\?"):
        check_weight(w, torch.ones(4, 4))


def test_check_fp8_linear_names_siblings():
    w, s = _weight()
    bad = s.clone()
    bad[0, 1] = 0.0
    with pytest.raises(ValueError, match=r"^blk\.3\.ffn\.weight_scale_inv holds 1 invalid value\(s\).*\(0, 1\): 0\.0"):
        check_fp8_linear(w, bad, name="blk.3.ffn.weight")
    with pytest.raises(ValueError, match=r"^blk\.3\.ffn\.bias must have shape \(200,\)"):
        check_fp8_linear(w, s, torch.zeros(3), name="blk.3.ffn.weight")
    with pytest.raises(ValueError, match=r"^blk\.3\.ffn\.weight must be contiguous"):
        check_fp8_linear(w.t().contiguous().t(), s, name="blk.3.ffn.weight")
    assert check_fp8_linear(w, s, torch.zeros(200, dtype=torch.bfloat16)) == (200, 300)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1e-30])
def test_check_scale_values_rejects(value):
    s = torch.ones(3, 4)
    s[2, 1] = value
    with pytest.raises(ValueError, match=r"my\.scale holds 1 invalid value\(s\).*first at index \(2, 1\)"):
        check_scale_values(s, "my.scale")


def test_check_scale_values_accepts_tiny_and_meta():
    check_scale_values(torch.tensor([[1e-38, 1e-45, 2.0**56]]))  # subnormal, and the largest scale accepted
    check_scale_values(torch.empty(2, 2, device="meta"))  # no values to read: models are built on meta


def test_check_backend_name():
    check_backend_name(None)
    check_backend_name("reference")
    with pytest.raises(ValueError, match="backend='Triton' is not a backend"):
        check_backend_name("Triton")
    with pytest.raises(ValueError, match="backend=''"):
        check_backend_name("")
    with pytest.raises(TypeError, match="backend must be None or a backend name"):
        check_backend_name(["triton"])


def test_check_out_dtype_and_bias():
    for d in (torch.bfloat16, torch.float16, torch.float32):
        check_out_dtype(d)
    with pytest.raises(TypeError, match="out_dtype must be a torch.dtype"):
        check_out_dtype(None)
    check_bias(None, 5, torch.device("cpu"))
    check_bias(torch.zeros(1)[:1], 1, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"bias must be contiguous"):
        check_bias(torch.zeros(10)[::2], 5, torch.device("cpu"))


def test_check_contiguous_message():
    t = torch.zeros(4, 6).t()
    with pytest.raises(ValueError, match=r"weight must be contiguous \(row-major\), got shape \(6, 4\) with strides"):
        check_contiguous(t, "weight")


def test_messages_show_what_was_given_and_expected():
    w, s = _weight()
    with pytest.raises(ValueError) as info:
        linear(torch.randn(3, 299), w, s)
    assert "K=300" in str(info.value) and "(3, 299)" in str(info.value)


# ------------------------------------------------------------------------------------------ torch.compile


def _count_entry_checks(fn, *args) -> int:
    """How many times the per-call entry checks run while ``fn(*args)`` executes."""
    names = {"check_linear_input", "check_gemm_input"}
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name in names:
            calls.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return len(calls)


def test_checks_run_at_trace_time_only():
    # Dynamo interprets the checks symbolically while tracing (a bad input raises there: see the next test); the
    # graph it records holds the custom op alone, so compiled calls run no check at all.
    torch._dynamo.reset()
    w, s = _weight(256, 384)
    x = torch.randn(4, 384, dtype=torch.bfloat16)
    graphs = []

    def record(gm, example_inputs):
        graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    f = torch.compile(lambda t: linear(t, w, s), backend=record, fullgraph=True)
    assert _count_entry_checks(linear, x, w, s) == 1  # eager: once per call
    assert _count_entry_checks(f, x) == 0  # traced, not executed
    assert _count_entry_checks(f, x) == 0
    assert graphs == [[torch.ops.blockfp8.linear.default]]
    torch.testing.assert_close(f(x), linear(x, w, s))


def test_bad_input_under_compile():
    torch._dynamo.reset()
    w, s = _weight(256, 384)
    bad = torch.randn(4, 100, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="K=384"):
        torch.compile(lambda t: linear(t, w, s), backend="eager")(bad)
    # With fullgraph=True, Dynamo reports the exception it observed while tracing, chained to the ValueError.
    with pytest.raises(RuntimeError) as info:
        torch.compile(lambda t: linear(t, w, s), backend="eager", fullgraph=True)(bad)
    assert isinstance(info.value.__cause__, ValueError) or "K=384" in str(info.value)


# ------------------------------------------------------------------- value checks where weights enter


def test_value_check_constants():
    from blockfp8.format import FP8_NAN_BITS, MAX_WEIGHT_SCALE

    assert MAX_WEIGHT_SCALE == 72057594037927936.0 == 2.0**56
    assert FP8_NAN_BITS == 0x7F


def test_scale_bound_is_inclusive_and_exact():
    top = torch.tensor(2.0**56)
    above = torch.nextafter(top, torch.tensor(math.inf))
    check_scale_values(top.reshape(1, 1))
    for value in (above, torch.tensor(2.0**57), torch.tensor(1e36), torch.tensor(3.4e38)):
        with pytest.raises(ValueError, match=r"^s holds 1 invalid value\(s\) \(NaN, Inf, zero, negative or above "
                                             r"2\^56\); first at index \(0, 0\)"):
            check_scale_values(value.reshape(1, 1), "s")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_kernels_stay_finite_at_the_scale_bound(backend):
    """At scale 2^56, every weight 448 (byte 0x7E) and activations up to 2^55 (the documented 2^56 limit): the
    exact result (up to 1.75 * 2^127) fits fp32, and the backends give it (no intermediate overflows). Above the
    bound dequantization itself leaves fp32 for a large enough scale (1e36 * 448 = inf): those are refused."""
    n, k = 128, 256
    w = torch.full((n, k), 0x7E, dtype=torch.uint8, device=DEVICE).view(torch.float8_e4m3fn)
    s = torch.full((1, 2), 2.0**56, device=DEVICE)
    check_fp8_linear(w, s)
    x = torch.full((4, k), 2.0**40, device=DEVICE)
    x[1] = -(2.0**30)
    x[2] = 2.0**55
    xq, xs = quantize_activation(x)
    y = gemm(xq, xs, w, s, backend=backend, out_dtype=torch.float32)
    exact = x.double() @ (torch.full((n, k), 448.0, device=DEVICE).double() * 2.0**56).t()
    assert torch.isfinite(y).all()
    assert torch.allclose(y.double(), exact, rtol=1e-6)
    assert torch.isinf(dequantize_weight(w, torch.full((1, 2), 1e36, device=DEVICE))).all()  # what the bound keeps out


def test_every_fp8_byte_but_the_two_nans_passes():
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)
    nan = [(b >> 4, b & 15) for b in range(256) if b & 0x7F == 0x7F]
    assert nan == [(7, 15), (15, 15)]  # 0x7F and 0xFF
    with pytest.raises(ValueError, match=r"^blk\.weight holds 2 NaN encoding\(s\) \(byte 0x7F or 0xFF\); first at "
                                         r"index \(7, 15\): byte 0x7F"):
        check_fp8_weight_values(bits.view(torch.float8_e4m3fn), "blk.weight")
    finite = bits.clone()
    finite[7, 15] = finite[15, 15] = 0
    check_fp8_weight_values(finite.view(torch.float8_e4m3fn))
    check_fp8_weight_values(torch.empty(4, 4, dtype=torch.float8_e4m3fn, device="meta"))


def test_check_fp8_linear_reads_weight_bytes_and_bias():
    w, s = _weight()
    bad = w.clone()
    bad.view(torch.uint8)[199, 299] = 0xFF
    with pytest.raises(ValueError, match=r"^l\.weight holds 1 NaN encoding.*\(199, 299\): byte 0xFF"):
        check_fp8_linear(bad, s, name="l.weight")
    bias = torch.zeros(200)
    bias[3] = -math.inf
    with pytest.raises(ValueError, match=r"^l\.bias holds 1 NaN or Inf value\(s\); first at index \(3,\): -inf"):
        check_fp8_linear(w, s, bias, name="l.weight")
    with pytest.raises(ValueError, match=r"x holds 1 NaN or Inf"):
        check_finite_values(torch.tensor([1.0, math.nan]), "x")
