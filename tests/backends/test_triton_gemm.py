"""The Triton block-FP8 GEMM against the reference (runs under TRITON_INTERPRET=1 without a GPU)."""

import itertools

import pytest
import torch

from blockfp8 import reference_gemm, rel_error
from blockfp8.backends.triton.configs import TritonConfig, candidate_configs, heuristic_config
from blockfp8.backends.triton.gemm import triton_gemm
from blockfp8.testing import default_device
from blockfp8.testing.conformance import tolerance_for
from blockfp8.testing.operands import random_problem

DEVICE = default_device()

MS = (1, 3, 16, 77, 128, 257)
NS = (8, 64, 130, 200, 576, 2112)
KS = (100, 128, 1000, 1088, 2048)


def _sweep() -> list[tuple[int, int, int]]:
    """Every (N, K) pair, each with two M values cycling through MS: every M, N, K value and most
    pairs of them are covered at a fraction of the full cross product's interpreter time."""
    cases = []
    for i, (n, k) in enumerate(itertools.product(NS, KS)):
        cases.append((MS[i % len(MS)], n, k))
        cases.append((MS[(i + 3) % len(MS)], n, k))
    return cases


def _operands(m: int, n: int, k: int, spread: float = 0.0):
    """(x_fp8, x_scale, w_fp8, weight_scale_inv); ``spread`` > 0 gives every 128x128 block its own magnitude,
    so a misapplied block scale shows up as a large error."""
    return random_problem(m, n, k, spread=spread, device=DEVICE)[1:]


def _check(m, n, k, config=None, bias=False, out_dtype=torch.bfloat16, spread=2.0):
    xq, xs, wq, ws = _operands(m, n, k, spread)
    b = torch.randn(n, device=DEVICE, dtype=torch.bfloat16) if bias else None
    got = triton_gemm(xq, xs, wq, ws, b, out_dtype, config)
    want = reference_gemm(xq, xs, wq, ws, b, out_dtype)
    assert got.shape == (m, n) and got.dtype == out_dtype
    err, bound = rel_error(got, want), tolerance_for(want)
    assert err <= bound, f"M={m} N={n} K={k} config={config}: rel error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("m,n,k", _sweep())
def test_sweep(m, n, k):
    _check(m, n, k)


@pytest.mark.parametrize("m,n,k", [(2, 130, 18432), (5, 576, 7168)])
def test_long_k(m, n, k):
    """Per-group fp32 promotion keeps long reductions within tolerance (DeepSeek-V3 down_proj has K=18432)."""
    _check(m, n, k)


