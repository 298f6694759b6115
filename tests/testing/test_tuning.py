"""tune's engine: candidate selection, the rows a cell writes, resumability with a fake measurement, and the
check-then-time filter feeding the cache -- on CPU."""

import pytest
import torch

from blockfp8 import dispatch, tuning_cache
from blockfp8.autotune import Trial
from blockfp8.backends import Problem
from blockfp8.backends.gluon import GluonConfig
from blockfp8.backends.gluon import likely_configs as gluon_likely
from blockfp8.backends.triton.configs import TritonConfig, candidate_configs, heuristic_config, likely_configs
from blockfp8.device import DeviceId
from blockfp8.testing.shapes import Shape
from blockfp8.testing.tuning import (
    Candidate,
    CellResult,
    cell_candidates,
    cell_rows,
    select_candidates,
    select_gluon,
    tune,
)

GPU = DeviceId("Fake GPU for tune", (9, 0), 132)


@pytest.mark.parametrize("m,n,k", [(1, 2112, 7168), (64, 7168, 2048), (512, 36864, 7168), (4096, 4096, 7168)])
def test_select_candidates(m, n, k):
    every = set(candidate_configs(m, n, k)) | set(likely_configs(m, n, k))
    base = heuristic_config(m, n, k, 132)
    for limit in (1, 2, 4, 12):
        picked = select_candidates(m, n, k, limit)
        assert picked[0] == base
        assert len(picked) == min(limit, len(every | {base}))
        assert len(set(picked)) == len(picked) and set(picked) <= every | {base}
    # The likely winners come before the rest of the search space.
    likely = [c for c in likely_configs(m, n, k) if c != base]
    assert select_candidates(m, n, k, 1 + len(likely))[1:] == likely
    assert set(select_candidates(m, n, k, 0)) == every | {base}


def test_select_candidates_keeps_the_incumbent():
    """The config the tables hold for a cell is always re-timed, so a re-tune never ends slower."""
    inc = TritonConfig(16, 32, split_k=3, group_m=1, swap_ab=True, num_warps=2, num_stages=2)
    picked = select_candidates(1, 2112, 7168, 5, incumbent=inc)
    assert picked[:2] == [heuristic_config(1, 2112, 7168, 132), inc] and len(picked) == 5
    assert select_candidates(1, 2112, 7168, 1, incumbent=inc) == [heuristic_config(1, 2112, 7168, 132), inc]


def test_likely_configs_fit_shared_memory():
    for m in (1, 16, 64):
        for c in likely_configs(m, 7168, 16384):
            assert (2 if c.pair_k else 1) * (c.block_m + c.block_n) * 128 * c.num_stages <= 200_000
    assert likely_configs(1, 7168, 16384)[0] == heuristic_config(1, 7168, 16384)


def test_select_gluon():
    inc = GluonConfig(block_m=64, block_n=64, num_warps=4, stages=2)
    for m in (1, 4096):
        likely = gluon_likely(m, 4096, 7168)
        assert select_gluon(m, 4096, 7168, 2) == likely[:2]
        assert select_gluon(m, 4096, 7168, 1, incumbent=inc) == [likely[0], inc]
        assert select_gluon(m, 4096, 7168, 0) == likely


def test_cell_candidates_cover_every_supporting_backend():
    p = Problem(16, 256, 512, "cuda", GPU.arch, torch.bfloat16, GPU.name, GPU.sms)
    cands = cell_candidates(p, torch.device("cpu"), ["reference", "triton"], max_configs=3, gluon_configs=2)
    assert {c.backend for c in cands} == {"triton"}  # never the reference; others unavailable on CPU
    assert len(cands) == 3 and all(isinstance(c.config, TritonConfig) for c in cands)


def _trial(backend, us, status="ok", config=None):
    return Trial(Candidate(backend, config), status, 1e-3 if status == "ok" else 0.5, us)


def test_cell_rows_layout():
    fast, slow = TritonConfig(16, 64, 4, 1, True, 4, 4, True), TritonConfig(64, 128)
    default = Candidate("triton", slow)
    r = CellResult("qkv", 2112, 7168, 16, [
        Trial(default, "ok", 1e-3, 12.0), _trial("triton", 9.0, config=fast), _trial("deepgemm", 10.0),
        _trial("cublas", 1.0, "wrong"), Trial(Candidate("gluon", GluonConfig()), "crashed", reason="boom")],
        default)
    tables, record = cell_rows(r)
    assert tables["dispatch"] == {"2112,7168": {"16": ["triton", "deepgemm"]}}  # wrong and crashed left out
    assert tables["triton"] == {"2112,7168": {"16": fast.to_json()}} and "gluon" not in tables
    assert record["source"] == "tune" and record["best"] == Candidate("triton", fast).label
    assert record["default"] == default.label and record["default_us"] == 12.0
    gluon = "gluon[block_m=128 block_n=128 num_warps=8 stages=4 group_m=8 unroll=2 persistent=False]"
    assert record["bad"] == {"cublas": "rel error 0.5", gluon: "boom"}
    nothing = CellResult("x", 64, 256, 1, [_trial("triton", None, "wrong")])
    assert cell_rows(nothing)[0] == {}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(tuning_cache, "library_versions", lambda: {"driver": "1", "torch": "1"})
    dispatch.clear_caches()
    yield tmp_path
    dispatch.clear_caches()


