"""bench: counting, ceilings arithmetic, summaries, the dispatch-table format, and the CLI end to end on CPU
(with the wall-clock timer; no timing is asserted)."""

import importlib.util
import json

import pytest
import torch

from blockfp8.backends import Support
from blockfp8.cli import main
from blockfp8.cli.bench import markdown_report
from blockfp8.tables import merge_table_file
from blockfp8.testing.bench import (
    Record,
    derived_metrics,
    dispatch_table,
    measure,
    problem_bytes,
    problem_flops,
    roofline_us,
    row_summaries,
)
from blockfp8.testing.methods import Bound, Method, counts_as_peer, methods_for
from blockfp8.testing.operands import make_operands, make_weight_copies
from blockfp8.testing.shapes import Shape, load_shapes, parse_m_values
from blockfp8.testing.timing import Ceilings, Timing, cold_copies, measure_ceilings, time_fn

CEIL = Ceilings(copy_gbps=2000.0, fp8_tflops=1000.0, l2_bytes=50 << 20)


def test_flops_and_bytes():
    assert problem_flops(3, 256, 384) == 2 * 3 * 256 * 384
    # N=200, K=1000: 2 x 8 weight blocks, 8 activation groups per token.
    assert problem_bytes(3, 200, 1000) == 200 * 1000 + 4 * 2 * 8 + 3 * 1000 + 4 * 3 * 8 + 2 * 3 * 200


def test_derived_metrics_and_roofline():
    m, n, k = 4, 7168, 2048
    us = 10.0
    d = derived_metrics(m, n, k, us, CEIL)
    assert d["tflops"] == pytest.approx(problem_flops(m, n, k) / 10e-6 / 1e12)
    assert d["gbps"] == pytest.approx(problem_bytes(m, n, k) / 10e-6 / 1e9)
    assert d["pct_bw"] == pytest.approx(100 * d["gbps"] / 2000.0)
    assert d["pct_fp8"] == pytest.approx(100 * d["tflops"] / 1000.0)
    # At M=4 the weight stream dominates: the roofline is the memory time.
    roof = problem_bytes(m, n, k) / 2000e9 * 1e6
    assert roofline_us(m, n, k, CEIL) == pytest.approx(roof)
    assert d["pct_roofline"] == pytest.approx(100 * roof / us)
    # At large M the FLOPs dominate.
    assert roofline_us(8192, 8192, 8192, CEIL) == pytest.approx(2 * 8192**3 / 1000e12 * 1e6)


def test_metrics_without_ceilings():
    d = derived_metrics(1, 64, 256, 5.0, Ceilings(None, None, None))
    assert d["tflops"] > 0 and d["pct_bw"] is None and d["pct_fp8"] is None and d["pct_roofline"] is None
    assert roofline_us(1, 64, 256, Ceilings(None, None, None)) is None


def test_load_shapes_and_ints():
    ds = load_shapes("deepseek-v3")
    assert len(ds) == 8 and ds[0] == Shape(2112, 7168, "fused_qkv_a_proj")
    mixed = load_shapes("64:256, qwen3-30b-a3b")
    assert mixed[0] == Shape(64, 256, "64x256") and len(mixed) == 3
    assert all(s.name for s in load_shapes("edge"))  # unnamed shapes are named NxK
    for bad in ("nope", "64:0", "64:x", "", "m_sweep"):
        with pytest.raises(ValueError):
            load_shapes(bad)
    assert parse_m_values("1,16, 64") == [1, 16, 64]
    assert parse_m_values(None) == [1, 16, 64, 128, 512, 2048, 4096]
    for bad in ("0", "a", "1,-2"):
        with pytest.raises(ValueError, match="--m|M list"):
            parse_m_values(bad)


