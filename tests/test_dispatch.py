"""Dispatcher decisions on fake devices, overrides and ``explain`` -- no GPU needed."""

import pytest
import torch

import blockfp8
from blockfp8 import dispatch
from blockfp8.backends import Problem, Support, backend_names, get_backend
from blockfp8.testing import default_device

DEVICE = default_device()

H100 = dict(device_type="cuda", arch=(9, 0), device_name="NVIDIA H100 80GB HBM3")
UNKNOWN_GPU = dict(device_type="cuda", arch=(12, 0), device_name="Some Future GPU")
ADA = dict(device_type="cuda", arch=(8, 9), device_name="NVIDIA L40S")
CPU = dict(device_type="cpu", device_name="cpu")
TABLE_GPU = dict(device_type="cuda", arch=(9, 0), device_name="Hopper GPU measured in this test")


@pytest.fixture
def fake_available(monkeypatch):
    """Pretend the given backends are installed and usable (others keep their real availability)."""

    def install(*names, missing=()):
        for name in backend_names():
            be = get_backend(name)
            if name in names:
                monkeypatch.setattr(be, "_availability", Support(True))
            elif name in missing:
                monkeypatch.setattr(be, "_availability", Support(False, f"{name} not installed"))
        dispatch.clear_caches()

    yield install
    dispatch.clear_caches()


@pytest.fixture
def table(monkeypatch, tmp_path):
    """Install a measured ranking table through BLOCKFP8_DISPATCH_TABLE."""

    def install(content: dict):
        path = tmp_path / "table.json"
        path.write_text(__import__("json").dumps(content))
        monkeypatch.setenv(dispatch.ENV_TABLE, str(path))
        dispatch.clear_caches()

    yield install
    dispatch.clear_caches()


def choose(m, n, k, dev, **kw):
    return dispatch.choose(Problem(m, n, k, **dev), **kw)


def test_seed_shape_goes_to_deepgemm_at_prefill(fake_available):
    fake_available("triton", "cublas", "deepgemm")
    assert choose(4096, 2112, 7168, H100) == "deepgemm"
    assert choose(128, 2112, 7168, H100) == "deepgemm"


def test_without_deepgemm(fake_available):
    fake_available("triton", "cublas", missing=("deepgemm",))
    assert choose(4096, 2112, 7168, H100) == "cublas"
    assert choose(1, 2112, 7168, H100) == "triton"


@pytest.mark.parametrize("m", [1, 2, 7, 16, 77, 128, 1000, 4096])
def test_n200_never_cublas(fake_available, m):
    """N=200 is not a multiple of 16: cuBLAS blockwise refuses it (measured on H100), so it is never picked.

    DeepGEMM, by contrast, was measured correct at N=200 (its real limit is N % 8, docs/backends.md), so
    the dispatcher may use it there -- the limit is evidence, not the N % 64 folklore."""
    fake_available("triton", "cublas", "deepgemm")
    assert choose(m, 200, 7168, H100) != "cublas"
    ex = dispatch.explain_problem(Problem(m, 200, 7168, **H100))
    assert not ex.verdicts["cublas"] and "N % 16" in ex.verdicts["cublas"].reason
    assert ex.verdicts["deepgemm"]


@pytest.mark.parametrize("m", [1, 77, 4096])
def test_unaligned_n_never_deepgemm_or_cublas(fake_available, m):
    """N=130 breaks DeepGEMM's 16-byte output-stride rule (N % 8) and cuBLAS's N % 16."""
    fake_available("triton", "cublas", "deepgemm")
    # One of blockfp8's own kernels (the Gluon one too, where a Hopper GPU makes it available).
    assert choose(m, 130, 1024, H100) in ("triton", "gluon")
    ex = dispatch.explain_problem(Problem(m, 130, 1024, **H100))
    assert "N % 8" in ex.verdicts["deepgemm"].reason and "N % 16" in ex.verdicts["cublas"].reason


def test_k_tail_refused_by_peers(fake_available):
    fake_available("triton", "cublas", "deepgemm")
    assert choose(4096, 7168, 1000, H100) == "triton"


def test_cpu_uses_reference(fake_available):
    assert choose(1, 2112, 7168, CPU) == "reference"
    assert choose(4096, 2112, 7168, CPU) == "reference"


