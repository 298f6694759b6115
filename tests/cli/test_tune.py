"""``blockfp8 tune`` and ``blockfp8 explain`` on the command line, on CPU: listing shapes from a model folder,
argument errors, the clean refusal to time without a GPU, and what explain says decided."""

import json

import pytest
import torch
from safetensors.torch import save_file

from blockfp8 import quantize_weight
from blockfp8.cli import main
from blockfp8.cli.tune import NEEDS_CUDA


def _tiny_checkpoint(folder):
    folder.mkdir()
    tensors = {}
    for name, (n, k) in {"self_attn.q_proj": (256, 256), "self_attn.o_proj": (256, 256),
                         "mlp.gate_up_proj": (1024, 256), "mlp.down_proj": (256, 512)}.items():
        tensors[f"model.layers.0.{name}.weight"], tensors[f"model.layers.0.{name}.weight_scale_inv"] = \
            quantize_weight(torch.randn(n, k))
    save_file(tensors, str(folder / "model.safetensors"))


def test_list_model_shapes_with_tp(tmp_path, capsys):
    _tiny_checkpoint(tmp_path / "ckpt")
    assert main(["tune", "--list", "--model", str(tmp_path / "ckpt"), "--m", "1,64"]) == 0
    out = capsys.readouterr().out
    assert "self_attn.o_proj+self_attn.q_proj x2: N=256 K=256" in out and "3 shapes x 2 M values" in out
    assert main(["tune", "--list", "--model", str(tmp_path / "ckpt"), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    for line in ("self_attn.q_proj: N=128 K=256", "self_attn.o_proj: N=256 K=128", "mlp.gate_up_proj: N=512 K=256",
                 "mlp.down_proj: N=256 K=256"):
        assert line in out
    # --shapes and --model together: both, each shape once.
    assert main(["tune", "--list", "--model", str(tmp_path / "ckpt"), "--shapes", "256:256,64:128"]) == 0
    assert "4 shapes x 7 M values" in capsys.readouterr().out


def test_list_fused_model_shapes(tmp_path, capsys):
    pytest.importorskip("transformers")
    folder = tmp_path / "cfg"
    folder.mkdir()
    # A config-only Llama: hidden 256, 4 heads of 64, 2 KV heads, intermediate 384, one layer.
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 256, "head_dim": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 384, "num_hidden_layers": 1, "vocab_size": 1000}))
    assert main(["tune", "--list", "--model", str(folder), "--fused", "--m", "1"]) == 0
    out = capsys.readouterr().out
    for line in ("self_attn.qkv_proj: N=512 K=256", "mlp.gate_up_proj: N=768 K=256",
                 "self_attn.k_proj+self_attn.v_proj x2: N=128 K=256", "6 shapes x 1 M values"):
        assert line in out
    assert main(["tune", "--list", "--model", str(folder), "--fused", "--tp", "2"]) == 2
    assert "need --tp 1" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("args,message", [
    (["--tp", "0"], "argument --tp: expected an int >= 1"), (["--model", "/nonexistent"], "not a folder"),
    (["--shapes", "nope"], "unknown shape set"), (["--reps", "0"], "argument --reps: expected an int >= 1"),
    (["--backends", "cutlass"], "--backends"), (["--fused"], "--fused adds the stacked"),
])
def test_argument_errors(capsys, args, message):
    assert main(["tune", "--list", *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tune_needs_cuda(capsys):
    assert main(["tune", "--shapes", "64:256", "--m", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert NEEDS_CUDA.split(":")[0] in err
    assert main(["tune", "--verify", "--shapes", "64:256"]) == 2


def test_explain_says_what_decided(capsys):
    assert main(["explain", "1", "130", "1000", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "-> reference" in out and "decided by: static rule 'cpu'" in out


def test_reports_render(tmp_path, capsys):
    """The tables and summaries tune and --verify print, on made-up results (no GPU: rendering only)."""
    import argparse
    import json
    from io import StringIO

    from rich.console import Console

    from blockfp8.autotune import Trial
    from blockfp8.backends.triton.configs import TritonConfig
    from blockfp8.cli.tune import _report_tune, _tune_table, _verify_table
    from blockfp8.testing.tuning import Candidate, CellResult, TuneRun
    from blockfp8.testing.verify import POLICIES

    default = Candidate("triton", TritonConfig(16, 64, 4, 1, True, 4, 4, True))
    results = [CellResult("qkv", 2112, 7168, 1, [Trial(default, "ok", 1e-3, 12.0),
                                                  Trial(Candidate("deepgemm"), "ok", 1e-3, 9.0),
                                                  Trial(Candidate("cublas"), "wrong", 0.5)], default),
               CellResult("x", 64, 256, 16, [Trial(Candidate("cublas"), "crashed", reason="boom")])]
    console = Console(file=StringIO(), width=200)
    console.print(_tune_table(results))
    text = console.file.getvalue()
    assert "triton 16x64 split4 w4 s4 swap_ab tma" in text and "1.33x" in text and "none correct" in text
    row = {"shape": "qkv", "n": 2112, "k": 7168, "m": 1, "oracle": "deepgemm", "oracle_us": 9.0,
           **{p: {"choice": "deepgemm", "us": 9.5, "status": "ok", "score": 9.0 / 9.5} for p in POLICIES}}
    console.print(_verify_table([row, {**row, "oracle": None, "oracle_us": None}]))
    assert "deepgemm 9.5" in console.file.getvalue()
    args = argparse.Namespace(install=False, json=str(tmp_path / "r.json"))
    run = TuneRun(results=results, warm_s=1.0, measure_s=2.0)
    assert _report_tune(args, run, 3.5, torch.device("cpu"), console) == 1  # a cell with nothing correct
    assert "tuned 2 cells in 3.5 s (compiling 1.0 s, measuring 2.0 s)" in console.file.getvalue()
    assert set(json.loads((tmp_path / "r.json").read_text())["cells"]) == {"2112,7168,1", "64,256,16"}


def test_verify_report(tmp_path, monkeypatch):
    """--verify's printout and JSON from made-up measurements: per-cell table, summary with PASS/FAIL."""
    import argparse
    import json
    from io import StringIO

    from rich.console import Console

    from blockfp8.cli import tune as cli_tune
    from blockfp8.testing.bench import Record
    from blockfp8.testing.timing import Timing
    from blockfp8.testing.tuning import TuneRun

    def rec(method, us, kind):
        return Record("s", 64, 256, 1, "gemm", method, kind, "ok", label=f"blockfp8->{method}",
                      timing=Timing(us, us, us, None, 0.0, "graph", 2))

    cells = {("s", 64, 256, m): {"backends": {"deepgemm (untuned)": rec("deepgemm", 10.0, "backend")},
                                 "static": rec("triton", 20.0, "dispatch"),
                                 "untuned": rec("deepgemm", 10.0, "dispatch"),
                                 "tuned": rec("deepgemm", 10.1, "dispatch")} for m in (1, 512)}
    monkeypatch.setattr(cli_tune, "verify", lambda *a, **kw: (cells, TuneRun(warm_s=4.0, measure_s=50.0)))
    args = argparse.Namespace(verify_reps=3, reps=2, max_configs=2, gluon_configs=1, warm_procs=0,
                              json=str(tmp_path / "v.json"))
    console = Console(file=StringIO(), width=220)
    code = cli_tune._run_verify(args, [], [1, 512], torch.device("cpu"), console, Console(file=StringIO()))
    text = " ".join(console.file.getvalue().split())
    assert code == 1  # static is 0.5 of the oracle: FAIL
    assert "tune: 0 cells in 54.0 s" in text and "static decode 0.500" in text and "FAIL" in text
    assert "tuned decode 0.990" in text and "PASS" in text
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["summary"]["tuned"]["pass"] and not report["summary"]["static"]["pass"]
    assert report["tune_s"] == 54.0 and len(report["cells"]) == 2
