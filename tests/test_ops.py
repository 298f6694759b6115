"""The one path of ops.py: plans (built once per weight and M, kept as long as the weight lives and no longer,
rebuilt when anything they depend on changes, bit-identical to the custom op), eager calls with autograd on,
the op kept for tracing, and split-K counters that need no zeroing kernel of their own."""

from __future__ import annotations

import copy
import threading
import weakref

import pytest
import torch

import blockfp8
from blockfp8 import Fp8BlockLinear, dispatch
from blockfp8.backends.triton import gemm as triton_gemm_module
from blockfp8.backends.triton.configs import TritonConfig
from blockfp8.ops import PLANS, LinearPlan, PlanRegistry, runs_eagerly
from blockfp8.quant import dequantize_weight
from blockfp8.testing import default_device
from blockfp8.testing.operands import random_activation, random_fp8_weight

DEVICE = default_device()


def _layer(n: int = 200, k: int = 300, bias: bool = True, backend: str | None = None) -> Fp8BlockLinear:
    wq, ws = random_fp8_weight(n, k, device=DEVICE)
    b = torch.randn(n, device=DEVICE).to(torch.bfloat16) if bias else None
    return Fp8BlockLinear.from_fp8(wq, ws, b, backend=backend)


def _op(layer: Fp8BlockLinear, x: torch.Tensor) -> torch.Tensor:
    """The custom op itself: the path torch.compile sees."""
    return torch.ops.blockfp8.linear(x, layer.weight, layer.weight_scale_inv, layer.bias, layer.backend or "")


def _plans(layer: Fp8BlockLinear) -> list[LinearPlan]:
    return PLANS.plans_of(layer.weight)


@pytest.mark.parametrize("backend", [None, "reference", "triton"])
def test_plans_match_the_op_bit_for_bit(backend):
    layer = _layer(backend=backend)
    for m in (1, 3, 16, 17):
        x = random_activation(m, 300, seed=m, device=DEVICE)
        with torch.inference_mode():
            assert torch.equal(layer(x), _op(layer, x))
    # The op found the plans the layer's calls made: one per M.
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
    assert len(_plans(layer)) == 1


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
    assert y.device.type == "cpu" and _plans(layer)


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


def test_plans_never_keep_a_weight_alive():
    """A plan holds no tensor: once the layer (or a functional caller's weight) is gone, its memory is freed at
    once -- no reference cycle waiting for the garbage collector -- and its plans go with it."""
    layer = _layer()
    wq, ws = random_fp8_weight(64, 256, device=DEVICE)
    with torch.inference_mode():
        layer(random_activation(3, 300, device=DEVICE))
        blockfp8.linear(random_activation(2, 256, device=DEVICE), wq, ws)
    refs = [weakref.ref(t) for t in (layer.weight, layer.weight_scale_inv, layer.bias, wq, ws)]
    assert PLANS.plans_of(wq) and _plans(layer)
    del layer, wq, ws
    assert all(r() is None for r in refs)


def test_registry_never_serves_a_freed_weight():
    registry = PlanRegistry()
    built = []

    class Plan:
        keep = True

    def build():
        built.append(1)
        return Plan()

    w, s = torch.zeros(2, 2), torch.ones(1, 1)
    first = registry.get(w, s, None, ("k",), build)
    assert registry.get(w, s, None, ("k",), build) is first and len(built) == 1
    # New scales at the same id as freed ones (their memory reused) must not get the old plan.
    (ref, plans), = registry._weights.values()
    (full, (s_ref, b_ref, plan, state)), = plans.items()
    dead = torch.zeros(1)
    dead_ref = weakref.ref(dead)
    del dead
    plans[full] = (dead_ref, b_ref, plan, state)
    registry.get(w, s, None, ("k",), build)
    assert len(built) == 2
    del w
    assert len(registry) == 0


