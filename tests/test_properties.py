"""Property tests: every backend available here, forced, and the dispatcher's own choice agree with reference_gemm.

Shapes M, N, K run over 1..1100 (tails and primes drawn on purpose), weight scales span 1e-6..1e4 per 128x128
block and activation magnitudes 1e-3..1e3 per row. Hypothesis is derandomized (the same examples every run, no
example database). ``BLOCKFP8_PROPERTY_EXAMPLES=n`` sets every backend's example count (e.g. more on a GPU).

Results are compared with the reference rounded to the output dtype, within what rounding explains
(``conformance.tolerance_for``). On CPU the dispatcher picks the reference itself, so the dispatched-call test
records a measured ranking row that puts the Triton kernel (interpreter) first for each drawn shape: the
dispatched path is then checked against a computation other than its own.

Budget (docs/reliability.md): under the Triton interpreter (CPU) one (tile, K group) program step costs 15-100 ms,
so Triton examples are drawn under a work budget; every other backend gets the full range.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockfp8 import dispatch, gemm
from blockfp8.backends import Problem, backend_names, get_backend
from blockfp8.device import device_key
from blockfp8.dispatch import choose
from blockfp8.format import FP8_DTYPE, FP8_MAX, cdiv
from blockfp8.quant import quantize_activation
from blockfp8.reference import reference_gemm, rel_error
from blockfp8.testing import default_device
from blockfp8.testing.conformance import roundings_of, tolerance_for
from blockfp8.testing.operands import float64_gemm

DEVICE = default_device()

MAX_DIM = 1100
# Values that hit block edges (127/128/129, 255/256/257, ...) and primes, drawn besides uniform values.
SPECIAL_DIMS = (1, 2, 3, 5, 7, 13, 31, 64, 97, 127, 128, 129, 251, 255, 256, 257, 383, 384, 509, 521, 640,
                769, 1021, 1024, 1031, 1097)
DEFAULT_EXAMPLES = 100
EXAMPLES = int(os.environ.get("BLOCKFP8_PROPERTY_EXAMPLES", DEFAULT_EXAMPLES))
# DeepGEMM JIT-compiles each new shape (3-6 s measured on H100), so it gets fewer examples unless raised.
JIT_EXAMPLES = {"deepgemm": min(EXAMPLES, 30)} if "BLOCKFP8_PROPERTY_EXAMPLES" not in os.environ else {}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and DEVICE == "cpu"
# Interpreter work budget: tile x K-group steps counted with the decode tile (16 x 64), i.e. padded MACs / 2^17.
INTERPRETER_STEPS = 64
INTERPRETER_MAX_M = 160
# The forced-Triton test covers the kernel under the interpreter; the dispatched test covers the routing to it.
DISPATCHED_INTERPRETED_EXAMPLES = min(EXAMPLES, 30)
OUT_DTYPES = (torch.bfloat16, torch.float32)  # fp16 would overflow at these magnitudes
MIN_BLOCK_ELEMENTS = 64  # per-N-block errors are checked where a block has enough outputs to be a norm


def _dim(limit: int, multiple: int = 1) -> st.SearchStrategy[int]:
    """A size in multiple..limit that is a multiple of ``multiple``, often a block edge or a prime."""
    top = max(1, limit // multiple)
    special = sorted({d // multiple for d in SPECIAL_DIMS if 1 <= d // multiple <= top})
    return st.one_of(st.integers(1, top), st.sampled_from(special)).map(lambda q: q * multiple)


# Small M dominates decode and keeps the interpreter fast; the full range still comes up.
M_STRATEGY = st.one_of(st.integers(1, 8), st.integers(1, 64), _dim(MAX_DIM))


@st.composite
def problems(draw, n_multiple: int = 1, k_multiple: int = 1, out_dtypes=OUT_DTYPES, budget: int | None = None):
    """(lead shape, N, K, out_dtype, with bias, seed); under ``budget``, M then K then N are capped in turn."""
    m = draw(M_STRATEGY)
    if budget is None:
        k = draw(_dim(MAX_DIM, k_multiple))
        n = draw(_dim(MAX_DIM, n_multiple))
    else:
        m = min(m, INTERPRETER_MAX_M)
        k = draw(_dim(min(MAX_DIM, max(1, budget // cdiv(m, 16)) * 128), k_multiple))
        n = draw(_dim(min(MAX_DIM, max(1, budget // (cdiv(m, 16) * cdiv(k, 128))) * 64), n_multiple))
    lead = (2, m // 2) if m % 2 == 0 and draw(st.booleans()) else (m,)
    out_dtype = draw(st.sampled_from([d for d in OUT_DTYPES if d in out_dtypes]))
    return lead, n, k, out_dtype, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def _operands(lead: tuple[int, ...], n: int, k: int, seed: int):
    """fp8 weight with per-block scales 1e-6..1e4 and activations of per-row magnitude 1e-3..1e3."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    s = 10.0 ** (torch.rand(cdiv(n, 128), cdiv(k, 128), generator=g) * 10 - 6)
    x = torch.randn(*lead, k, generator=g) * 10.0 ** (torch.rand(*lead, 1, generator=g) * 6 - 3)
    xq, xs = quantize_activation(x)
    return xq.to(DEVICE), xs.to(DEVICE), w.to(DEVICE), s.to(DEVICE), g


