"""Programmatic dependent launch of the Triton GEMM (backends/triton/launch.py, ``PDL``). CPU: how many K groups a
launch prefetches into L2 before its wait, and that PDL stays off where it cannot run (the interpreter, CPU
tensors), and DeepGEMM's own PDL follows the switch. GPU (sm_90+): a producer followed by a GEMM launched with PDL
gives the bytes of the same pair launched without it, eagerly and replayed from a CUDA graph, for split-K and
single-pass configs, weights that are prefetched and weights that are not (rows not 16-byte aligned), and a weight
written by the kernel right before the GEMM (the prefetch must never stand in for the wait).
"""

from __future__ import annotations

import pytest
import torch

from blockfp8.backends.triton import gemm as triton_gemm
from blockfp8.backends.triton import launch
from blockfp8.backends.triton.act_quant import quantize_activation_fused
from blockfp8.backends.triton.configs import TritonConfig
from blockfp8.backends.triton.gemm import TritonGemmPlan, prefetch_groups
from blockfp8.testing.operands import random_activation, random_fp8_weight

MB = 1 << 20


@pytest.mark.parametrize(
    ("n", "k", "block_n", "split", "budget", "want"),
    [
        (4096, 4096, 64, 1, 16 * MB, 32),  # the whole 16 MB weight: every group of every row
        (4096, 4096, 64, 4, 16 * MB, 8),  # split 4: each program holds 8 of the 32 groups
        (28672, 4096, 64, 4, 16 * MB, 1),  # 117 MB weight: one group per program fits the budget
        (28672, 4096, 64, 8, 16 * MB, 0),  # not even one
        (100, 300, 64, 1, 1 * MB, 3),  # K's partial last group counted
        (100, 300, 64, 1, 2 * 128 * 128 - 1, 1),  # N padded to two whole 64-row tiles: under two groups' bytes
    ],
)
def test_prefetch_groups_fill_the_budget_and_no_more(n, k, block_n, split, budget, want):
    assert prefetch_groups(n, k, block_n, split, budget) == want


def test_pdl_is_off_off_the_gpu():
    assert not launch.pdl_ok(torch.device("cpu"))
    if launch.INTERPRET:
        assert not launch.PDL


