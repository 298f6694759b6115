"""The eager path of ops.py: plans (built once per weight and M, rebuilt when anything they depend on changes,
bit-identical to the custom op), the op kept for tracing/autograd, and the input gradient."""

from __future__ import annotations

import pytest
import torch

import blockfp8
from blockfp8 import Fp8BlockLinear, dispatch
from blockfp8.ops import LinearPlan, PlanCache, can_skip_op
from blockfp8.quant import dequantize_weight
from blockfp8.testing import default_device
from blockfp8.testing.operands import random_activation, random_fp8_weight

DEVICE = default_device()


def _layer(n: int = 200, k: int = 300, bias: bool = True, backend: str | None = None) -> Fp8BlockLinear:
    wq, ws = random_fp8_weight(n, k, device=DEVICE)
    b = torch.randn(n, device=DEVICE).to(torch.bfloat16) if bias else None
    return Fp8BlockLinear.from_fp8(wq, ws, b, backend=backend)


def _op(layer: Fp8BlockLinear, x: torch.Tensor) -> torch.Tensor:
    """The custom op itself: the path torch.compile and autograd see."""
    return torch.ops.blockfp8.linear(x, layer.weight, layer.weight_scale_inv, layer.bias, layer.backend or "")


def _plans(layer: Fp8BlockLinear) -> list[LinearPlan]:
    return [plan for _, plan in layer._plans._plans.values()]


@pytest.mark.parametrize("backend", [None, "reference", "triton"])
def test_plans_match_the_op_bit_for_bit(backend):
    layer = _layer(backend=backend)
    for m in (1, 3, 16, 17):
        x = random_activation(m, 300, seed=m, device=DEVICE)
        with torch.inference_mode():
            assert torch.equal(layer(x), _op(layer, x))
    assert len(_plans(layer)) == 4


def test_a_plan_is_kept_per_token_count():
    layer = _layer()
    x1, x2 = random_activation(2, 300, device=DEVICE), random_activation(2, 300, seed=5, device=DEVICE)
    with torch.inference_mode():
        layer(x1)
        first = _plans(layer)
        layer(x2)  # same M: the same plan
        assert _plans(layer) == first and len(first) == 1
        layer(random_activation((2, 3), 300, device=DEVICE))  # M = 6 (leading dims flattened): a new plan
        assert len(_plans(layer)) == 2


def test_plan_rebuilt_when_the_weight_is_replaced():
    layer = _layer()
    x = random_activation(4, 300, device=DEVICE)
    with torch.inference_mode():
        before = layer(x)
        wq, ws = random_fp8_weight(200, 300, seed=7, device=DEVICE)
        layer.weight, layer.weight_scale_inv = wq, ws
        after = layer(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, _op(layer, x))
    assert all(p.weight is wq for p in _plans(layer)[-1:])


def test_plan_rebuilt_when_a_backend_is_forced_or_tables_change(monkeypatch):
    layer = _layer()
    x = random_activation(4, 300, device=DEVICE)
    with torch.inference_mode():
        layer(x)
        monkeypatch.setenv(dispatch.ENV_VAR, "triton")
        layer(x)
        assert _plans(layer)[-1].backend.name == "triton"
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
        layer(x)
        assert _plans(layer)[-1].backend.name == "reference"
        n = len(_plans(layer))
        dispatch.clear_caches()
        layer(x)
        assert len(_plans(layer)) == n + 1


def test_plan_rebuilt_for_another_dtype_and_after_a_device_move():
    layer = _layer()
    with torch.inference_mode():
        layer(random_activation(4, 300, device=DEVICE))
        layer(random_activation(4, 300, device=DEVICE, dtype=torch.float32))
        assert [p.out_dtype for p in _plans(layer)] == [torch.bfloat16, torch.float32]
        layer.to("cpu")  # a move replaces the buffers when the device differs; on CPU it is a no-op
        y = layer(random_activation(4, 300, device="cpu"))
    assert y.device.type == "cpu" and all(p.weight is layer.weight for p in _plans(layer)[-1:])


@pytest.mark.gpu
def test_plan_follows_the_layer_between_devices():
    layer = _layer()
    x = random_activation(4, 300, device="cuda")
    with torch.inference_mode():
        on_gpu = layer(x)
        layer.cpu()
        on_cpu = layer(x.cpu())
        layer.cuda()
        again = layer(x)
    assert on_cpu.device.type == "cpu" and torch.equal(again, on_gpu)
    assert blockfp8.rel_error(on_cpu.float(), on_gpu.cpu().float()) <= blockfp8.reference.TOLERANCE


def test_cache_never_serves_a_freed_weight():
    cache = PlanCache()
    built = []

    def build():
        built.append(1)
        return object()

    w, s = torch.zeros(2, 2), torch.ones(1, 1)
    cache.get(w, s, None, ("k",), build)
    cache.get(w, s, None, ("k",), build)
    assert len(built) == 1
    # Another tensor at the same id (a freed weight's memory reused) must not get the old plan.
    (full, (refs, plan)), = cache._plans.items()
    dead = torch.zeros(1)
    dead_ref = __import__("weakref").ref(dead)
    del dead
    cache._plans[full] = ((dead_ref, *refs[1:]), plan)
    cache.get(w, s, None, ("k",), build)
    assert len(built) == 2


def test_cache_is_bounded_and_not_copied():
    cache = PlanCache(size=3)
    w, s = torch.zeros(2, 2), torch.ones(1, 1)
    for i in range(5):
        cache.get(w, s, None, (i,), object)
    assert len(cache._plans) == 3
    import copy

    layer = _layer()
    with torch.inference_mode():
        layer(random_activation(1, 300, device=DEVICE))
    clone = copy.deepcopy(layer)
    assert len(_plans(layer)) == 1 and clone._plans._plans == {}


def test_the_op_is_kept_where_it_is_needed():
    x = random_activation(2, 300, device=DEVICE)
    assert can_skip_op(x)
    assert not can_skip_op(x.float().requires_grad_())  # autograd needs the op's formula
    assert not can_skip_op(torch.empty(2, 300, device="meta"))  # shape propagation uses the fake impl
    with torch.no_grad():
        assert can_skip_op(x.float().requires_grad_())


@pytest.mark.parametrize("with_bias", [False, True])
def test_input_gradient(with_bias):
    layer = _layer(bias=with_bias)
    if with_bias:
        layer.bias.requires_grad_()
    x = random_activation((2, 3), 300, device=DEVICE, dtype=torch.float32).requires_grad_()
    g = torch.randn(2, 3, 200, device=DEVICE)
    (layer(x) * g).sum().backward()
    w = dequantize_weight(layer.weight, layer.weight_scale_inv)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(layer.bias.grad.float(), g.sum((0, 1)), rtol=1e-2, atol=1e-2)
    assert layer.weight.grad is None


def test_compile_with_grad_enabled():
    torch._dynamo.reset()
    layer = _layer(bias=False)
    x = random_activation(4, 300, device=DEVICE, dtype=torch.float32).requires_grad_()
    f = torch.compile(layer, backend="aot_eager", fullgraph=True)
    f(x).sum().backward()
    w = dequantize_weight(layer.weight, layer.weight_scale_inv)
    torch.testing.assert_close(x.grad, torch.ones(4, 200, device=DEVICE) @ w, rtol=1e-5, atol=1e-5)
