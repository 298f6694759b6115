"""``blockfp8 demo`` and ``blockfp8 bench-e2e`` through the command line, on the CPU."""

import json
import os

import pytest
import torch

from blockfp8.cli import main
from blockfp8.cli.bench_e2e import forced_backend, unsupported_reason
from blockfp8.cli.common import positive_ints
from blockfp8.dispatch import ENV_VAR
from blockfp8.testing.conformance import dtype_tolerance

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

# A whole FP8 model against its bf16 original: e4m3 rounding of activations and weights, compounded over a few
# layers (see test_demo_prints_the_table_and_writes_json), below 0.1; a kernel bug gives O(1).
MODEL_FP8_BOUND = 0.1


def test_demo_prints_the_table_and_writes_json(capsys, tmp_path, monkeypatch):
    # On CPU the dispatcher runs every layer on the reference; under the interpreter the layers go to the Triton
    # kernel instead, so the errors against the bf16 model and the probe's comparison with the reference
    # backend are made by a kernel other than the reference.
    layer_backend = "triton" if INTERPRETER else "reference"
    monkeypatch.setenv(ENV_VAR, layer_backend)
    out_json = tmp_path / "demo.json"
    assert main(["demo", "--device", "cpu", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    for needle in ("torch", "backends:", "layers.0.attn.fused_qkv_a_proj", "layers.1.mlp.down_proj",
                   "200 x 576", "rel err vs bf16", "cosine similarity", "kept in bf16: lm_head",
                   "CPU times: one thread, median of 20 calls"):
        assert needle in text
    result = json.loads(out_json.read_text())
    assert result["cosine"] > 0.99
    assert len(result["layers"]) == 12
    # fp8 layers against the bf16 model: the quantization error, never zero. One e4m3 rounding of x and of W
    # costs about 3-4% of a GEMM's output (3 mantissa bits), and it compounds through the model's two blocks:
    # 0.038-0.076 measured on this model. A misapplied scale is off by O(1).
    assert all(r["backend"] == layer_backend and 1e-3 < r["rel_err"] < MODEL_FP8_BOUND for r in result["layers"])
    ran = {r["backend"]: r["rel_err"] for r in result["probe"]["results"] if r["rel_err"] is not None}
    others = {name: err for name, err in ran.items() if name != "reference"}
    if INTERPRETER:
        assert "Triton interpreter" in text
        assert set(others) == {"triton"}
    assert all(err <= dtype_tolerance(torch.bfloat16) for err in others.values()), others


def test_bench_e2e_tiny_on_cpu(capsys, tmp_path):
    out_json, out_md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    argv = ["bench-e2e", "--preset", "tiny", "--steps", "2", "--layers", "1", "--batch", "1", "--device", "cpu",
            "--json", str(out_json), "--markdown", str(out_md)]
    assert main(argv) == 0
    assert "TPOT" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert result["modes"] == ["eager"]
    assert rows["bf16"]["rel_err"] == 0.0 and rows["bf16"]["tpot_ms"] > 0
    assert 0 < rows["auto"]["rel_err"] < MODEL_FP8_BOUND
    assert {"cublas", "deepgemm"} <= set(result["skipped"])
    if INTERPRETER:
        assert rows["triton"]["tpot_ms"] > 0 and rows["triton"]["rel_err"] < MODEL_FP8_BOUND
    md = out_md.read_text()
    assert "| bf16 | eager | 1 |" in md and "--preset tiny" in md


def test_bench_e2e_rejects_unknown_backend(capsys):
    assert main(["bench-e2e", "--preset", "tiny", "--backends", "magic", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backends got ['magic']" in err


def test_forced_backend_restores_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    with forced_backend("triton"):
        assert os.environ[ENV_VAR] == "triton"
    with forced_backend(None):
        assert ENV_VAR not in os.environ
    assert os.environ[ENV_VAR] == "reference"


def test_unsupported_reason_names_the_shape():
    assert unsupported_reason("reference", [(184, 200)], [1, 16], torch.device("cpu")) == ""
    why = unsupported_reason("cublas", [(184, 200)], [1], torch.device("cpu"))
    assert why.startswith("M=1 N=184 K=200")


def test_batch_list_parsing():
    assert positive_ints("1, 16,64") == [1, 16, 64]
    for bad in ("", "0", "a,b"):
        with pytest.raises(Exception, match="expected"):
            positive_ints(bad)
