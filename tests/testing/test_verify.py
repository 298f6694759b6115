"""tune --verify: the oracle, the scores and the summary on made-up records (CPU), what each policy lets the
dispatcher see, and the whole verification plus tuning on a GPU."""

import os
import subprocess
import sys

import pytest
import torch

import blockfp8
from blockfp8 import autotune, dispatch, tables, tuning_cache
from blockfp8.backends import Problem
from blockfp8.device import device_id
from blockfp8.reference import TOLERANCE
from blockfp8.testing.bench import Record
from blockfp8.testing.shapes import Shape
from blockfp8.testing.timing import Timing
from blockfp8.testing.tuning import tune
from blockfp8.testing.verify import TARGETS, cell_rows, fresh_cache, oracle, score, summarize, use_policy, verify


def rec(method, us, status="ok", kind="backend"):
    timing = Timing(us, us, us, None, 0.0, "graph", 2) if us else None
    return Record("s", 64, 256, 1, "gemm", method, kind, status, label=f"blockfp8->{method}", timing=timing)


def cell(dispatched: dict, **backends):
    return {"backends": {f"{name} (x)": rec(name, us) for name, us in backends.items()},
            **{policy: rec(choice, us, kind="dispatch") for policy, (choice, us) in dispatched.items()}}


def test_oracle_and_scores():
    c = cell({"static": ("triton", 10.0), "untuned": ("deepgemm", 5.0), "tuned": ("deepgemm", 4.0)},
             triton=10.0, deepgemm=4.0, cublas=8.0)
    c["backends"]["gluon (x)"] = rec("gluon", 1.0, status="wrong")  # fast but wrong: never the oracle
    assert oracle(c).method == "deepgemm"
    assert score(c, "static") == pytest.approx(0.4) and score(c, "untuned") == pytest.approx(0.8)
    assert score(c, "tuned") == 1.0
    c["tuned"] = rec("deepgemm", 4.0, status="crashed")
    assert score(c, "tuned") == 0.0  # a failed dispatched op scores zero


def test_summary_per_phase_and_targets():
    cells = {}
    for m, tuned_us in ((1, 10.0), (16, 10.0), (64, 10.5), (128, 20.0), (4096, 20.0)):
        cells[("s", 64, 256, m)] = cell({"static": ("a", 10.0 if m < 128 else 25.0), "untuned": ("a", 10.0),
                                         "tuned": ("a", tuned_us)}, a=10.0 if m < 128 else 20.0)
    s = summarize(cells)
    assert s["tuned"]["decode"]["cells"] == 3 and s["tuned"]["prefill"]["cells"] == 2
    assert s["tuned"]["decode"]["geomean"] == pytest.approx((1 * 1 * 10 / 10.5) ** (1 / 3))
    assert s["tuned"]["decode"]["worst_cell"] == ["s", 64, 256, 64]
    assert s["tuned"]["pass"]  # 0.984 >= 0.98, worst 0.952 >= 0.9
    assert not s["static"]["pass"] and s["static"]["prefill"]["geomean"] == pytest.approx(0.8)
    cells[("s", 64, 256, 16)]["tuned"] = rec("a", 11.5, kind="dispatch")  # one cell at 0.87 < 0.9
    assert not summarize(cells)["tuned"]["pass"]
    rows = cell_rows(cells)
    assert rows[0]["oracle"] == "a" and rows[0]["tuned"]["choice"] == "a" and rows[0]["tuned"]["score"] == 1.0
    assert TARGETS == {"tuned": (0.98, 0.90), "untuned": (0.95, None), "static": (0.95, None)}


def test_policies_hide_the_right_rows(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV_DIR, str(tmp_path))
    h100 = Problem(1, 2112, 7168, "cuda", (9, 0), device_name="NVIDIA H100 80GB HBM3", sms=132)
    sibling = Problem(1, 2112, 7168, "cuda", (9, 0), device_name="Fake H200", sms=132)
    try:
        use_policy("static", "Fake H200")
        assert dispatch.explain_problem(sibling).source.startswith("static rule")
        assert dispatch.explain_problem(h100).source.startswith("static rule")
        use_policy("untuned", "NVIDIA H100 80GB HBM3")  # the H100 as if it were new: no own shipped row
        assert dispatch.explain_problem(h100).source.startswith("static rule")
        use_policy("untuned", "Fake H200")  # a new device of the family: the H100's rows through the lookup
        assert dispatch.explain_problem(sibling).source.startswith("nearest measured shape: shipped row (NVIDIA H100")
    finally:
        tables.exclude()
        dispatch.clear_caches()