CONFIGS = [
    TritonConfig(16, 64, split_k=1, group_m=1, swap_ab=True),
    TritonConfig(16, 64, split_k=3, group_m=1, swap_ab=True),
    TritonConfig(32, 128, split_k=8, group_m=1, swap_ab=True),
    TritonConfig(64, 128, split_k=1, group_m=8),
    TritonConfig(64, 64, split_k=5, group_m=2),
    TritonConfig(128, 128, split_k=2, group_m=8, num_warps=8),
    TritonConfig(16, 64, split_k=3, group_m=1, swap_ab=True, tma=True),
    TritonConfig(16, 64, split_k=3, group_m=1, swap_ab=True, tma=True, pair_k=True),
    TritonConfig(32, 128, split_k=1, group_m=1, swap_ab=True, tma=True, pair_k=True),
    TritonConfig(32, 128, split_k=1, group_m=1, swap_ab=True, tma=True),
    TritonConfig(64, 128, split_k=2, group_m=8, tma=True),
    TritonConfig(64, 256, split_k=1, group_m=8, num_warps=8, tma=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", [(3, 200, 1000), (77, 130, 1088), (1, 72, 336)])
def test_configs(config, m, n, k):
    """Every kernel path (swap-AB, split-K incl. uneven splits, grouped order) on tails in M, N and K."""
    _check(m, n, k, config)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("config", [None, TritonConfig(16, 64, split_k=4, group_m=1, swap_ab=True)], ids=str)
def test_bias_and_out_dtype(out_dtype, config):
    _check(5, 200, 640, config, bias=True, out_dtype=out_dtype)


def test_split_k_counters_reset():
    """The split-K arrival counters are left at zero and the reduction order is fixed, so back-to-back
    launches (or graph replays) give bit-identical results."""
    xq, xs, wq, ws = _operands(4, 200, 1024)
    cfg = TritonConfig(16, 64, split_k=4, group_m=1, swap_ab=True)
    first = triton_gemm(xq, xs, wq, ws, config=cfg)
    for _ in range(2):
        assert torch.equal(triton_gemm(xq, xs, wq, ws, config=cfg), first)


def test_non_contiguous_scales():
    """Column-major activation scales (the layout the fused quantizer writes for this backend)."""
    xq, xs, wq, ws = _operands(7, 64, 384)
    xs_col = torch.empty_strided(xs.shape, (1, 8), device=DEVICE)
    xs_col.copy_(xs)
    assert torch.equal(triton_gemm(xq, xs_col, wq, ws), triton_gemm(xq, xs, wq, ws))


@pytest.mark.parametrize("m,n,k", [(1, 2112, 7168), (16, 7168, 2048), (128, 576, 7168), (4096, 24576, 1536)])
def test_heuristic_and_candidates_are_valid(m, n, k):
    """Launch configs never split K into more pieces than it has 128-groups."""
    groups = (k + 127) // 128
    for cfg in [heuristic_config(m, n, k), *candidate_configs(m, n, k)]:
        assert 1 <= cfg.split_k <= groups
        assert cfg.block_m >= 16 and cfg.block_n >= 16


def test_per_call_descriptor_equals_triton_s_own():
    """A plan copies a validated descriptor template per call instead of building one (host time): the copy must
    hold exactly what ``TensorDescriptor.from_tensor`` would, field for field, on this Triton's dataclass."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from blockfp8.backends.triton.gemm import _descriptor_of, _descriptor_template

    t = torch.zeros(64, 512, dtype=torch.float8_e4m3fn)
    template = _descriptor_template(t, [16, 128])
    assert template.base is None  # a plan keeps no tensor alive
    other = torch.zeros(3, 256, dtype=torch.float8_e4m3fn)
    got = _descriptor_of(template, other, other.shape, other.stride())
    want = TensorDescriptor.from_tensor(other, [16, 128])
    assert type(got) is TensorDescriptor and got.base is other
    assert {k: v for k, v in vars(got).items() if k != "base"} == {k: v for k, v in vars(want).items() if k != "base"}


@pytest.mark.parametrize("tma", [True, False])
def test_one_plan_serves_activations_of_any_layout(tma):
    """A plan's descriptor templates are made on its first call: later calls with another row stride or a base
    that rules TMA out (the plan then reads through pointers) must still be exact."""
    from blockfp8.backends.triton.gemm import TritonGemmPlan

    m, n, k = 5, 256, 512
    xq, xs, wq, ws = _operands(m, n, k, spread=2.0)
    want = reference_gemm(xq, xs, wq, ws, None, torch.bfloat16)
    cfg = next(c for c in candidate_configs(m, n, k) if c.tma == tma)
    plan = TritonGemmPlan(wq, ws, None, torch.bfloat16, m, cfg)
    wide = torch.zeros(m, 2 * k, dtype=xq.dtype, device=DEVICE)
    wide[:, 16:16 + k] = xq  # rows 2K bytes apart, base 16-byte aligned
    odd = torch.zeros(m, 2 * k + 3, dtype=xq.dtype, device=DEVICE)
    odd[:, 3:3 + k] = xq  # base and rows off 16-byte alignment: no TMA
    for x in (xq, wide[:, 16:16 + k], odd[:, 3:3 + k], xq):
        assert rel_error(plan(x, xs, wq, ws, None), want) <= tolerance_for(want)
