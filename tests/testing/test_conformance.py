"""``blockfp8 check`` / ``explain`` on CPU (reference + Triton interpreter) and its failure classification."""

import json

import pytest
import torch

from blockfp8.backends import Backend, get_backend
from blockfp8.cli import main
from blockfp8.testing import default_device
from blockfp8.testing.conformance import check_matrix
from blockfp8.testing.shapes import Shape, parse_ints, parse_shapes

DEVICE = default_device()


def test_cpu_matrix_all_correct():
    result = check_matrix([Shape(130, 1000), Shape(8, 256)], [1, 7], ["reference", "triton"], DEVICE, progress=False)
    assert len(result.cells) == 2 * 2 * 3
    assert all(c.status == "ok" for c in result.cells), result.cells


def test_wrong_and_crashed_backends_are_caught(monkeypatch):
    be = get_backend("triton")
    monkeypatch.setattr(type(be), "run", lambda self, x, xs, w, ws, b, dt: torch.zeros(x.shape[0], w.shape[0],
                                                                                     dtype=dt, device=x.device))
    monkeypatch.setattr(type(be), "plan", Backend.plan)  # the bound launch goes through run as well
    result = check_matrix([Shape(64, 256)], [3], ["triton"], DEVICE, progress=False)
    assert [c.status for c in result.cells if c.backend == "triton"] == ["wrong"]

    def boom(self, *args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(type(be), "run", boom)
    cells = check_matrix([Shape(64, 256)], [3], ["triton"], DEVICE, progress=False).cells
    assert cells[0].status == "crashed" and "kernel exploded" in cells[0].reason


def test_refused_cells_carry_reasons_and_probe():
    cells = check_matrix([Shape(200, 256)], [2], ["reference", "cublas"], DEVICE, probe=True, progress=False).cells
    cublas = next(c for c in cells if c.backend == "cublas")
    assert cublas.status == "refused" and cublas.reason  # no CUDA, or N % 16 on a GPU
    # Available backends are probed past their limits; unavailable ones are not.
    assert bool(cublas.probe) == get_backend("cublas").availability().ok


def test_cli_check_writes_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    rc = main(["check", "--shapes", "64:128,200:300", "--m", "1,5", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {c["status"] for c in data["cells"]} <= {"ok", "refused"}
    assert "blockfp8 check on" in capsys.readouterr().out


def test_cli_explain(capsys):
    assert main(["explain", "1", "2112", "7168"]) == 0
    out = capsys.readouterr().out
    assert "M=1 N=2112 K=7168" in out and "cublas" in out


def test_shape_parsing():
    assert parse_shapes("2112:7168,64:128")[0] == Shape(2112, 7168)
    ds = parse_shapes("deepseek-v3")
    assert Shape(2112, 7168, "fused_qkv_a_proj") in ds and len(ds) == 8
    assert parse_ints("1, 16,64") == [1, 16, 64]
    with pytest.raises(ValueError, match="unknown shape set"):
        parse_shapes("llama-9000")
    with pytest.raises(ValueError, match="N:K"):
        parse_shapes("12:x")
    with pytest.raises(ValueError, match="integers"):
        parse_ints("1,a")


def test_cli_check_bad_arguments(capsys):
    assert main(["check", "--backends", "cutlass"]) == 2
    assert "unknown backend 'cutlass'" in capsys.readouterr().err
    assert main(["check", "--shapes", "llama-9000"]) == 2
