"""When eager_graphs.EagerGraphs captures, replays or launches directly (CPU: captures are stubbed; the graphs
themselves are tested on the GPU in test_eager_graphs.py)."""

from __future__ import annotations

import pytest
import torch

from blockfp8 import graph_args
from blockfp8.eager_graphs import EagerGraphs


class _Graph:
    def __init__(self, inputs):
        self.inputs, self.replays = inputs, 0

    def replay(self):
        self.replays += 1


@pytest.fixture
def graphs(monkeypatch):
    made = []

    def capture(self, inputs, run, operands, keep_graph=False):
        self.captures += 1
        made.append(_Graph(inputs))
        return made[-1]

    monkeypatch.setattr(EagerGraphs, "_capture", capture)
    monkeypatch.setattr(graph_args, "keeps_graphs", lambda: False)  # the rebinding's own tests turn it on
    g = EagerGraphs(torch.device("cpu"), (1, 8), torch.bfloat16, stream=0)
    g.made = made
    return g


def _call(g, x):
    return g((x,), None, ())


def test_captures_are_bought_as_a_rental(graphs):
    """Pinned: a capture (~0.47 ms) costs about eight direct launches and about forty-eight input copies."""
    assert (EagerGraphs.HOT, EagerGraphs.STREAK, EagerGraphs.IN_PLACE, EagerGraphs.CAPTURES) == (8, 48, 2, 3)
    x = torch.zeros(1, 16)
    replayed = [_call(graphs, x) is not None for _ in range(EagerGraphs.STREAK + 1)]  # each output dropped
    assert replayed == [False] * (EagerGraphs.HOT - 1) + [True] * (EagerGraphs.STREAK + 2 - EagerGraphs.HOT)
    copying, in_place = graphs.made
    assert copying.inputs[0] is not x and in_place.inputs[0] is x  # a buffer, then the caller's own tensor
    assert copying.replays == EagerGraphs.STREAK - EagerGraphs.HOT and in_place.replays == 2
    assert graphs.captures == 2


def test_addresses_that_move_never_capture_in_place(graphs):
    a, b = torch.zeros(1, 16), torch.ones(1, 16)
    for x in [a] * (EagerGraphs.STREAK - 1) + [b] + [a] * (EagerGraphs.STREAK - 1):
        _call(graphs, x)
    assert graphs.captures == 1 and not graphs.in_place
    assert torch.equal(graphs.copy_inputs[0], a)  # the last call's input was copied in


def test_a_held_output_means_a_direct_launch(graphs):
    x = torch.zeros(1, 16)
    for _ in range(EagerGraphs.HOT):
        y = _call(graphs, x)
    assert y is not None
    assert _call(graphs, x) is None  # y (an alias of the set's output) is still alive
    row = y[0]
    del y
    assert _call(graphs, x) is None  # a view keeps the output held too
    del row
    assert _call(graphs, x) is not None


def test_captures_stop_at_the_budget(graphs):
    xs = [torch.zeros(1, 16) for _ in range(3)]
    for x in xs:  # each address long enough for an in-place capture
        for _ in range(EagerGraphs.STREAK):
            _call(graphs, x)
    assert graphs.captures == EagerGraphs.CAPTURES and len(graphs.in_place) == EagerGraphs.IN_PLACE


class _Arg:
    """A stand-in for graph_args.PointerArg: records where it is pointed."""

    def __init__(self, address):
        self.address, self.moves = address, 0

    def point_at(self, address):
        if address % 16:
            return False
        self.moves += address != self.address
        self.address = address
        return True


@pytest.fixture
def rebinding(graphs, monkeypatch):
    monkeypatch.setattr(graph_args, "keeps_graphs", lambda: True)
    monkeypatch.setattr(graph_args.PointerArg, "find", classmethod(lambda cls, graph, address: _Arg(address)))
    monkeypatch.setattr(EagerGraphs, "_rebinds", lambda self, launch, arg, x, run, operands: graphs.proof)
    monkeypatch.setattr(graph_args, "launcher", lambda graph, stream: None)  # graph.replay, counted
    graphs.proof = True
    return graphs


def test_moving_addresses_replay_one_rebound_graph(rebinding):
    xs = [torch.zeros(1, 16) for _ in range(EagerGraphs.HOT + 20)]  # all alive: a new address at every call
    replayed = [_call(rebinding, x) is not None for x in xs]
    assert replayed == [False] * (EagerGraphs.HOT - 1) + [True] * 21
    graph, = rebinding.made
    assert graph.inputs[0] is xs[EagerGraphs.HOT - 1]  # captured on the caller's own tensor, no buffer
    assert graph.replays == 21 and rebinding.moving.moves == 20
    assert rebinding.captures == 1 and rebinding.copy_graph is None and not rebinding.in_place


def test_an_address_the_graph_cannot_take_uses_the_copying_graph(rebinding):
    base = torch.zeros(64)
    aligned, odd = base[:16].view(1, 16), base[1:17].view(1, 16)  # odd: 4 bytes past a 16-byte boundary
    for _ in range(EagerGraphs.HOT):
        _call(rebinding, aligned)
    assert rebinding.moving is not None and odd.data_ptr() % 16
    assert _call(rebinding, odd) is not None  # replayed from the copying graph, captured for it
    assert rebinding.copy_graph is not None and rebinding.captures == 2 and rebinding.moving.moves == 0


def test_a_graph_that_fails_the_proof_is_kept_for_its_address_only(rebinding):
    rebinding.proof = False
    a, b = torch.zeros(1, 16), torch.ones(1, 16)
    for _ in range(EagerGraphs.HOT):
        _call(rebinding, a)
    assert rebinding.moving is None and list(rebinding.in_place) == [(a.data_ptr(),)]
    assert _call(rebinding, b) is not None and rebinding.copy_graph is not None  # b is copied in
    assert rebinding.captures == 2