def test_registry_is_bounded_and_copies_get_their_own_plans():
    registry = PlanRegistry(per_weight=3)

    class Plan:
        keep = True

    w, s = torch.zeros(2, 2), torch.ones(1, 1)
    for i in range(5):
        registry.get(w, s, None, (i,), Plan)
    assert len(registry.plans_of(w)) == 3
    layer = _layer()
    with torch.inference_mode():
        layer(random_activation(1, 300, device=DEVICE))
    clone = copy.deepcopy(layer)
    assert len(_plans(layer)) == 1 and _plans(clone) == []


def test_threads_calling_one_layer_get_serial_results():
    layer = _layer(backend="reference")
    xs = [random_activation(m, 300, seed=m, device=DEVICE) for m in range(1, 9)]
    with torch.inference_mode():
        want = [layer(x) for x in xs]
    got: list[torch.Tensor | None] = [None] * len(xs)
    errors: list[BaseException] = []
    start = threading.Barrier(len(xs))

    def worker(i: int) -> None:
        try:
            start.wait()
            with torch.inference_mode():
                for _ in range(20):
                    got[i] = layer(xs[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(g is not None and torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_the_op_is_kept_where_it_is_needed():
    x = random_activation(2, 300, device=DEVICE)
    assert runs_eagerly(x)
    assert runs_eagerly(x.float().requires_grad_())  # autograd: a Function around the plan, not the op
    assert runs_eagerly(x, torch.nn.Parameter(torch.zeros(3)))
    assert not runs_eagerly(torch.empty(2, 300, device="meta"))  # shape propagation uses the fake impl
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert not runs_eagerly(x)


@pytest.mark.parametrize("with_bias", [False, True])
def test_input_gradient(with_bias):
    layer = _layer(bias=with_bias)
    if with_bias:
        layer.bias.requires_grad_()
    x = random_activation((2, 3), 300, device=DEVICE, dtype=torch.float32).requires_grad_()
    g = torch.randn(2, 3, 200, device=DEVICE)
    y = layer(x)
    assert y.grad_fn is not None and "LinearFn" in type(y.grad_fn).__name__  # the eager Function, not the op
    (y * g).sum().backward()
    w = dequantize_weight(layer.weight, layer.weight_scale_inv)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(layer.bias.grad.float(), g.sum((0, 1)), rtol=1e-2, atol=1e-2)
    assert layer.weight.grad is None
    with torch.no_grad():
        assert torch.equal(y.detach(), layer(x))


def test_an_output_with_autograd_can_be_modified_in_place():
    layer = _layer(bias=False)
    x = random_activation((2, 3), 300, device=DEVICE, dtype=torch.float32).requires_grad_()
    y = layer(x)  # 3-D: the (M, N) result reshaped, which must not count as a view of the Function's output
    y.mul_(2)
    y.sum().backward()
    w = dequantize_weight(layer.weight, layer.weight_scale_inv)
    torch.testing.assert_close(x.grad, (2 * w.sum(0)).expand(2, 3, -1), rtol=1e-5, atol=1e-5)


def test_compile_with_grad_enabled():
    torch._dynamo.reset()
    layer = _layer(bias=False)
    x = random_activation(4, 300, device=DEVICE, dtype=torch.float32).requires_grad_()
    f = torch.compile(layer, backend="aot_eager", fullgraph=True)
    f(x).sum().backward()
    w = dequantize_weight(layer.weight, layer.weight_scale_inv)
    torch.testing.assert_close(x.grad, torch.ones(4, 200, device=DEVICE) @ w, rtol=1e-5, atol=1e-5)


SPLIT = TritonConfig(16, 64, split_k=4, group_m=1, swap_ab=True)


@pytest.fixture
def garbage_workspace(monkeypatch):
    """Every Triton plan gets a split-K config and a workspace full of garbage, as a reused block of memory (or
    a CUDA graph pool shared with other graphs) would hand it out."""
    monkeypatch.setattr(triton_gemm_module, "get_config", lambda m, n, k, device: SPLIT)
    made = []

    def workspace(self, device):
        work = torch.full((self.workspace_numel,), 5, dtype=torch.int32, device=device)
        made.append(work)
        return work

    monkeypatch.setattr(triton_gemm_module.TritonGemmPlan, "workspace", workspace)
    return made


@pytest.mark.parametrize("m", [1, 3, 17])
def test_linear_zeroes_split_k_counters_in_its_quantizer(garbage_workspace, m):
    wq, ws = random_fp8_weight(192, 1024, seed=m, device=DEVICE)
    x = random_activation(m, 1024, seed=m, device=DEVICE)
    with torch.inference_mode():
        got = blockfp8.linear(x, wq, ws, backend="triton")
        want = blockfp8.linear(x, wq, ws, backend="reference")
    assert garbage_workspace, "the split-K config was not used"
    assert PLANS.plans_of(wq)[0].launch.counters == 3 * ((m + 15) // 16)
    assert blockfp8.rel_error(got.float(), want.float()) <= blockfp8.reference.TOLERANCE


def test_gemm_zeroes_split_k_counters_itself(garbage_workspace):
    wq, ws = random_fp8_weight(192, 1024, device=DEVICE)
    xq, xs = blockfp8.quantize_activation(random_activation(5, 1024, device=DEVICE))
    with torch.inference_mode():
        got = blockfp8.gemm(xq, xs, wq, ws, backend="triton")
        want = blockfp8.gemm(xq, xs, wq, ws, backend="reference")
    assert garbage_workspace
    assert blockfp8.rel_error(got.float(), want.float()) <= blockfp8.reference.TOLERANCE


def test_gemm_plans_follow_out_dtype_and_the_forced_backend():
    wq, ws = random_fp8_weight(200, 300, device=DEVICE)
    xq, xs = blockfp8.quantize_activation(random_activation(2, 300, device=DEVICE))
    with torch.inference_mode():
        assert blockfp8.gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16).dtype == torch.bfloat16
        assert blockfp8.gemm(xq, xs, wq, ws, out_dtype=torch.float32).dtype == torch.float32  # not the bf16 plan
        blockfp8.gemm(xq, xs, wq, ws, backend="reference")
        blockfp8.gemm(xq, xs, wq, ws, backend="triton")  # not the reference plan
    assert {p.backend.name for p in PLANS.plans_of(wq)} >= {"reference", "triton"}


def test_replaced_or_moved_weights_are_freed_with_their_plans():
    layer = _layer()
    x = random_activation(3, 300, device=DEVICE)
    with torch.inference_mode():
        layer(x)
    old = [weakref.ref(t) for t in (layer.weight, layer.weight_scale_inv, layer.bias)]
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    with torch.inference_mode():
        layer(x)
    assert all(r() is None for r in old)  # no plan (nor its graphs) keeps the replaced tensors
    current = [weakref.ref(t) for t in (layer.weight, layer.weight_scale_inv)]
    layer.to("meta")  # a device move gives the layer new tensors
    assert all(r() is None for r in current)


@pytest.mark.parametrize("bad", ["x_scale shape", "x_scale dtype", "x_fp8 K"])
def test_gemm_checks_the_activation_on_every_call_not_only_the_first(bad):
    """The weight side is checked when a plan is built; the activation changes from call to call and is checked on
    each, also once a plan for the weight exists."""
    wq, ws = random_fp8_weight(200, 300, device=DEVICE)
    xq, xs = blockfp8.quantize_activation(random_activation(2, 300, device=DEVICE))
    # Triton: a kernel has no checks of its own (the reference backend's dequantization would catch these).
    blockfp8.gemm(xq, xs, wq, ws, backend="triton")  # builds the plan
    args = {"x_scale shape": (xq, xs[:, :2]), "x_scale dtype": (xq, xs.double()),
            "x_fp8 K": (xq[:, :256], xs)}[bad]
    with pytest.raises((ValueError, TypeError), match="x_scale|x_fp8"):
        blockfp8.gemm(*args, wq, ws, backend="triton")
