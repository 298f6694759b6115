"""``blockfp8 check`` / ``explain`` on CPU (reference + Triton interpreter) and its failure classification.

On CPU the dispatcher's static order picks the reference, so the matrix test installs a measured ranking row
that puts Triton first: every checked cell then runs a kernel other than the reference it is compared with.
"""

import json

import pytest
import torch

from blockfp8 import dispatch
from blockfp8.backends import Backend, get_backend
from blockfp8.backends.triton.gemm import tma_ok
from blockfp8.cli import main
from blockfp8.device import device_key
from blockfp8.reference import TOLERANCE, reference_gemm
from blockfp8.testing import default_device
from blockfp8.testing.conformance import check_matrix, dtype_tolerance, tolerance_for
from blockfp8.testing.operands import random_problem
from blockfp8.testing.shapes import Shape, parse_ints, parse_shapes

DEVICE = default_device()

# 130 x 1000: K = 1000 is no multiple of 16, so TMA cannot read it and the Triton kernel takes its masked
# pointer loads for the partial last K group (and split-K at M = 1, 7); N has a partial block too.
# 200 x 240: a square 2 x 2 weight-scale grid (a transposed grid goes unseen on a non-square one), read through
# TMA under the interpreter, with tails in N and K.
MATRIX_SHAPES = [Shape(130, 1000), Shape(200, 240)]
MATRIX_MS = [1, 7]


@pytest.fixture
def triton_first(monkeypatch, tmp_path):
    """A measured ranking table (BLOCKFP8_DISPATCH_TABLE) that routes the matrix shapes to Triton here."""
    rows = {f"{s.n},{s.k}": {"1": ["triton", "reference"]} for s in MATRIX_SHAPES}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({device_key(DEVICE): rows}))
    monkeypatch.setenv(dispatch.ENV_TABLE, str(path))
    dispatch.clear_caches()
    yield
    dispatch.clear_caches()


def test_matrix_shapes_take_the_masked_k_path():
    _, xq, _, wq, _ = random_problem(7, 130, 1000, device=DEVICE)
    assert not tma_ok(xq, wq)


def test_cpu_matrix_all_correct(triton_first):
    result = check_matrix(MATRIX_SHAPES, MATRIX_MS, ["triton"], DEVICE, progress=False)
    assert len(result.cells) == 2 * 2 * 2
    assert all(c.status == "ok" for c in result.cells), result.cells
    assert {c.reason for c in result.cells if c.backend == "dispatched"} == {"-> triton"}
    assert result.tolerance == dtype_tolerance(torch.bfloat16)


def test_tolerance_per_output_dtype():
    """0.2123 eps (one rounding's RMS) + 2^-12 (accumulation), pinned to the values the docs quote."""
    assert dtype_tolerance(torch.bfloat16) == pytest.approx(1.9029e-3, rel=1e-4)
    assert dtype_tolerance(torch.float16) == pytest.approx(4.5148e-4, rel=1e-4)
    assert dtype_tolerance(torch.float32) == pytest.approx(2.4417e-4, rel=1e-4)
    assert dtype_tolerance(torch.bfloat16) < 2.3e-3 < TOLERANCE
    # One element: a single flip is one ulp (2^-7 relative at 1.0), so tolerance_for lets it through.
    assert tolerance_for(torch.tensor([1.0], dtype=torch.bfloat16)) == pytest.approx(1.9029e-3 + 2**-7, rel=1e-4)
    big = torch.ones(100, 100, dtype=torch.bfloat16)
    assert tolerance_for(big) == pytest.approx(1.9029e-3 + 2**-7 / 100, rel=1e-4)


def test_error_rounding_does_not_explain_is_wrong(monkeypatch):
    """A backend off by 2.3e-3 (what a K-tail mask bug gave on 130 x 1000, M = 7) passed the flat 5e-3; it is
    wrong against the rounded reference."""
    be = get_backend("triton")

    def off_by(self, x, xs, w, ws, b, dt):
        exact = reference_gemm(x, xs, w, ws, b, torch.float32)
        noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(0)).to(exact.device)
        return (exact + noise * (2.3e-3 * exact.norm() / noise.norm())).to(dt)

    monkeypatch.setattr(type(be), "run", off_by)
    monkeypatch.setattr(type(be), "plan", Backend.plan)  # the bound launch goes through run as well
    monkeypatch.setattr(be, "capturable", False)  # off_by copies CPU noise to the device: not capturable
    cells = check_matrix([Shape(130, 1000)], [7], ["triton"], DEVICE, progress=False).cells
    # 2.3e-3 of noise against the reference rounded to bf16 measures 2.3-3.1e-3 (CPU / H200).
    assert cells[0].status == "wrong" and 2.0e-3 < cells[0].error < 3.5e-3, cells[0]


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
