"""ops.Shortcut: a layer's next eager call replays the set its last one did only when everything the full path
checks or keys on is the same; any change takes the full path (CPU: the plan is marked graphed and captures are
stubbed, so only the path taken is tested; the replayed bytes are tested on the GPU in test_eager_graphs.py)."""

from __future__ import annotations

import copy
import gc
import threading
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from blockfp8 import Fp8BlockLinear, dispatch, ops
from blockfp8.eager_graphs import EagerGraphs
from blockfp8.testing.operands import random_activation, random_fp8_weight


class _PassFunctions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Graph:
    def replay(self):
        pass


@pytest.fixture
def stubs(monkeypatch):
    monkeypatch.setattr(EagerGraphs, "_capture",
                        lambda self, inputs, run, operands, keep_graph=False: _Graph())
    monkeypatch.setattr(EagerGraphs, "enabled", True)
    monkeypatch.setattr(ops, "_current_device", lambda: -1)
    monkeypatch.setattr(ops, "current_raw_stream", lambda index: 7)
    monkeypatch.setattr(ops, "_capturing", lambda: False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def _graphed_layer(x=None):
    """A layer whose eager set has captured (a stub) and whose shortcut is remembered; ``x``: its input (default:
    a float activation; a ``QuantizedActivation`` gives the GEMM's set)."""
    wq, ws = random_fp8_weight(256, 256)
    lay = Fp8BlockLinear.from_fp8(wq, ws, torch.zeros(256, dtype=torch.bfloat16), backend="reference")
    x = random_activation(2, 256) if x is None else x
    with torch.no_grad():
        lay(x)
        plan, = ops.PLANS.plans_of(lay.weight)
        plan.graphed, plan.device_index = True, -1
        for _ in range(EagerGraphs.HOT):
            lay(x)
    lay.x = x
    return lay


@pytest.fixture
def layer(stubs):
    return _graphed_layer()


def _hit(lay, x=None, scales=None, bias="same", backend="same"):
    x = lay.x if x is None else x
    shortcut = ops.SHORTCUTS.of(lay.weight)
    assert shortcut is not None
    return shortcut(x, lay.weight, lay.weight_scale_inv if scales is None else scales,
                    lay.bias if bias == "same" else bias, lay.backend if backend == "same" else backend) is not None


def test_the_same_call_replays_its_set(layer):
    with torch.no_grad():
        assert _hit(layer)
        assert _hit(layer, x=layer.x.clone())  # another tensor of the same layout


@pytest.mark.parametrize("change", ["rows", "dtype", "stride", "subclass"])
def test_another_activation_layout_or_type_takes_the_full_path(layer, change):
    x = layer.x
    other = {"rows": lambda: random_activation(3, 256), "dtype": lambda: x.half(),
             "stride": lambda: torch.cat([x, x], 1)[:, ::2], "subclass": lambda: torch.nn.Parameter(x)}[change]()
    with torch.no_grad():
        assert not _hit(layer, x=other)


def test_other_weight_side_tensors_or_settings_take_the_full_path(layer, monkeypatch):
    with torch.no_grad():
        assert not _hit(layer, scales=layer.weight_scale_inv.clone())
        assert not _hit(layer, bias=None)
        assert not _hit(layer, bias=layer.bias.clone())
        assert not _hit(layer, backend="triton")
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
        assert not _hit(layer)
        monkeypatch.delenv(dispatch.ENV_VAR)
        assert _hit(layer)
        dispatch._GENERATION[0] += 1
        assert not _hit(layer)


def test_a_call_that_needs_gradients_goes_through_the_function_around_the_same_set(layer):
    with torch.enable_grad():
        assert _hit(layer)  # grad mode alone: nothing requires grad
        x = layer.x.clone().requires_grad_()
        y = ops.SHORTCUTS.of(layer.weight)(x, layer.weight, layer.weight_scale_inv, layer.bias, layer.backend)
    assert type(y.grad_fn).__name__ == "_LinearFnBackward"
    assert y.untyped_storage()._cdata == ops.SHORTCUTS.of(layer.weight).graphs.storage  # the set's output


def test_compile_modes_tracing_and_captures_take_the_full_path(layer, monkeypatch):
    with torch.no_grad():
        with _PassFunctions():
            assert not _hit(layer)
        with _PassDispatch():
            assert not _hit(layer)
        for name in ("_is_compiling", "_tracing", "_capturing"):
            with monkeypatch.context() as m:
                m.setattr(ops, name, lambda: True)
                assert not _hit(layer)
        assert _hit(layer)


def test_another_device_stream_thread_or_storage_takes_the_full_path(layer, monkeypatch):
    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setattr(EagerGraphs, "enabled", False)
            assert not _hit(layer)
        with monkeypatch.context() as m:
            m.setattr(ops, "_current_device", lambda: 0)
            assert not _hit(layer)
        with monkeypatch.context() as m:
            m.setattr(ops, "current_raw_stream", lambda index: 8)
            assert not _hit(layer)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(_hit(layer)))
        thread.start()
        thread.join()
        assert seen == [False]
        layer.weight.data = layer.weight.clone()  # same tensor, new storage: the set's graphs read the old one
        assert not _hit(layer)


