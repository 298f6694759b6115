"""Eager decode calls replayed from CUDA graphs (eager_graphs.py): a replay gives the bytes of a direct launch,
never rewrites an output (or a view of one) that is still held, reads a caller's activation in place once its
address repeats, and stays out of a caller's own capture. GPU only."""

from __future__ import annotations

import pytest
import torch

import blockfp8
from blockfp8 import Fp8BlockLinear, graph_args
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


@pytest.fixture
def no_rebinding(monkeypatch):
    monkeypatch.setattr(graph_args, "keeps_graphs", lambda: False)


def _skip_unavailable(backend):
    be = blockfp8.backends.get_backend(backend) if backend else None
    if be is not None and not be.availability():
        pytest.skip(be.availability().reason)


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_moving_activations_replay_one_rebound_graph_with_the_bytes_of_a_direct_launch(backend):
    _skip_unavailable(backend)
    layer = _layer(backend=backend, bias=True)
    xs = []
    with torch.inference_mode():
        for step in range(EagerGraphs.HOT + 6):
            xs.append(random_activation(4, 7168, seed=step, device="cuda").view(1, 4, 7168))  # all alive: new addresses
            y = layer(xs[-1])
            assert torch.equal(y, _direct(xs[-1], layer)), f"step {step}"
            del y
        graphs, = _sets(layer.weight)
        assert graphs.moving is not None and graphs.captures == 1 and graphs.copy_graph is None
        for step, x in enumerate(xs):  # earlier addresses again, in another order
            y = layer(x)
            assert torch.equal(y, _direct(x, layer)), f"again {step}"
            del y
    assert graphs.captures == 1 and not graphs.in_place


def test_queued_replays_keep_the_activation_they_were_called_with():
    layer = _layer()
    xs = [random_activation(1, 7168, seed=i, device="cuda") for i in range(3)]
    with torch.inference_mode():
        for _ in range(EagerGraphs.HOT):
            layer(xs[0])
        want = [_direct(x, layer) for x in xs]
        torch.cuda._sleep(50_000_000)  # every call below is queued behind this before any runs
        got = [layer(x).clone() for x in xs]
        assert _sets(layer.weight)[0].moving is not None
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


def test_an_unaligned_activation_is_copied_not_rebound():
    layer = _layer()
    base = random_activation(1, 7168 + 8, device="cuda")
    aligned, odd = base[:, :7168], base[:, 1:7169]  # odd starts 2 bytes past a 16-byte boundary
    with torch.inference_mode():
        for _ in range(EagerGraphs.HOT):
            layer(aligned)
        graphs, = _sets(layer.weight)
        assert graphs.moving is not None and odd.data_ptr() % 16
        assert torch.equal(layer(odd), _direct(odd, layer))
    assert graphs.moving.address == aligned.data_ptr()


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_a_decode_loop_replays_in_place_with_the_bytes_of_a_direct_launch(backend, no_rebinding):
    _skip_unavailable(backend)
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


def test_calls_from_ever_new_addresses_copy_and_stop_capturing(no_rebinding):
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


def test_a_graph_that_reads_the_activation_twice_fails_the_proof_and_stays_right():
    """The quantizer's argument is found, but a second kernel reads the activation too (through an argument the
    search does not see): rebinding only the first would read stale data, so the proof must refuse it."""
    from blockfp8.backends.triton.act_quant import quantize_activation_fused

    def run(x, out):
        q, s = quantize_activation_fused(x)
        return out.copy_(q.float() * s.repeat_interleave(128, -1) + x.float())

    graphs = EagerGraphs(torch.device("cuda", torch.cuda.current_device()), (2, 256), torch.float32,
                         torch.cuda.current_stream().cuda_stream)
    xs = [torch.randn(2, 256, device="cuda", dtype=torch.bfloat16) for _ in range(EagerGraphs.HOT + 4)]
    replays = 0
    for x in xs:
        y = graphs((x,), run, ())
        if y is not None:
            replays += 1
            assert torch.equal(y, run(x, torch.empty(2, 256, device="cuda")))
        del y
    assert replays == 5 and graphs.moving is None and graphs.tried_rebinding


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_a_norm_and_its_stacked_projections_replay_one_rebound_graph(backend):
    """``Fp8NormProjections`` in eager decode: the norm's producer and the stacked GEMM from one graph that follows
    the moving activation (the producer's kernel holds the only copy of its address), with the bytes of the two
    modules called one after the other."""
    from blockfp8.modules import Fp8NormProjections, Fp8RMSNorm

    _skip_unavailable(backend)
    norm = Fp8RMSNorm(4096, eps=1e-5, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    module = Fp8NormProjections(norm, _layer(6144, 4096, backend=backend))
    xs = []
    with torch.inference_mode():
        for step in range(EagerGraphs.HOT + 6):
            xs.append(random_activation(4, 4096, seed=step, device="cuda").view(1, 4, 4096))
            got = module(xs[-1]).outputs
            assert torch.equal(got, module.proj(norm(xs[-1]))), f"step {step}"
            del got
        plan = next(p for p in PLANS.plans_of(module.proj.weight) if p.graphs)
        graphs, = (g for key, g in plan.graphs.items() if key[2][0] == "rms_norm_quant")
        assert graphs.moving is not None and graphs.captures == 1 and graphs.copy_graph is None


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_a_normed_mlp_replays_one_rebound_graph(backend):
    """``Fp8GatedMLP`` with its own norm in eager decode: norm producer, gate_up, SiLU-mul and down from one graph
    that follows the moving activation, with the bytes of the modules called one after the other."""
    from blockfp8.modules import Fp8GatedMLP, Fp8RMSNorm

    _skip_unavailable(backend)
    norm = Fp8RMSNorm(4096, eps=1e-5, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    gate_up, down = _layer(2 * 1536, 4096, backend=backend), _layer(4096, 1536, backend=backend)
    mlp, plain = Fp8GatedMLP.from_linears(gate_up, down, norm=norm), Fp8GatedMLP.from_linears(gate_up, down)
    xs = []
    with torch.inference_mode():
        for step in range(EagerGraphs.HOT + 6):
            xs.append(random_activation(4, 4096, seed=step, device="cuda").view(1, 4, 4096))
            got = mlp(xs[-1])
            assert torch.equal(got, plain(norm(xs[-1]))), f"step {step}"
            del got
        plan = next(p for p in PLANS.plans_of(down.weight) if p.graphs)
        graphs, = (g for key, g in plan.graphs.items() if key[2][0] == "rms_norm_quant+mlp")
        assert graphs.moving is not None and graphs.captures == 1 and graphs.copy_graph is None