def test_unknown_gpu_avoids_hopper_only_backends(fake_available):
    """cuBLAS blockwise and DeepGEMM were verified on sm_90 only; a newer GPU gets Triton until checked."""
    fake_available("triton", "cublas", "deepgemm")
    assert choose(4096, 2112, 7168, UNKNOWN_GPU) == "triton"
    ex = dispatch.explain_problem(Problem(4096, 2112, 7168, **UNKNOWN_GPU))
    assert "compute capability <= 9.0" in ex.verdicts["deepgemm"].reason


def test_ada_gpu(fake_available):
    fake_available("triton", "cublas", "deepgemm")
    assert choose(16, 4096, 7168, ADA) == "triton"


def test_measured_table_wins_and_skips_unsupported(fake_available, table):
    """A device whose whole table comes from BLOCKFP8_DISPATCH_TABLE (no shipped rows to merge with)."""
    fake_available("triton", "cublas", "deepgemm")
    table({TABLE_GPU["device_name"]: {"2112,7168": {"16": ["cublas", "triton"], "4096": ["triton", "deepgemm"]},
                                 "130,1024": {"16": ["deepgemm", "cublas", "triton"]}}})
    assert choose(1, 2112, 7168, TABLE_GPU) == "cublas"  # bucket M<=16
    assert choose(2048, 2112, 7168, TABLE_GPU) == "triton"
    assert choose(9999, 2112, 7168, TABLE_GPU) == "triton"  # beyond the largest measured M: largest bucket
    # The table ranks deepgemm and cublas first for N=130, but neither can run it: never chosen.
    assert choose(16, 130, 1024, TABLE_GPU) == "triton"
    ex = dispatch.explain_problem(Problem(1, 2112, 7168, **TABLE_GPU))
    assert ex.source.startswith("override row (Hopper GPU measured in this test, N=2112 K=7168, measured at M=16)")


def test_cublas_never_gets_unpadded_small_m(monkeypatch):
    """M=1 (refused by cuBLAS blockwise) reaches scaled_mm padded to a multiple of 4 rows."""
    from torch.nn import functional as F

    from blockfp8 import quantize_activation, quantize_weight

    if not hasattr(F, "scaled_mm"):
        pytest.skip("this torch has no torch.nn.functional.scaled_mm")
    seen = []

    def fake_scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype):
        seen.append((tuple(a.shape), tuple(scale_a.shape), scale_a.stride(), tuple(scale_b.shape)))
        return torch.zeros(a.shape[0], b.shape[1], dtype=output_dtype)

    monkeypatch.setattr(F, "scaled_mm", fake_scaled_mm)
    xq, xs = quantize_activation(torch.randn(1, 640))
    wq, ws = quantize_weight(torch.randn(256, 640))
    out = get_backend("cublas").run(xq, xs, wq, ws, None, torch.bfloat16)
    assert out.shape == (1, 256)
    a_shape, sa_shape, sa_stride, sb_shape = seen[0]
    assert a_shape == (4, 640) and sa_shape == (4, 5) and sa_stride == (1, 4)
    assert sb_shape == (8, 2)  # weight scales padded to a multiple of 4 K-blocks, transposed


def test_override_argument_and_env(fake_available, monkeypatch):
    fake_available("triton", "cublas", "deepgemm")
    assert choose(1, 2112, 7168, H100, backend="cublas") == "cublas"
    monkeypatch.setenv(dispatch.ENV_VAR, "deepgemm")
    assert choose(1, 2112, 7168, H100) == "deepgemm"
    assert choose(1, 2112, 7168, H100, backend="triton") == "triton"  # the argument beats the variable


def test_override_that_cannot_run_is_an_error(fake_available, monkeypatch):
    fake_available("triton", "cublas", "deepgemm")
    with pytest.raises(ValueError, match=r"'cublas' was requested but cannot run .*N % 16"):
        choose(1, 200, 7168, H100, backend="cublas")
    monkeypatch.setenv(dispatch.ENV_VAR, "deepgemm")
    with pytest.raises(ValueError, match="N % 8"):
        choose(1, 130, 1024, H100)
    with pytest.raises(ValueError, match="not a backend"):
        choose(1, 128, 128, H100, backend="cutlass")


def test_override_through_public_api(monkeypatch):
    x = torch.randn(2, 256, device=DEVICE)
    wq, ws = blockfp8.quantize_weight(torch.randn(200, 256, device=DEVICE))
    with pytest.raises(ValueError, match="cublas"):
        blockfp8.linear(x, wq, ws, backend="cublas")  # no CUDA here, or N=200 % 16 on a GPU
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.clear_caches()
    assert blockfp8.explain(2, 200, 256).choice == "triton"
    ref = blockfp8.linear(x, wq, ws, backend="reference")
    assert blockfp8.rel_error(blockfp8.linear(x, wq, ws), ref) < 5e-3