def test_cold_copies():
    l2 = 50 << 20
    # A 15 MB weight: > 4 x 50 MB needs 14 copies, plus one.
    assert cold_copies(15 << 20, l2) == 15
    # A weight larger than 4 x L2 still rotates over two copies.
    assert cold_copies(264 << 20, l2) == 2
    # Memory caps the count, never below 2; tiny weights are capped in number.
    assert cold_copies(15 << 20, l2, free_bytes=60 << 20) == 2
    assert cold_copies(1024, l2) == 256
    with pytest.raises(ValueError):
        cold_copies(0, l2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU wall-clock path; the H100 bench runs the GPU one")
def test_time_fn_cpu():
    calls = []
    t = time_fn(lambda a: calls.append(a), rotate=[(1,), (2,), (3,)], reps=2, warmup=1)
    assert isinstance(t, Timing) and t.method == "wall" and t.copies == 3 and t.l2_hot_us is None
    assert calls[:4] == [1, 1, 2, 3] and len(calls) == 1 + 3 + 2 * 3
    assert t.p10_us <= t.median_us <= t.p90_us
    t = time_fn(lambda a: None, rotate=lambda i: (i,), copies=4, reps=1)
    assert t.copies == 4
    with pytest.raises(ValueError, match="copies"):
        time_fn(lambda a: None, rotate=lambda i: (i,))
    with pytest.raises(ValueError, match="rotate"):
        time_fn(lambda: None, rotate=[])
    assert measure_ceilings("cpu").copy_gbps is None


def _rec(method, kind, us, mode="gemm", status="ok", m=1, n=64, k=256):
    t = Timing(us, us, us, None, 0.0, "graph", 2) if us is not None else None
    return Record("s", n, k, m, mode, method, kind, status, label=method, timing=t)


def test_row_summaries_speedup_over_best_peer():
    recs = [
        _rec("triton", "backend", 8.0),  # blockfp8's own kernel: not a peer
        _rec("cublas", "backend", 12.0),
        _rec("deepgemm", "backend", 9.0, status="wrong"),  # wrong results never count
        _rec("bf16", "peer", 15.0),
        _rec("blockfp8", "dispatch", 10.0),
    ]
    (row,) = row_summaries(recs)
    assert row["best_peer"] == "cublas" and row["best_peer_us"] == 12.0
    assert row["speedup"] == pytest.approx(1.2)
    (row,) = row_summaries(recs[:-1] + [_rec("blockfp8", "dispatch", 1.0, status="wrong")])
    assert row["speedup"] is None and row["dispatch_status"] == "wrong"  # no speedup for a wrong result
    assert counts_as_peer("deepgemm", "backend") and counts_as_peer("torchao", "peer")
    assert not counts_as_peer("triton", "backend") and not counts_as_peer("reference", "backend")
    assert not counts_as_peer("blockfp8", "dispatch")


def test_dispatch_table_format(tmp_path):
    recs = [
        # M=1: linear measured, so its order wins over the gemm order; the wrong backend is left out.
        _rec("triton", "backend", 5.0, "gemm"), _rec("cublas", "backend", 4.0, "gemm"),
        _rec("triton", "backend", 6.0, "linear"), _rec("cublas", "backend", 7.0, "linear"),
        _rec("deepgemm", "backend", 1.0, "linear", status="wrong"),
        _rec("bf16", "peer", 0.5, "linear"), _rec("blockfp8", "dispatch", 5.5, "linear"),
        # M=64: gemm only; an unsupported backend has no timing.
        _rec("triton", "backend", 9.0, m=64), _rec("deepgemm", "backend", 3.0, m=64),
        _rec("cublas", "backend", None, m=64, status="refused"),
    ]
    table = dispatch_table(recs, "NVIDIA H100 80GB HBM3")
    assert table == {"NVIDIA H100 80GB HBM3": {"64,256": {"1": ["triton", "cublas"], "64": ["deepgemm", "triton"]}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"NVIDIA H100 80GB HBM3": {"64,256": {"4096": ["cublas"]}}, "other": {}}))
    merged = merge_table_file(path, table)
    assert merged == json.loads(path.read_text())
    assert merged["NVIDIA H100 80GB HBM3"]["64,256"] == {"1": ["triton", "cublas"], "64": ["deepgemm", "triton"],
                                                         "4096": ["cublas"]}
    assert "other" in merged


class _Fake(Method):
    """A peer that returns a scaled reference (wrong when scale != 1) or raises."""

    kind = "peer"

    def __init__(self, name, scale=1.0, fail=False):
        self.name, self.scale, self.fail = name, scale, fail

    def bind(self, mode, ops):
        def fn(x, w, s):
            if self.fail:
                raise RuntimeError("kernel exploded\nsecond line")
            return ops.reference() * self.scale

        return Bound(fn, [(ops.x, w, s) for w, s in ops.weights])