def _assert_close(out: torch.Tensor, ref: torch.Tensor, what: str, roundings: int = 1) -> None:
    err, bound = rel_error(out, ref), tolerance_for(ref, roundings)
    assert err <= bound, f"{what}: rel_error {err:.3g} > {bound:.3g}"
    out2, ref2 = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
    for j in range(0, ref2.shape[1], 128):
        block = ref2[:, j:j + 128]
        if block.numel() >= MIN_BLOCK_ELEMENTS:
            err, bound = rel_error(out2[:, j:j + 128], block), tolerance_for(block, roundings)
            assert err <= bound, (f"{what}: output columns {j}..{j + block.shape[1] - 1}: rel_error {err:.3g} > "
                                  f"{bound:.3g}")


def _check_example(backend: str | None, lead, n, k, out_dtype, with_bias, seed) -> None:
    xq, xs, w, s, g = _operands(lead, n, k, seed)
    bias = None
    if with_bias:
        # Bias on the output's own scale, so it neither vanishes nor hides the GEMM's error.
        plain = reference_gemm(xq, xs, w, s, out_dtype=torch.float32)
        rms = plain.float().pow(2).mean().sqrt().item()
        bias = (torch.randn(n, generator=g) * rms).to(DEVICE, torch.bfloat16)
    # The reference backend is judged by an independent float64 formula, never by its own function.
    if backend == "reference":
        ref = float64_gemm(xq, xs, w, s, bias).to(out_dtype)
    else:
        ref = reference_gemm(xq, xs, w, s, bias, out_dtype)
    out = gemm(xq, xs, w, s, bias=bias, out_dtype=out_dtype, backend=backend)
    assert out.shape == (*lead, n) and out.dtype == out_dtype
    ran = backend or choose(Problem.of(xq.numel() // k, n, k, DEVICE, out_dtype))
    _assert_close(out, ref, f"backend={ran} x{tuple(xq.shape)} w{(n, k)} {out_dtype}",
                  roundings_of(ran, bias is not None))


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _skip_unless_available(name: str) -> None:
    available = get_backend(name).availability()
    if not available:
        pytest.skip(f"{name} not available here: {available.reason}")
    if not get_backend(name).supports(Problem.of(1, 128, 128, DEVICE)):
        pytest.skip(f"{name} does not run on {DEVICE}: {get_backend(name).supports(Problem.of(1, 128, 128, DEVICE))}")


@pytest.mark.parametrize("name", backend_names())
def test_forced_backend_matches_reference(name):
    _skip_unless_available(name)
    limits = get_backend(name).limits
    budget = INTERPRETER_STEPS if name == "triton" and INTERPRETED else None
    strategy = problems(limits.n_multiple, limits.k_multiple, limits.out_dtypes, budget)

    @_settings(JIT_EXAMPLES.get(name, EXAMPLES))
    @given(strategy)
    def check(problem):
        lead, n, k, out_dtype, with_bias, seed = problem
        # Only what the backend declares it supports: shapes outside its limits are the dispatcher's business.
        assert get_backend(name).supports(Problem.of(math.prod(lead), n, k, DEVICE, out_dtype))
        _check_example(name, *problem)

    check()


@_settings(DISPATCHED_INTERPRETED_EXAMPLES if INTERPRETED else EXAMPLES)
@given(problems(budget=INTERPRETER_STEPS if INTERPRETED else None))
def test_dispatched_call_matches_reference(problem):
    lead, n, k, out_dtype = problem[:4]
    try:
        if DEVICE == "cpu":
            # A measured row for this shape: the dispatcher's own path (table lookup, limits, cache) picks Triton.
            m = math.prod(lead)
            dispatch.record_ranking(device_key(DEVICE), n, k, m, ["triton", "reference"])
            assert dispatch.choose(Problem.of(m, n, k, DEVICE, out_dtype)) == "triton"
        _check_example(None, *problem)
    finally:
        dispatch.clear_caches()