def test_fresh_cache_restores_everything(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV_DIR, str(tmp_path / "users"))
    autotune.set_autotune(True)
    try:
        with fresh_cache() as folder:
            assert tuning_cache.cache_dir() == tuning_cache.Path(folder) and not autotune.autotune_enabled()
            tables.exclude(sources=("shipped",))
        assert tuning_cache.cache_dir() == tmp_path / "users" and not os.path.exists(folder)
        assert tables._excluded_sources == frozenset()
    finally:
        autotune.set_autotune(None)


@pytest.mark.gpu
def test_tune_on_the_gpu_then_a_new_process_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV_DIR, str(tmp_path))
    dispatch.clear_caches()
    device = torch.device("cuda", torch.cuda.current_device())
    run = tune([Shape(4096, 512, "kv_b_proj TP8"), Shape(2112, 7168, "fused_qkv_a_proj")], [1, 64, 512], device,
               reps=3, warm_procs=2)
    assert len(run.results) == 6
    for r in run.results:
        assert r.best is not None and r.default_trial is not None
        assert all(t.rel_error <= TOLERANCE for t in r.trials if t.status == "ok")
        # The dispatcher now runs each cell's winner, with the winning launch config.
        p = Problem.of(r.m, r.n, r.k, device)
        assert dispatch.choose(p) == r.ranking()[0] == r.chosen.config.backend
        assert dispatch.explain_problem(p).source.startswith("cache row")
        if r.best_config("triton") is not None:
            from blockfp8.backends.triton.configs import get_config

            assert get_config(r.m, r.n, r.k, device) == r.best_config("triton")
    # A rerun skips every cell; a new process reads the rows.
    assert len(tune([Shape(4096, 512)], [1, 64, 512], device).skipped) == 3
    out = subprocess.run([sys.executable, "-m", "blockfp8", "explain", "64", "4096", "512"], capture_output=True,
                         text=True, env={**os.environ, tuning_cache.ENV_DIR: str(tmp_path)}, check=True).stdout
    assert "decided by: cache row" in out and str(tmp_path) in out


@pytest.mark.gpu
def test_online_tuning_on_the_gpu_skips_graph_capture(tmp_path, monkeypatch):
    from blockfp8.timer import capture_graph

    monkeypatch.setenv(tuning_cache.ENV_DIR, str(tmp_path))
    dev = device_id("cuda")
    wq, ws = blockfp8.quantize_weight(torch.randn(3072, 512, device="cuda"))
    x16 = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    x64 = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    try:
        autotune.set_autotune(False)
        dispatch.clear_caches()
        blockfp8.linear(x16, wq, ws)  # compile the static choice's kernels outside the capture
        autotune.set_autotune(True)
        dispatch.clear_caches()
        graph, out = capture_graph(lambda: blockfp8.linear(x16, wq, ws))
        graph.replay()
        torch.cuda.synchronize()
        assert "3072,512,16" not in tuning_cache.load(dev).cells
        assert "a CUDA graph is being captured" in blockfp8.explain(16, 3072, 512).source
        ref = blockfp8.linear(x16, wq, ws, backend="reference")
        assert blockfp8.rel_error(out, ref) <= TOLERANCE
        # Eager calls tune their cells: the result is correct and the row is kept.
        y = blockfp8.linear(x64, wq, ws)
        assert blockfp8.rel_error(y, blockfp8.linear(x64, wq, ws, backend="reference")) <= TOLERANCE
        assert tuning_cache.load(dev).cells["3072,512,64"]["source"] == "online"
        assert blockfp8.explain(64, 3072, 512).source.startswith("online row")
        blockfp8.linear(x16, wq, ws)
        assert "3072,512,16" in tuning_cache.load(dev).cells
    finally:
        autotune.set_autotune(None)
        dispatch.clear_caches()


@pytest.mark.gpu
def test_verify_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV_DIR, str(tmp_path))
    device = torch.device("cuda", torch.cuda.current_device())
    cells, run = verify([Shape(4096, 512, "kv_b_proj TP8")], [16, 512], device, reps=5, tune_reps=3)
    rows = cell_rows(cells)
    assert len(rows) == 2 and len(run.results) == 2
    for row in rows:
        assert row["oracle"] is not None
        for policy in ("static", "untuned", "tuned"):
            assert row[policy]["status"] == "ok" and 0.0 < row[policy]["score"] <= 1.5
    assert set(summarize(cells)) == {"static", "untuned", "tuned"}
    assert not list(tmp_path.iterdir())  # the user's cache folder was never written