SHAPES = [Shape(256, 512, "first"), Shape(128, 256, "second")]


def test_interrupted_tune_keeps_what_it_finished_and_a_rerun_skips_it(cache):
    calls, die_at = [], [3]

    def fake_measure(weights, m, candidates, reps, on_bad):
        calls.append((tuple(weights[0][0].shape), m))
        if len(calls) in die_at:  # the first cell of the second shape: the run dies here
            die_at.clear()
            raise SystemExit("interrupted")
        return [Trial(c, "ok", 1e-3, 10.0 - i) for i, c in enumerate(candidates)]

    with pytest.raises(SystemExit):
        tune(SHAPES, [1, 128], torch.device("cpu"), dev=GPU, backends=["triton"], measure=fake_measure)
    found = tuning_cache.load(GPU)
    assert set(found.cells) == {"256,512,1", "256,512,128"}
    assert set(found.tables["dispatch"]) == set(found.tables["triton"]) == {"256,512"}
    dispatch.clear_caches()
    assert dispatch.choose(Problem(1, 256, 512, "cuda", GPU.arch, device_name=GPU.name, sms=GPU.sms)) == "triton"

    calls.clear()
    run = tune(SHAPES, [1, 128], torch.device("cpu"), dev=GPU, backends=["triton"], measure=fake_measure)
    assert [(s.name, m) for s, m in run.skipped] == [("first", 1), ("first", 128)]
    assert calls == [((128, 256), 1), ((128, 256), 128)] and len(run.results) == 2
    assert set(tuning_cache.load(GPU).cells) == {"256,512,1", "256,512,128", "128,256,1", "128,256,128"}
    # The fastest candidate's config is the one kept (the last candidate got the smallest time).
    cell = run.results[0]
    assert tuning_cache.load(GPU).tables["triton"]["128,256"]["1"] == cell.best.config.config.to_json()

    calls.clear()
    run = tune(SHAPES, [1, 128], torch.device("cpu"), dev=GPU, backends=["triton"], measure=fake_measure,
               force=True)
    assert len(calls) == 4 and not run.skipped


def test_online_cells_are_tuned_again(cache):
    """Online tuning measures backends only: ``blockfp8 tune`` does not count its cells as done."""
    tuning_cache.save(GPU, {"dispatch": {"256,512": {"1": ["triton"]}}}, {"256,512,1": {"source": "online"}})
    run = tune(SHAPES[:1], [1], torch.device("cpu"), dev=GPU, backends=["triton"],
               measure=lambda w, m, cands, reps, on_bad: [Trial(cands[0], "ok", 1e-3, 1.0)])
    assert len(run.results) == 1 and tuning_cache.load(GPU).cells["256,512,1"]["source"] == "tune"


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs on CPU only under the interpreter (no GPU here)")
def test_tune_measures_for_real_on_cpu(cache):
    """The real check-then-time path end to end (Triton under the interpreter, wall-clock timer)."""
    run = tune([Shape(64, 256, "tiny")], [1], torch.device("cpu"), dev=GPU, backends=["triton"], max_configs=2,
               reps=1)
    (cell,) = run.results
    assert all(t.status == "ok" and t.rel_error < 5e-3 for t in cell.trials) and len(cell.trials) == 2
    assert cell.default_trial is not None  # the dispatcher's choice before tuning was among the candidates
    assert tuning_cache.load(GPU).tables["dispatch"]["64,256"]["1"] == ["triton"]


def test_warm_processes_fit_the_free_memory():
    from blockfp8.testing.tuning import WARM_PROCESS_BYTES, warm_process_count

    gb = 1 << 30
    jobs = [(m, 7168, 18432, []) for m in (1, 4096)] * 20  # 40 cells; the largest holds ~0.8 GB of operands
    per_process = WARM_PROCESS_BYTES + 2 * (7168 * 18432 + 4 * 4096 * 18432 + 4 * 4096 * 7168)
    assert warm_process_count(jobs, 16, 80 * gb) == int(0.8 * 80 * gb) // per_process == 7  # an 80 GB H100
    assert warm_process_count(jobs, 16, 1000 * gb) == 16  # never more than asked
    assert warm_process_count(jobs[:3], 16, 1000 * gb) == 3  # nor more than cells
    assert warm_process_count(jobs, 16, 1 * gb) == 1  # at least one: a cell that does not fit fails in it alone
    assert warm_process_count(jobs, 0, 80 * gb) == 0 and warm_process_count([], 16, 80 * gb) == 0


def test_a_gluon_ring_of_one_slot_is_refused_before_any_launch():
    """Each K loop trip issues a group's wgmma before it releases the previous group's slot: with one slot the
    kernel would wait on itself and hang the GPU. The config refuses it when made."""
    with pytest.raises(ValueError, match="stages must be >= 2"):
        GluonConfig(stages=1)
    GluonConfig(stages=2, persistent=True)  # the smallest ring that runs
