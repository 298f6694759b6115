"""Eager decode calls replayed from CUDA graphs (eager_graphs.py): a replay gives the bytes of a direct launch,
never rewrites an output (or a view of one) that is still held, reads a caller's activation in place once its
address repeats, and stays out of a caller's own capture. GPU only."""

from __future__ import annotations

import pytest
import torch

import blockfp8
from blockfp8 import Fp8BlockLinear
from blockfp8.eager_graphs import EagerGraphs
from blockfp8.ops import PLANS
from blockfp8.testing.operands import random_activation, random_fp8_weight

pytestmark = pytest.mark.gpu

BACKENDS = ["triton", "gluon", "cublas", "deepgemm"]


def _direct(x, layer):
    return torch.ops.blockfp8.linear(x, layer.weight, layer.weight_scale_inv, layer.bias, layer.backend or "")


def _sets(weight):
    plan, = PLANS.plans_of(weight)
    return list(plan.graphs.values())


def _layer(n=2112, k=7168, backend=None, bias=False):
    wq, ws = random_fp8_weight(n, k, device="cuda")
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    return Fp8BlockLinear.from_fp8(wq, ws, b, backend=backend)


@pytest.fixture(autouse=True)
def _graphs_on(monkeypatch):
    monkeypatch.setattr(EagerGraphs, "enabled", True)
    yield
    assert EagerGraphs.enabled, "a capture failed (see the RuntimeWarning): eager calls stopped replaying graphs"


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_a_decode_loop_replays_in_place_with_the_bytes_of_a_direct_launch(backend):
    be = blockfp8.backends.get_backend(backend) if backend else None
    if be is not None and not be.availability():
        pytest.skip(be.availability().reason)
    layer = _layer(backend=backend, bias=True)
    x = torch.empty(1, 4, 7168, device="cuda", dtype=torch.bfloat16)  # a fixed address, as a decode loop's
    with torch.inference_mode():
        for step in range(EagerGraphs.STREAK + 2):
            x.copy_(random_activation(4, 7168, seed=step, device="cuda").view(1, 4, 7168))
            y = layer(x)
            assert y.shape == (1, 4, 2112)
            assert torch.equal(y, _direct(x, layer)), f"step {step}"
            del y
    graphs, = _sets(layer.weight)
    # HOT - 1 direct launches, then the copying graph; after STREAK calls in a row from x's address a graph
    # reading x in place, then replays.
    assert EagerGraphs.HOT < EagerGraphs.STREAK
    assert graphs.captures == 2 and list(graphs.in_place) == [(x.data_ptr(),)]


def test_a_set_called_once_never_captures_and_alternating_addresses_never_capture_in_place():
    layer = _layer()
    a, b = random_activation(1, 7168, seed=1, device="cuda"), random_activation(1, 7168, seed=2, device="cuda")
    with torch.inference_mode():
        assert torch.equal(layer(a), _direct(a, layer))
        graphs, = _sets(layer.weight)
        assert graphs.captures == 0
        for x in [a, a, b, b, a, a, a, b] * 3:  # never STREAK calls in a row from one address
            assert torch.equal(layer(x), _direct(x, layer))
    assert graphs.captures == 1 and not graphs.in_place


def test_a_held_output_is_never_rewritten():
    layer = _layer()
    x1, x2 = random_activation(4, 7168, seed=1, device="cuda"), random_activation(4, 7168, seed=2, device="cuda")
    with torch.inference_mode():
        for _ in range(EagerGraphs.HOT + EagerGraphs.STREAK):  # past the captures: later calls replay
            layer(x1)
        y1 = layer(x1)
        want1 = y1.clone()
        y2 = layer(x2)
        y3 = layer(x1)
        assert torch.equal(y1, want1) and not torch.equal(y1, y2)
        assert torch.equal(y2, _direct(x2, layer)) and torch.equal(y3, want1)


def test_a_view_of_an_output_counts_as_held():
    layer = _layer()
    x1, x2 = random_activation(2, 7168, seed=1, device="cuda"), random_activation(2, 7168, seed=2, device="cuda")
    with torch.inference_mode():
        for _ in range(EagerGraphs.HOT + EagerGraphs.STREAK):
            layer(x1)
        row = layer(x1)[1]  # the output itself is dropped at once, a view of it is kept
        want = row.clone()
        layer(x2)
        assert torch.equal(row, want)


def test_calls_from_ever_new_addresses_copy_and_stop_capturing():
    layer = _layer()
    with torch.inference_mode():
        xs = [random_activation(1, 7168, seed=i, device="cuda") for i in range(2 * EagerGraphs.CAPTURES + 4)]
        for x in xs:  # all alive: every call comes from a new address
            assert torch.equal(layer(x), _direct(x, layer))
        for x in xs:  # each address a second time
            assert torch.equal(layer(x), _direct(x, layer))
    graphs, = _sets(layer.weight)
    assert graphs.captures <= EagerGraphs.CAPTURES and len(graphs.in_place) <= EagerGraphs.IN_PLACE


def test_gemm_replays_and_matches_the_op():
    wq, ws = random_fp8_weight(2112, 7168, device="cuda")
    with torch.inference_mode():
        for step in range(EagerGraphs.HOT + 2):
            xq, xs = blockfp8.quantize_activation(random_activation(3, 7168, seed=step, device="cuda"))
            got = blockfp8.gemm(xq, xs, wq, ws)
            assert torch.equal(got, torch.ops.blockfp8.gemm(xq, xs, wq, ws, None, torch.bfloat16, ""))
            del got


def test_autograd_output_can_be_modified_in_place_and_gradients_are_right():
    layer = _layer()
    w = blockfp8.dequantize_weight(layer.weight, layer.weight_scale_inv, dtype=torch.float32)
    for step in range(EagerGraphs.HOT + 2):
        x = random_activation(2, 7168, seed=step, device="cuda").requires_grad_()
        y = layer(x)
        y.mul_(2)  # a Function's output that is not a view: in-place ops are allowed
        y.float().sum().backward()
        want = (2 * w.sum(0)).expand(2, -1)
        assert float((x.grad.float() - want).norm() / want.norm()) < 1e-2


def test_new_weight_storage_is_read_after_a_replay():
    layer = _layer()
    x = random_activation(1, 7168, device="cuda")
    with torch.inference_mode():
        for _ in range(EagerGraphs.HOT + EagerGraphs.STREAK):
            layer(x)
        before = layer(x).clone()
    with torch.no_grad():
        layer.weight.data = torch.flip(layer.weight, (0,)).contiguous()  # same tensor, new storage
    with torch.inference_mode():
        after = layer(x)
        assert torch.equal(after, _direct(x, layer)) and not torch.equal(after, before)


def test_eager_graphs_stay_out_of_a_callers_capture():
    from blockfp8.testing.timing import capture_graph

    layer = _layer()
    x = random_activation(2, 7168, device="cuda")
    with torch.inference_mode():
        want = layer(x).clone()
        graph, out = capture_graph(lambda: layer(x), warmup=1)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, want)