def test_measure_flags_wrong_and_errors():
    ops = make_operands(make_weight_copies(64, 256, "cpu"), 2)
    ref = ops.reference()
    shape = Shape(64, 256, "t")
    good = measure(_Fake("good"), "gemm", ops, ref, shape, reps=1, l2_cold=True)
    wrong = measure(_Fake("bad", scale=1.1), "gemm", ops, ref, shape, reps=1, l2_cold=True)
    err = measure(_Fake("boom", fail=True), "gemm", ops, ref, shape, reps=1, l2_cold=True)
    assert good.status == "ok" and good.rel_error == 0.0 and good.timing.method == "wall"
    assert wrong.status == "wrong" and wrong.rel_error == pytest.approx(0.1, rel=1e-3) and wrong.timing
    assert err.status == "crashed" and err.reason == "RuntimeError: kernel exploded" and err.timing is None
    rows = row_summaries([good, wrong, err])
    md = markdown_report([good, wrong, err], rows, {"device": "cpu", "date": "d", "torch": "t", "triton": "t",
                                                   "cuda": None, "driver": None, "deep_gemm": None,
                                                   "torchao": None, "command": "c"},
                         Ceilings(None, None, None), {"description": "wall"})
    assert "WRONG" in md and "**error**" in md


def test_unknown_names_and_cpu_availability():
    with pytest.raises(ValueError, match="unknown backend"):
        methods_for(["nope"], [])
    with pytest.raises(ValueError, match="unknown peer"):
        methods_for([], ["nope"])
    methods = methods_for(["reference"], ["bf16", "torchao", "torchao-inference"])
    assert [m.name for m in methods] == ["reference", "blockfp8", "bf16", "torchao", "torchao-inference"]
    if not torch.cuda.is_available():
        assert methods[3].availability() == Support(False, "no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU wall-clock path; the H100 bench runs the GPU one")
def test_cli_end_to_end_cpu(tmp_path, capsys):
    out, md, table, png = (tmp_path / n for n in ("r.json", "r.md", "t.json", "r.png"))
    # Without matplotlib --plot is refused before the run (tests/cli/test_messages.py).
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []
    rc = main(["bench", "--shapes", "64:256", "--m", "1,3", "--backends", "reference", "--peers", "bf16,torchao",
               "--reps", "1", "--save", str(out), "--markdown", str(md), "--save-table", str(table), *plot])
    assert rc == 0
    report = json.loads(out.read_text())
    for key in ("environment", "ceilings", "timing", "definitions", "records", "rows"):
        assert key in report
    env = report["environment"]
    for key in ("device", "driver", "torch", "triton", "deep_gemm", "torchao", "date", "command"):
        assert key in env
    recs = report["records"]
    # 2 M values x (reference, dispatched, bf16, torchao) x 2 modes.
    assert len(recs) == 16
    by = {(r["m"], r["method"], r["mode"]): r for r in recs}
    for m in (1, 3):
        for mode in ("gemm", "linear"):
            for name in ("reference", "blockfp8", "bf16"):
                r = by[(m, name, mode)]
                assert r["status"] == "ok", r
                assert r["rel_error"] <= 5e-3 and r["timing"]["median_us"] > 0 and r["metrics"]["gbps"] > 0
            assert by[(m, "torchao", mode)]["status"] in ("unavailable", "ok", "refused")
    assert by[(1, "blockfp8", "gemm")]["label"] == "blockfp8->reference"
    assert len(report["rows"]) == 4 and all(r["best_peer"] == "bf16" for r in report["rows"])
    text = md.read_text()
    assert "| 64x256 | 64 | 256 | 1 |" in text and "Definitions" in text and "linear" in text
    assert json.loads(table.read_text()) == {"cpu": {"64,256": {"1": ["reference"], "3": ["reference"]}}}
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_arguments(capsys):
    assert main(["bench", "--shapes", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", "--shapes", "64:256", "--peers", "mystery"]) == 2