def test_every_measurement_records_whether_pdl_was_on(monkeypatch):
    from blockfp8.testing.environment import environment, environment_line

    env = environment("cpu")
    assert env["triton_pdl"] is False and env["triton_fast_launch"] is launch.FAST_LAUNCH
    monkeypatch.setattr(launch, "pdl_ok", lambda device: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    env = environment("cpu")
    assert env["triton_pdl"] is True and " (PDL)" in environment_line(env)


@pytest.mark.parametrize("pdl", [False, True])
def test_deepgemm_launches_with_pdl_only_when_pdl_is_on(monkeypatch, pdl):
    """``launch.PDL`` (on by default on the verified Triton releases; BLOCKFP8_PDL=1 / 0 forces it) turns DeepGEMM's
    own PDL on (once, at its first call); with it off DeepGEMM is left alone."""
    import sys
    import types

    from blockfp8.backends import deepgemm

    calls = []
    fake = types.SimpleNamespace(set_pdl=calls.append, fp8_gemm_nt=lambda a, b, y, disable_ue8m0_cast: y.zero_())
    monkeypatch.setitem(sys.modules, "deep_gemm", fake)
    monkeypatch.setattr(launch, "PDL", pdl)
    monkeypatch.setattr(deepgemm, "_pdl_set", False)
    x, w = torch.zeros(2, 128, dtype=torch.float8_e4m3fn), torch.zeros(64, 128, dtype=torch.float8_e4m3fn)
    for _ in range(3):
        deepgemm.BACKEND.run(x, torch.ones(2, 1), w, torch.ones(1, 1), None, torch.bfloat16)
    assert calls == ([True] if pdl else [])


def _needs_pdl(monkeypatch) -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs an sm_90+ GPU")
    monkeypatch.setattr(launch, "PDL", True)


@pytest.fixture(params=[0, 16 * MB], ids=["no-prefetch", "prefetch"])
def prefetch_budget(request, monkeypatch) -> int:
    """The shipped budget (0: no prefetch) and one that prefetches, which the option still allows."""
    monkeypatch.setattr(triton_gemm, "PREFETCH_BYTES", request.param)
    return request.param


def test_the_shipped_launch_prefetches_nothing():
    # Measured slower on an H200 with any budget (docs/performance.md).
    assert triton_gemm.PREFETCH_BYTES == 0


def _pair(plan: TritonGemmPlan, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The quantizer (zeroing the GEMM's counters) and the GEMM, as ``linear`` launches them."""
    work = plan.workspace(x.device)
    xq, xs = quantize_activation_fused(x, layout="col", zero=work, zero_count=plan.counters)
    return plan(xq, xs, w, s, None, work=work)


CONFIGS = [TritonConfig(16, 64, split_k=4, group_m=1, swap_ab=True), TritonConfig(16, 64, split_k=1, group_m=1,
                                                                                   swap_ab=True), None]


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=["split4", "split1", "default"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 4096, 4096), (16, 2112, 7168), (5, 200, 1000), (64, 7168, 2048)])
def test_pdl_launch_gives_the_bytes_of_a_plain_launch(monkeypatch, prefetch_budget, config, m, n, k):
    _needs_pdl(monkeypatch)
    from blockfp8.testing.timing import capture_graph

    w, s = random_fp8_weight(n, k, device="cuda")
    x = random_activation(m, k, device="cuda")
    plans = {}
    for pdl in (False, True):
        monkeypatch.setattr(launch, "PDL", pdl)
        plans[pdl] = TritonGemmPlan(w, s, None, torch.bfloat16, m, config)
    assert plans[True].pdl and not plans[False].pdl
    # Rows of 1000 bytes are not 16-byte aligned: that plan waits without prefetching.
    assert (plans[True]._tma_constexprs["PREFETCH"] > 0) == (prefetch_budget > 0 and k % 16 == 0)
    monkeypatch.setattr(launch, "PDL", False)
    want = _pair(plans[False], x, w, s)
    monkeypatch.setattr(launch, "PDL", True)
    for _ in range(3):
        assert torch.equal(_pair(plans[True], x, w, s), want)
    graph, out = capture_graph(lambda: _pair(plans[True], x, w, s), torch.cuda.Stream(), warmup=1)
    for _ in range(5):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)


@pytest.mark.gpu
def test_a_weight_written_just_before_the_gemm_is_read_after_the_wait(monkeypatch):
    """The kernel right before the GEMM rewrites the weight in place (here: the weight's bytes copied over from a
    second weight): the GEMM, launched while that copy may still run, must see the new weight in full."""
    monkeypatch.setattr(triton_gemm, "PREFETCH_BYTES", 16 * MB)  # the prefetch must never stand in for the wait
    _needs_pdl(monkeypatch)
    m, n, k = 1, 4096, 4096
    w_old, s = random_fp8_weight(n, k, device="cuda", seed=1)
    w_new, _ = random_fp8_weight(n, k, device="cuda", seed=2)
    x = random_activation(m, k, device="cuda")
    plan = TritonGemmPlan(w_old, s, None, torch.bfloat16, m)
    assert plan.pdl and plan._tma_constexprs["PREFETCH"] > 0
    xq, xs = quantize_activation_fused(x, layout="col")
    want = plan(xq, xs, w_new, s, None)
    for _ in range(10):
        w = w_old.clone()
        work = plan.workspace(x.device)
        if work is not None:
            work[:plan.counters].zero_()
        torch.cuda.synchronize()
        w.copy_(w_new)  # the kernel just before the GEMM writes the weight it reads
        got = plan(xq, xs, w, s, None, work=work)
        torch.cuda.synchronize()
        assert torch.equal(got, want)