def test_a_copy_of_a_layer_starts_without_one_and_a_freed_weight_drops_it(stubs):
    lay = _graphed_layer()
    assert ops.SHORTCUTS.of(lay.weight) is not None
    clone = copy.deepcopy(lay)
    assert ops.SHORTCUTS.of(clone.weight) is None
    key, weight = id(lay.weight), weakref.ref(lay.weight)
    assert key in ops.SHORTCUTS._by_weight
    del lay
    gc.collect()
    assert weight() is None and key not in ops.SHORTCUTS._by_weight


def test_the_functional_linear_remembers_nothing(layer):
    wq, ws = random_fp8_weight(256, 256)
    with torch.no_grad():
        for _ in range(EagerGraphs.HOT + 2):
            ops.linear(layer.x, wq, ws, backend="reference")
    assert ops.SHORTCUTS.of(wq) is None


def test_a_layer_with_a_shortcut_compiles_in_one_graph(layer):
    assert ops.SHORTCUTS.of(layer.weight) is not None
    with torch.no_grad():
        got = torch.compile(layer, backend="aot_eager", fullgraph=True)(layer.x)
    want = torch.ops.blockfp8.linear(layer.x, layer.weight, layer.weight_scale_inv, layer.bias, "reference")
    assert torch.equal(got, want)


def test_calls_with_autograd_on_remember_their_set_too(stubs):
    wq, ws = random_fp8_weight(256, 256)
    lay = Fp8BlockLinear.from_fp8(wq, ws, None, backend="reference")
    x = random_activation(2, 256).requires_grad_()
    lay(x)
    plan, = ops.PLANS.plans_of(lay.weight)
    plan.graphed, plan.device_index = True, -1
    for _ in range(EagerGraphs.HOT - 1):
        lay(x)  # direct launches: the set has not captured yet, nothing to remember
    assert ops.SHORTCUTS.of(lay.weight) is None
    y = lay(x)  # the capture, and the first replay
    shortcut = ops.SHORTCUTS.of(lay.weight)
    assert shortcut is not None and y.untyped_storage()._cdata == shortcut.graphs.storage


def test_a_layer_fed_a_quantized_activation_replays_its_gemm_set(stubs):
    from blockfp8.quant import QuantizedActivation, quantize_activation

    lay = _graphed_layer(QuantizedActivation(*quantize_activation(random_activation(2, 256)), torch.bfloat16))
    qa = lay.x
    shortcut = ops.SHORTCUTS.of(lay.weight)
    assert type(shortcut) is ops.GemmShortcut
    with torch.no_grad():
        assert _hit(lay)
        assert _hit(lay, x=QuantizedActivation(qa.values.clone(), qa.scales.clone(), qa.dtype))
        y = lay(qa)
        assert y.untyped_storage()._cdata == shortcut.graphs.storage  # the set's output, not a direct launch
        del y
        col = torch.empty(qa.scales.shape[::-1]).t()
        col.copy_(qa.scales)
        others = [QuantizedActivation(qa.values, qa.scales, torch.float16),  # another output dtype
                  QuantizedActivation(qa.values, col, qa.dtype, "col"),  # the scales in another layout
                  QuantizedActivation(qa.values[:1], qa.scales[:1], qa.dtype),  # other rows
                  QuantizedActivation(qa.values.view(torch.uint8), qa.scales, qa.dtype),  # not fp8
                  QuantizedActivation(qa.values, qa.scales.double(), qa.dtype),
                  qa.values.float()]  # a float input: the linear's own shortcut, not this one
        for other in others:
            assert not _hit(lay, x=other)
        assert not _hit(lay, scales=lay.weight_scale_inv.clone())
        assert not _hit(lay, bias=None)
    with torch.enable_grad():
        assert not _hit(lay, bias=lay.bias.clone().requires_grad_())


