"""tune: candidate selection, the check-then-time filter with a fake timer, the table format, and the CLI's
clean refusal without a GPU."""

import pytest
import torch

from blockfp8.backends.triton.configs import TritonConfig, candidate_configs, heuristic_config
from blockfp8.cli import main
from blockfp8.cli.tune import NEEDS_CUDA
from blockfp8.testing.tuning import CellResult, Trial, select_candidates, tune_cell, tuned_table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_needs_cuda(capsys):
    assert main(["tune", "--shapes", "64:256", "--m", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "needs a CUDA device" in err and NEEDS_CUDA.split(":")[0] in err


@pytest.mark.parametrize("m,n,k", [(1, 2112, 7168), (64, 7168, 2048), (512, 36864, 7168), (4096, 4096, 7168)])
def test_select_candidates(m, n, k):
    every = candidate_configs(m, n, k)
    base = heuristic_config(m, n, k, 132)
    for limit in (1, 2, 5, 12):
        picked = select_candidates(m, n, k, limit)
        assert picked[0] == base
        assert len(picked) == min(limit, 1 + len([c for c in set(every) if c != base]))
        assert len(set(picked)) == len(picked)
        assert all(c in every for c in picked[1:])
    assert set(select_candidates(m, n, k, 0)) == set(every) | {base}


def test_select_candidates_keeps_the_incumbent():
    """The config the shipped table holds for a cell is always re-timed, so a re-tune never ends slower."""
    inc = TritonConfig(16, 32, split_k=3, group_m=1, swap_ab=True, num_warps=2, num_stages=2)
    picked = select_candidates(1, 2112, 7168, 5, incumbent=inc)
    assert picked[:2] == [heuristic_config(1, 2112, 7168, 132), inc] and len(picked) == 5
    assert select_candidates(1, 2112, 7168, 1, incumbent=inc)[-1] == inc  # kept even past the limit


def test_tune_cell_discards_wrong_and_failing_configs():
    configs = ["base", "fast_but_wrong", "raises", "slow", "fastest", "times_out"]
    errors = {"fast_but_wrong": 0.2}
    times = {"base": 10.0, "fast_but_wrong": 1.0, "slow": 20.0, "fastest": 4.0}
    measured, bad = [], []

    def check(c):
        if c == "raises":
            raise RuntimeError("out of resources: shared memory\nmore")
        return errors.get(c, 1e-3)

    def measure(c):
        measured.append(c)
        if c == "times_out":
            raise TimeoutError("graph capture failed")
        return times[c]

    trials = tune_cell(configs, check, measure, on_bad=bad.append)
    status = {t.config: t.status for t in trials}
    assert status == {"base": "ok", "fast_but_wrong": "wrong", "raises": "crashed", "slow": "ok", "fastest": "ok",
                      "times_out": "crashed"}
    assert "fast_but_wrong" not in measured and "raises" not in measured  # never timed
    assert [t.config for t in bad] == ["fast_but_wrong", "raises", "times_out"]
    assert trials[2].reason == "RuntimeError: out of resources: shared memory"
    cell = CellResult("s", 64, 256, 1, trials)
    assert cell.best.config == "fastest" and cell.baseline.config == "base"


def test_tuned_table_layout():
    a, b = TritonConfig(16, 64, 4, 1, True, 4, 3), TritonConfig(128, 128)
    results = [
        CellResult("x", 2112, 7168, 1, [Trial(a, "ok", 1e-3, 5.0), Trial(b, "ok", 1e-3, 3.0)]),
        CellResult("x", 2112, 7168, 64, [Trial(a, "wrong", 0.5)]),  # nothing correct: left out
    ]
    assert tuned_table(results, "GPU") == {"GPU": {"2112,7168": {"1": b.to_json()}}}
    assert TritonConfig.from_json(tuned_table(results, "GPU")["GPU"]["2112,7168"]["1"]) == b
