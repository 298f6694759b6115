"""When eager_graphs.EagerGraphs captures, replays or launches directly (CPU: captures are stubbed; the graphs
themselves are tested on the GPU in test_eager_graphs.py)."""

from __future__ import annotations

import pytest
import torch

from blockfp8.eager_graphs import EagerGraphs


class _Graph:
    def __init__(self, inputs):
        self.inputs, self.replays = inputs, 0

    def replay(self):
        self.replays += 1


@pytest.fixture
def graphs(monkeypatch):
    made = []

    def capture(self, inputs, run, operands):
        self.captures += 1
        made.append(_Graph(inputs))
        return made[-1]

    monkeypatch.setattr(EagerGraphs, "_capture", capture)
    g = EagerGraphs(torch.device("cpu"), (1, 8), torch.bfloat16, stream=0, ptrs=(1, 2, 0))
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