def test_a_norm_and_its_stacked_projections_replay_one_set(stubs, monkeypatch):
    """``Fp8NormProjections``' eager call, once its GEMM's plan is built and graphed, comes from one set holding the
    norm's producer and the GEMM (the stub capture runs the set's kernels once, so its output is checked too)."""
    from blockfp8.modules import Fp8NormProjections, Fp8RMSNorm

    def capture(self, inputs, run, operands, keep_graph=False):
        run(*inputs, *operands, out=self.out)
        return _Graph()

    monkeypatch.setattr(EagerGraphs, "_capture", capture)
    wq, ws = random_fp8_weight(384, 256)
    norm = Fp8RMSNorm(256, eps=1e-5, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    module = Fp8NormProjections(norm, Fp8BlockLinear.from_fp8(wq, ws, None, backend="reference"))
    x = random_activation(2, 256).view(1, 2, 256)
    with torch.no_grad():
        want = module.proj(norm(x))
        plan, = ops.PLANS.plans_of(wq)  # built by that call
        plan.graphed, plan.device_index = True, -1
        for _ in range(EagerGraphs.HOT):
            got = module(x).outputs
        sets = [g for key, g in plan.graphs.items() if key[2][0] == "rms_norm_quant"]
        assert len(sets) == 1 and got.untyped_storage()._cdata == sets[0].storage
        assert torch.equal(got, want)
        del got
        # A changed eps is another graph: another set.
        norm.eps = 1e-3
        for _ in range(EagerGraphs.HOT):
            module(x)
        assert len([k for k in plan.graphs if k[2][0] == "rms_norm_quant"]) == 2
    with torch.enable_grad():  # autograd on: the two modules, no set
        y = module(x.clone().requires_grad_()).outputs
        assert y.untyped_storage()._cdata not in {g.storage for g in plan.graphs.values()}


def test_a_normed_mlp_replays_norm_gemms_and_silu_mul_from_one_set(stubs, monkeypatch):
    """``Fp8GatedMLP`` with its own norm: once both GEMMs' plans are built and graphed, an eager call comes from one
    set (kept with down's plan) holding the norm's producer, gate_up, the SiLU-mul and down; its output is the
    modules' (the stub capture runs the set's kernels once)."""
    from blockfp8.modules import Fp8GatedMLP, Fp8RMSNorm

    def capture(self, inputs, run, operands, keep_graph=False):
        run(*inputs, *operands, out=self.out)
        return _Graph()

    monkeypatch.setattr(EagerGraphs, "_capture", capture)
    gate_up, down = (Fp8BlockLinear.from_fp8(*random_fp8_weight(n, k), None, backend="reference")
                     for n, k in ((512, 256), (256, 256)))
    norm = Fp8RMSNorm(256, eps=1e-5, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    mlp = Fp8GatedMLP.from_linears(gate_up, down, norm=norm)
    x = random_activation(2, 256).view(1, 2, 256)
    with torch.no_grad():
        want = mlp(x)  # the modules, building both plans
        assert torch.equal(want, Fp8GatedMLP.from_linears(gate_up, down)(norm(x)))
        for lin in (gate_up, down):
            plan, = ops.PLANS.plans_of(lin.weight)
            plan.graphed, plan.device_index = True, -1
        for _ in range(EagerGraphs.HOT):
            got = mlp(x)
        down_plan, = ops.PLANS.plans_of(down.weight)
        sets = [g for key, g in down_plan.graphs.items() if key[2][0] == "rms_norm_quant+mlp"]
        assert len(sets) == 1 and got.untyped_storage()._cdata == sets[0].storage
        assert torch.equal(got, want)
        del got
        # A hook on one of the modules must see its call: then the modules run, not the set.
        seen = []
        handle = down.register_forward_hook(lambda *args: seen.append(1))
        assert mlp(x).untyped_storage()._cdata != sets[0].storage and seen == [1]
        handle.remove()
    with pytest.raises(ValueError, match="norm must be an Fp8RMSNorm of size 256"):
        Fp8GatedMLP.from_linears(gate_up, down, norm=Fp8RMSNorm(128))
