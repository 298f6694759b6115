"""The Gluon (wgmma) block-FP8 GEMM against the reference. Hopper only: Gluon has no CPU interpreter."""

import itertools

import pytest
import torch

from blockfp8 import reference_gemm, rel_error
from blockfp8.backends import get_backend
from blockfp8.testing.conformance import tolerance_for
from blockfp8.testing.operands import random_problem

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0))
    or not get_backend("gluon").availability().ok,
    reason="needs a Hopper (sm_90) GPU and triton with Gluon",
)

MS = (1, 5, 64, 65, 128, 300, 1024)
NS = (8, 72, 128, 200, 2112)
# Odd and even K-group counts (the loop pads to a multiple of 4 groups), partial last groups, K < 128.
KS = (16, 112, 128, 256, 384, 1008, 1040, 7168)


def _operands(m, n, k, col_scales=False):
    _, xq, xs, wq, ws = random_problem(m, n, k, device="cuda")
    if col_scales:  # the column-major layout the fused quantizer writes for this backend
        xs = xs.t().contiguous().t()
    return xq, xs, wq, ws


def _check(m, n, k, bias=False, out_dtype=torch.bfloat16, col_scales=False, config=None):
    from blockfp8.backends.gluon import gluon_gemm

    xq, xs, wq, ws = _operands(m, n, k, col_scales=col_scales)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    got = gluon_gemm(xq, xs, wq, ws, b, out_dtype, config)
    want = reference_gemm(xq, xs, wq, ws, b, out_dtype)
    assert got.shape == (m, n) and got.dtype == out_dtype
    err, bound = rel_error(got, want), tolerance_for(want)
    assert err <= bound, f"M={m} N={n} K={k} config={config}: rel error {err:.3e} > {bound:.3e}"


def _sweep():
    cases = []
    for i, (n, k) in enumerate(itertools.product(NS, KS)):
        cases.append((MS[i % len(MS)], n, k))
        cases.append((MS[(i + 3) % len(MS)], n, k))
    return cases


@pytest.mark.parametrize("m,n,k", _sweep())
def test_sweep(m, n, k):
    _check(m, n, k)


@pytest.mark.parametrize("m,n,k", [(4096, 2112, 7168), (2048, 7168, 18432), (300, 24576, 1536)])
def test_deepseek_shapes(m, n, k):
    _check(m, n, k, col_scales=True)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bias_and_dtypes(out_dtype):
    _check(200, 200, 1008, bias=True, out_dtype=out_dtype)


@pytest.mark.parametrize("block_n,stages,unroll", [(64, 4, 4), (128, 3, 2), (128, 4, 4), (256, 3, 2)])
def test_configs(block_n, stages, unroll):
    from blockfp8.backends.gluon import GluonConfig

    cfg = GluonConfig(block_n=block_n, stages=stages, unroll=unroll)
    _check(300, 2112, 1040, config=cfg)


def test_offset_view_is_copied_not_misread():
    """A view whose base is not 16-byte aligned cannot feed TMA; the backend copies it rather than fail."""
    xq, xs, wq, ws = _operands(64, 128, 272)
    view = torch.empty(64 * 272 + 1, dtype=xq.dtype, device="cuda")[1:].view(64, 272)
    view.copy_(xq)
    got = get_backend("gluon").run(view, xs, wq, ws, None, torch.bfloat16)
    want = reference_gemm(xq, xs, wq, ws, None, torch.bfloat16)
    assert rel_error(got, want) <= tolerance_for(want)


# The persistent, warp-specialized kernel: one 64-row math warp group (decode tiles) and two (128-row tiles).
PERSISTENT = {"persistent-128x128": dict(persistent=True), "persistent-64x128": dict(block_m=64, num_warps=4,
                                                                                      persistent=True)}


@pytest.mark.parametrize("config", list(PERSISTENT), ids=list(PERSISTENT))
@pytest.mark.parametrize("m,n,k", _sweep()[::3])
def test_persistent_sweep(m, n, k, config):
    from blockfp8.backends.gluon import GluonConfig

    _check(m, n, k, config=GluonConfig(**PERSISTENT[config]))


@pytest.mark.parametrize("config", list(PERSISTENT), ids=list(PERSISTENT))
@pytest.mark.parametrize("m,n,k", [(1100, 4168, 1040), (4096, 2112, 7168), (64, 24576, 1536)])
def test_persistent_walks_more_tiles_than_sms(m, n, k, config):
    """More tiles than SMs, so each program accumulates several tiles in turn; 9 K groups (padded to 10) in a
    ring of 4 slots, so every tile starts on another slot and phase than the one before."""
    from blockfp8.backends.gluon import GluonConfig

    _check(m, n, k, col_scales=True, config=GluonConfig(**PERSISTENT[config]))


@pytest.mark.parametrize("block_m,block_n,stages,unroll",
                         [(128, 64, 6, 4), (128, 128, 3, 2), (128, 128, 6, 2), (64, 64, 6, 2), (64, 32, 8, 2)])
def test_persistent_configs(block_m, block_n, stages, unroll):
    # The 64-row tiles with 64 or 32 columns are the decode candidates: more tiles, so more SMs, at M <= 64.
    from blockfp8.backends.gluon import GluonConfig

    _check(300, 2112, 1040, bias=True, config=GluonConfig(block_m=block_m, block_n=block_n, num_warps=block_m // 16,
                                                          stages=stages, unroll=unroll, persistent=True))
    _check(64, 4096, 1536, config=GluonConfig(block_m=block_m, block_n=block_n, num_warps=block_m // 16,
                                              stages=stages, unroll=unroll, persistent=True))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_m", [64, 128])
def test_persistent_gives_the_one_tile_kernels_bits(block_m, out_dtype):
    """Both kernels promote the same fp32 tiles in the same group order: the same bits, bias included."""
    from blockfp8.backends.gluon import GluonConfig, gluon_gemm

    xq, xs, wq, ws = _operands(1000, 4168, 1040, col_scales=True)
    b = torch.randn(4168, device="cuda", dtype=torch.bfloat16)
    one = GluonConfig(block_m=block_m, num_warps=block_m // 16)
    got = gluon_gemm(xq, xs, wq, ws, b, out_dtype, GluonConfig(block_m=block_m, num_warps=block_m // 16,
                                                                persistent=True))
    assert torch.equal(got, gluon_gemm(xq, xs, wq, ws, b, out_dtype, one))
