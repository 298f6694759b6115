"""Choosing by measurement: the check-then-time loop, and online tuning's switches, its cache rows and its refusal
to run inside CUDA-graph capture or torch.compile tracing -- fake devices and fake timings, no GPU needed."""

import pytest
import torch
import torch._dynamo  # noqa: F401 - imported before the fixtures patch torch.compiler.is_compiling (see below)
from torch import nn

from blockfp8 import autotune, convert_model, dispatch, tables, tuning_cache
from blockfp8.autotune import Trial, tune_cell
from blockfp8.backends import Problem, Support, backend_names, get_backend
from blockfp8.status import Status

GPU = dict(device_type="cuda", arch=(9, 0), device_name="Fake Hopper", sms=100)
P = Problem(64, 4096, 512, **GPU)


def test_tune_cell_discards_wrong_and_failing_candidates():
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
    assert [t.config for t in autotune.ranked(trials)] == ["fastest", "base", "slow"]


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Online tuning on a fake device whose "measurement" is a table of times; records every measurement."""
    monkeypatch.setenv(tuning_cache.ENV_DIR, str(tmp_path))
    for name in backend_names():
        monkeypatch.setattr(get_backend(name), "_availability", Support(True))
    measured = []

    def fake_measure(p, *operands):
        measured.append((p.n, p.k, p.m))
        return [Trial("deepgemm", Status.OK, 1e-3, 9.0), Trial("cublas", Status.OK, 1e-3, 3.0),
                Trial("triton", Status.WRONG, 0.3), Trial("gluon", Status.CRASHED, reason="boom")]

    monkeypatch.setattr(autotune, "measure_backends", fake_measure)
    # Dynamo records torch.compiler.is_compiling when it is first imported: imported under this patch, it would
    # keep the lambda and refuse the real function in every later torch.compile of the process.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    autotune.set_autotune(True)
    dispatch.clear_caches()
    yield measured
    autotune.set_autotune(None)
    autotune._shapes.clear()
    dispatch.clear_caches()


def operands():
    raise AssertionError("the fake measurement never asks for operands")


def test_online_tuning_measures_once_and_keeps_the_winner(online):
    assert dispatch.choose(Problem(64, 4096, 512, **GPU)) == "deepgemm"  # no operands: never measured
    assert online == []
    assert dispatch.choose(P, operands=lambda: ()) == "cublas"
    assert online == [(4096, 512, 64)]
    assert dispatch.choose(Problem(40, 4096, 512, **GPU), operands=lambda: ()) == "cublas"  # same bucket
    assert online == [(4096, 512, 64)]
    found = tuning_cache.load(P.device_id)
    assert found.tables["dispatch"] == {"4096,512": {"64": ["cublas", "deepgemm"]}}  # wrong/crashed never ranked
    assert found.cells["4096,512,64"]["source"] == "online"
    assert dispatch.explain_problem(P).source.startswith("online row (Fake Hopper, N=4096 K=512, measured at M=64)")
    # A new process (the in-memory state forgotten) reads it back without measuring.
    dispatch.clear_caches()
    assert dispatch.choose(P, operands=lambda: ()) == "cublas" and len(online) == 1


def test_online_tuning_is_off_by_default_and_skips_measured_cells(online, monkeypatch):
    autotune.set_autotune(None)
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    assert not autotune.autotune_enabled()
    dispatch.choose(P, operands=lambda: ())
    assert online == []
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    autotune.set_autotune(None)
    assert autotune.autotune_enabled()
    # A shape the shipped H100 table measured at this bucket is not measured again.
    h100 = Problem(64, 2112, 7168, "cuda", (9, 0), device_name="NVIDIA H100 80GB HBM3", sms=132)
    dispatch.choose(h100, operands=lambda: ())
    assert online == []
    # CPU problems are never tuned online.
    dispatch.choose(Problem(64, 4096, 512, "cpu", device_name="cpu"), operands=lambda: ())
    assert online == []
    with pytest.raises(TypeError, match="enabled"):
        autotune.set_autotune("yes")


@pytest.mark.parametrize("predicate,why", [(torch.compiler, "torch.compile is tracing"),
                                           (torch.cuda, "a CUDA graph is being captured")])
def test_online_tuning_never_runs_inside_capture_or_compile(online, monkeypatch, predicate, why):
    name = "is_compiling" if predicate is torch.compiler else "is_current_stream_capturing"
    monkeypatch.setattr(predicate, name, lambda: True)
    assert dispatch.choose(P, operands=operands) == "deepgemm"  # the static choice, nothing measured
    assert online == []
    source = dispatch.explain_problem(P).source
    assert source.startswith("static rule 'decode'") and f"online tuning did not run because {why}" in source
    # Once out of the capture/trace, the next call measures.
    monkeypatch.setattr(predicate, name, lambda: False)
    assert dispatch.choose(P, operands=lambda: ()) == "cublas" and online == [(4096, 512, 64)]
    assert "did not run" not in dispatch.explain_problem(P).source


def test_convert_model_tune_turns_on_online_tuning_for_its_shapes(online):
    autotune.set_autotune(False)
    model = nn.Sequential(nn.Linear(512, 4096), nn.Linear(4096, 256))
    convert_model(model, tune=False)
    assert not autotune.wanted(P)
    convert_model(nn.Sequential(nn.Linear(512, 4096), nn.Linear(4096, 256)), tune=True)
    assert autotune.wanted(P) and autotune.wanted(Problem(1, 256, 4096, **GPU))
    assert not autotune.wanted(Problem(1, 4096, 4096, **GPU))  # not a shape it created
    assert not autotune.wanted(Problem(64, 4096, 512, "cpu", device_name="cpu"))  # CUDA only
    assert dispatch.choose(P, operands=lambda: ()) == "cublas" and online == [(4096, 512, 64)]


def test_online_rows_are_keyed_like_every_cache_row(online, monkeypatch):
    dispatch.choose(P, operands=lambda: ())
    versions = dict(tuning_cache.library_versions())
    monkeypatch.setattr(tuning_cache, "library_versions", lambda: {**versions, "triton": "99.0"})
    dispatch.clear_caches()
    assert tables.lookup("dispatch", P.device_id, 4096, 512, 64) is None


def test_unwritable_cache_keeps_the_ranking_in_memory(online, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(tuning_cache, "save", refuse)
    with pytest.warns(UserWarning, match="cannot write the tuning cache.*in this process only"):
        assert dispatch.choose(P, operands=lambda: ()) == "cublas"
    assert dispatch.choose(P, operands=lambda: ()) == "cublas" and len(online) == 1
    assert dispatch.explain_problem(P).source.startswith("recorded row")


def test_a_cell_measured_at_another_bucket_is_still_tuned(online):
    # A row at M=1 answers M=16 queries (its phase), but the M=16 bucket itself was never measured: tune it.
    tables.record("dispatch", GPU["device_name"], 4096, 512, 1, ["triton"])
    try:
        assert dispatch.choose(Problem(16, 4096, 512, **GPU), operands=lambda: ()) == "cublas"
        assert online == [(4096, 512, 16)]
    finally:
        tables.forget_recorded()


def test_measure_backends_never_ranks_a_wrong_result(monkeypatch):
    """The real measurement, on the CPU: a backend that returns zeros is checked against the reference and
    left out of the ranking, however fast it is."""
    from blockfp8.quant import quantize_activation
    from blockfp8.testing.operands import random_activation, random_fp8_weight

    p = Problem.of(2, 128, 256, "cpu")
    fast_and_wrong = get_backend("triton")
    if not fast_and_wrong.supports(p):
        pytest.skip(f"triton does not run here: {fast_and_wrong.supports(p).reason}")
    monkeypatch.setattr(fast_and_wrong, "run",
                        lambda x, s, w, ws, b, dt, out=None: torch.zeros(x.shape[0], w.shape[0], dtype=dt))
    wq, ws = random_fp8_weight(128, 256)
    xq, xs = quantize_activation(random_activation(2, 256))
    trials = autotune.measure_backends(p, xq, xs, wq, ws, reps=1)
    assert {t.config: t.status for t in trials}["triton"] == Status.WRONG
    assert "triton" not in [t.config for t in autotune.ranked(trials)]
