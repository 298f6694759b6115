"""A plan (and a layer's shortcut) serves only the weight tensors' state it was built and checked for
(``ops.weight_state``): a weight or scale tensor given new storage (``.data = ...``) or written in place gets a new
plan, whose build checks shapes and values again, so such a change raises a ValueError or computes with the new
tensors -- never a stale plan's out-of-bounds reads. The weight side's values are read once per state, never per
call, including on the functional ``linear`` and ``gemm`` paths."""

from __future__ import annotations

import pytest
import torch

import blockfp8
from blockfp8 import Fp8BlockLinear, ops
from blockfp8.quant import quantize_activation
from blockfp8.reference import reference_gemm, rel_error
from blockfp8.testing import default_device
from blockfp8.testing.operands import random_activation, random_fp8_weight

N, K = 200, 300  # tails in both: 2 x 3 scale blocks
DEVICE = default_device()  # the Triton backend runs on CUDA, or on the CPU only under the interpreter


def _err(y: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> float:
    """y's error against the float32 reference of x through (wq, ws)."""
    xq, xs = quantize_activation(x)
    return rel_error(y, reference_gemm(xq, xs, wq, ws, out_dtype=torch.float32))


def _called_layer(backend: str = "triton") -> tuple[Fp8BlockLinear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer, x, its fp8 weight, its scales) after one call of the layer on x: its plan is built."""
    wq, ws = random_fp8_weight(N, K, device=DEVICE)
    layer = Fp8BlockLinear.from_fp8(wq, ws, backend=backend)
    x = random_activation(5, K, device=DEVICE)
    with torch.no_grad():
        layer(x)
    return layer, x, wq, ws


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_scales_given_new_storage_of_the_wrong_shape_raise(backend):
    layer, x, _, _ = _called_layer(backend)
    with torch.no_grad():
        layer.weight_scale_inv.data = torch.ones(1, 1, device=DEVICE)
        with pytest.raises(ValueError, match="weight_scale_inv"):
            layer(x)


def test_gemm_with_scales_given_new_storage_of_the_wrong_shape_raises():
    wq, ws = random_fp8_weight(N, K, device=DEVICE)
    xq, xs = quantize_activation(random_activation(5, K, device=DEVICE))
    blockfp8.gemm(xq, xs, wq, ws, backend="triton")
    ws.data = torch.ones(1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="weight_scale_inv"):
        blockfp8.gemm(xq, xs, wq, ws, backend="triton")


def test_weight_and_scales_swapped_together_compute_with_the_new_ones():
    layer, x, _, _ = _called_layer()
    with torch.no_grad():
        wq2, ws2 = random_fp8_weight(400, K, seed=3, device=DEVICE)
        layer.weight.data, layer.weight_scale_inv.data = wq2, ws2
        y = layer(x)
    assert y.shape == (5, 400)
    assert _err(y, x, wq2, ws2) <= 5e-3


@pytest.mark.parametrize("where", ["scales", "weight"])
def test_a_nan_written_in_place_after_the_first_call_raises(where):
    layer, x, _, _ = _called_layer()
    with torch.no_grad():
        if where == "scales":
            layer.weight_scale_inv[1, 0] = float("nan")
            match = "weight_scale_inv holds 1 invalid value"
        else:
            layer.weight.view(torch.uint8)[3, 7] = 0x7F
            match = "NaN encoding"
        with pytest.raises(ValueError, match=match):
            layer(x)


def test_new_values_written_in_place_are_used():
    layer, x, wq, _ = _called_layer()
    with torch.no_grad():
        doubled = layer.weight_scale_inv * 2
        layer.weight_scale_inv.mul_(2)
        y = layer(x)
    assert _err(y, x, layer.weight, doubled) <= 5e-3
    assert _err(y, x, wq, doubled / 2) > 0.4  # not the old values


@pytest.mark.parametrize("bad", ["nan_scale", "inf_scale", "zero_scale", "negative_scale", "nan_byte", "nan_bias"])
@pytest.mark.parametrize("entry", ["linear", "gemm"])
def test_functional_calls_refuse_invalid_weight_values(bad, entry):
    wq, ws = random_fp8_weight(N, K, device=DEVICE)
    bias = torch.zeros(N, dtype=torch.bfloat16, device=DEVICE)
    if bad == "nan_byte":
        wq.view(torch.uint8)[0, 0] = 0xFF
    elif bad == "nan_bias":
        bias[7] = float("nan")
    else:
        ws[1, 2] = {"nan_scale": float("nan"), "inf_scale": float("inf"), "zero_scale": 0.0,
                    "negative_scale": -1.0}[bad]
    x = random_activation(3, K, device=DEVICE)
    with pytest.raises(ValueError, match="bias holds 1 NaN" if bad == "nan_bias" else "weight"):
        if entry == "linear":
            blockfp8.linear(x, wq, ws, bias, backend="triton")
        else:
            xq, xs = quantize_activation(x)
            blockfp8.gemm(xq, xs, wq, ws, bias=bias, backend="triton")


def test_values_are_read_once_per_state_not_per_call(monkeypatch):
    reads = []
    real = ops.check_weight_values
    monkeypatch.setattr(ops, "check_weight_values", lambda *a: (reads.append(1), real(*a)))
    wq, ws = random_fp8_weight(N, K, device=DEVICE)
    for m in (1, 2, 3, 2, 1):  # three plans (one per M), one weight state
        blockfp8.linear(random_activation(m, K, device=DEVICE), wq, ws, backend="reference")
    assert len(reads) == 1
    ws.mul_(1.0)  # an in-place write: a new state, read again at the next plan build
    blockfp8.linear(random_activation(1, K, device=DEVICE), wq, ws, backend="reference")
    assert len(reads) == 2


def test_inference_tensors_keep_their_plan():
    with torch.inference_mode():
        wq, ws = random_fp8_weight(N, K, device=DEVICE)
        x = random_activation(2, K, device=DEVICE)
        y1 = blockfp8.linear(x, wq, ws, backend="triton")
        plans = len(ops.PLANS.plans_of(wq))
        y2 = blockfp8.linear(x, wq, ws, backend="triton")
    assert plans == len(ops.PLANS.plans_of(wq)) == 1
    assert torch.equal(y1, y2)


def test_scales_replaced_by_an_inference_tensor_get_a_new_plan():
    layer, x, wq, ws = _called_layer()
    with torch.no_grad():
        with torch.inference_mode():
            doubled = ws * 2
        layer.weight_scale_inv.data = doubled  # no version counter from here on
        y = layer(x)
    assert ops.weight_state(layer.weight, layer.weight_scale_inv, None)[0] is False
    assert _err(y, x, wq, doubled.clone()) <= 5e-3