def test_explain_output(fake_available):
    fake_available("triton", "cublas", "deepgemm")
    ex = dispatch.explain_problem(Problem(1, 130, 1000, **H100))
    text = str(ex)
    assert ex.choice == "triton"
    assert "M=1 N=130 K=1000" in text and "-> triton" in text
    for name in backend_names():
        assert name in ex.verdicts
    assert "static rule 'decode-small-weight'" in text
    ex = blockfp8.explain(16, 2112, 7168, device="cpu")
    assert ex.choice == "reference" and set(ex.verdicts) == set(backend_names())


def test_choice_is_cached(fake_available):
    fake_available("triton", "cublas", "deepgemm")
    p = Problem(16, 2112, 7168, **H100)
    dispatch.choose(p)
    hits = dispatch._choose.cache_info().hits
    dispatch.choose(p)
    assert dispatch._choose.cache_info().hits == hits + 1


def test_shipped_h100_table_routes_the_seed_shape(fake_available):
    """The shipped H100 table (blockfp8 bench, docs/benchmarks.md): the seed shape N=2112, K=7168 runs the
    split-K Triton kernel at M=1 and 16 and DeepGEMM from M=64 on, as measured."""
    fake_available("triton", "cublas", "deepgemm")
    assert choose(1, 2112, 7168, H100) == "triton"
    assert choose(16, 2112, 7168, H100) == "triton"
    assert choose(64, 2112, 7168, H100) == "deepgemm"
    assert choose(4096, 2112, 7168, H100) == "deepgemm"
    fake_available("triton", "cublas", missing=("deepgemm",))
    assert choose(16, 2112, 7168, H100) in ("triton", "cublas")


def test_cublas_weight_scales_are_never_a_stale_copy():
    """cuBLAS reads the weight scales as the transpose of a row-major (Nb, round_up(Kb, 4)) tensor: with Kb % 4 ==
    0 that is the layer's own tensor (no copy, so in-place updates and CUDA graph replays see the current scales);
    other Kb are padded with ones on every call, never cached."""
    from blockfp8.backends.cublas import _weight_scales

    s = torch.rand(3, 8) + 0.5
    t = _weight_scales(s)
    assert t.data_ptr() == s.data_ptr() and t.shape == (8, 3) and t.stride() == (1, 8)
    s.mul_(2.0)
    assert torch.equal(t.t(), s)
    odd = torch.rand(3, 5) + 0.5
    padded = _weight_scales(odd)
    assert padded.shape == (8, 3) and padded.stride() == (1, 8)
    assert torch.equal(padded[:5].t(), odd) and bool((padded[5:] == 1).all())
    odd.mul_(2.0)
    assert torch.equal(_weight_scales(odd)[:5].t(), odd)


def test_a_backend_whose_run_takes_no_out_still_fills_out():
    """Callers that need the output at a fixed address (eager graphs) pass ``out``; a backend written before that
    parameter existed returns a new tensor, which the default plan copies into ``out``."""
    from blockfp8.backends.base import Backend, RunPlan

    class Old(Backend):
        def run(self, x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype):
            return torch.full((x_fp8.shape[0], w_fp8.shape[0]), 3.0, dtype=out_dtype)

    plan = RunPlan(Old.__new__(Old), torch.bfloat16)
    x, w = torch.zeros(2, 128), torch.zeros(5, 128)
    out = torch.zeros(2, 5, dtype=torch.bfloat16)
    assert plan(x, None, w, None, None, out=out) is out and out.eq(3).all()
    assert plan(x, None, w, None, None).eq(3).all()


def test_forced_triton_on_cpu_without_the_interpreter_names_the_fix(monkeypatch):
    """Triton reads TRITON_INTERPRET when blockfp8 is imported, so the refusal is seen in a fresh process started
    without it; its reason must say how to run the kernel on the CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = ("import torch, blockfp8\n"
            "w, s = blockfp8.quantize_weight(torch.randn(256, 256, dtype=torch.bfloat16))\n"
            "try:\n"
            "    blockfp8.linear(torch.randn(4, 256, dtype=torch.bfloat16), w, s, backend='triton')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": src}).stdout
    assert "'triton' was requested but cannot run" in out
    assert "set TRITON_INTERPRET=1 before importing blockfp8 to run it on the CPU" in out
