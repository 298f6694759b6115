"""The numerics policy (docs/reliability.md) for every backend available here.

* NaN/Inf in an activation group makes that group's scale non-finite, and then the whole output row is
  non-finite (NaN or +-Inf) while every other row stays finite -- the rows torch.matmul makes non-finite.
* A non-finite weight scale passed straight to gemm poisons its 128 output columns (values are checked at
  load/convert time instead, with the tensor name).
* All-zero activation groups quantize to zeros and contribute exactly zero (the AMAX_FLOOR).
* M = 0, with or without batch dims, returns an empty (..., 0, N) tensor for every backend forced.
* Pinned against values written here: groups whose amax is 448 quantize exactly, so ``linear`` on them gives
  exact sums, and ``convert`` stores known fp8 bytes and scales.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from blockfp8 import Fp8BlockLinear, convert_model, gemm, linear, quantize_activation, quantize_weight
from blockfp8.backends import Problem, backend_names, get_backend
from blockfp8.backends.triton.act_quant import quantize_activation_fused
from blockfp8.checkpoint import SINGLE_NAME, convert_checkpoint
from blockfp8.quant import dequantize_weight
from blockfp8.reference import reference_gemm, rel_error
from blockfp8.testing import default_device
from blockfp8.testing.conformance import roundings_of, tolerance_for
from blockfp8.validate import check_fp8_linear

DEVICE = default_device()

# The interpreter's numpy ops warn on inf/inf, which the policy tests produce on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# N % 16 and K % 16 (cuBLAS, DeepGEMM), with tails in both: 272 = 2 * 128 + 16, 320 = 2 * 128 + 64.
M, N, K = 6, 272, 320
BAD_ROWS = (1, 4)
NONFINITE = [float("nan"), float("inf"), float("-inf")]


def _runs_here(name: str, out_dtype: torch.dtype = torch.bfloat16) -> bool:
    return bool(get_backend(name).supports(Problem.of(M, N, K, DEVICE, out_dtype)))


BACKENDS = [n for n in backend_names() if _runs_here(n)]


def _weight(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w, s = quantize_weight(torch.randn(N, K, generator=g))
    return w.to(DEVICE), s.to(DEVICE)


def _activations(value: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g)
    x[BAD_ROWS[0], 7] = value  # first K group
    x[BAD_ROWS[1], K - 3] = value  # the partial tail group
    return x.to(DEVICE)


QUANTIZERS = ["torch", "fused", "torch-ue8m0", "fused-ue8m0"]


def _quantize(x: torch.Tensor, quantizer: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    ue8m0 = quantizer.endswith("ue8m0")
    if quantizer.startswith("torch"):
        return quantize_activation(x, ue8m0=ue8m0)
    return quantize_activation_fused(x, ue8m0=ue8m0, layout=get_backend(backend).scale_layout)


def _assert_rows_policy(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> None:
    finite = torch.isfinite(out.float())
    bad = torch.zeros(M, dtype=torch.bool, device=out.device)
    bad[list(BAD_ROWS)] = True
    assert not finite[bad].any(), f"a row with a non-finite input has finite outputs: {finite[bad].sum()} of them"
    assert finite[~bad].all(), "a non-finite input leaked into another row"
    matmul_bad = ~torch.isfinite(x.float() @ dequantize_weight(w, s).t()).all(-1)
    assert torch.equal(matmul_bad, bad), "torch.matmul makes other rows non-finite than blockfp8"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_nonfinite_activation_poisons_its_row_only(backend, value, quantizer):
    w, s = _weight()
    x = _activations(value)
    xq, xs = _quantize(x, quantizer, backend)
    # The group holding the value gets a non-finite scale; the row's other groups keep theirs.
    assert not torch.isfinite(xs[BAD_ROWS[0], 0]) and not torch.isfinite(xs[BAD_ROWS[1], -1])
    assert torch.isfinite(xs[BAD_ROWS[0], 1:]).all() and torch.isfinite(xs[BAD_ROWS[1], :-1]).all()
    out = gemm(xq, xs, w, s, backend=backend)
    _assert_rows_policy(out, x, w, s)
    good = [i for i in range(M) if i not in BAD_ROWS]
    ref = reference_gemm(xq[good], xs[good], w, s)
    assert rel_error(out[good], ref) <= tolerance_for(ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
def test_linear_nonfinite_rows(backend, value):
    """Through ``linear``: the quantizer the op picks for the device (fused Triton on CUDA, torch on CPU)."""
    w, s = _weight()
    x = _activations(value).to(torch.bfloat16)
    _assert_rows_policy(linear(x, w, s, backend=backend), x, w, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_weight_scale_is_refused_by_gemm(backend, value):
    w, s = _weight()
    s = s.clone()
    s[1, 2] = value  # N block 1 (columns 128..255), K block 2 (the tail)
    xq, xs = quantize_activation(torch.randn(M, K, device=DEVICE))
    # Read once per weight state when its plan is built (ops.check_values_once), not trusted as before.
    with pytest.raises(ValueError, match=r"weight_scale_inv holds 1 invalid value\(s\).*index \(1, 2\)"):
        gemm(xq, xs, w, s, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_tiny_groups(backend):
    w, s = _weight()
    x = torch.randn(M, K, device=DEVICE)
    x[0] = 0.0  # an all-zero row
    x[2, 128:256] = 0.0  # one all-zero group
    x[3] *= 1e-20  # below the amax floor: quantizes to zeros
    x[5] *= 1e-12  # below the floor too, but representable relative to the floor scale
    xq, xs = quantize_activation(x)
    assert torch.isfinite(xs).all() and (xs > 0).all()
    assert (xq[0].float() == 0).all() and (xq[2, 128:256].float() == 0).all() and (xq[3].float() == 0).all()
    bias = torch.randn(N, device=DEVICE).to(torch.bfloat16)
    out = gemm(xq, xs, w, s, bias=bias, backend=backend)
    assert torch.isfinite(out.float()).all()
    assert torch.equal(out[0], bias) and torch.equal(out[3], bias)  # exactly the bias, never NaN
    ref = reference_gemm(xq, xs, w, s, bias)
    assert rel_error(out, ref) <= tolerance_for(ref, roundings_of(backend, with_bias=True))


def _empty_case_backends() -> list[str]:
    return [*BACKENDS, "auto"]


@pytest.mark.parametrize("backend", _empty_case_backends())
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["0", "2x0", "0x3"])
def test_m0_returns_empty(backend, lead):
    w, s = _weight()
    forced = None if backend == "auto" else backend
    out_dtype = torch.bfloat16
    xq, xs = quantize_activation(torch.zeros(*lead, K, device=DEVICE))
    y = gemm(xq, xs, w, s, out_dtype=out_dtype, backend=forced)
    assert y.shape == (*lead, N) and y.dtype == out_dtype and y.device == w.device
    y = linear(torch.zeros(*lead, K, device=DEVICE, dtype=torch.float16), w, s, backend=forced)
    assert y.shape == (*lead, N) and y.dtype == torch.float16
    y = Fp8BlockLinear.from_fp8(w, s, backend=forced)(torch.zeros(*lead, K, device=DEVICE))
    assert y.shape == (*lead, N) and y.dtype == torch.float32


def test_m0_still_checks_shapes():
    w, s = _weight()
    with pytest.raises(ValueError, match="K=320"):
        linear(torch.zeros(0, K + 1, device=DEVICE), w, s)


# ------------------------------------------------------------------------- weight scales: load/convert time


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -2.0])
def test_bad_weight_scales_rejected_with_the_tensor_name(value):
    w, s = _weight()
    s = s.clone()
    s[0, 1] = value
    with pytest.raises(ValueError, match=r"^weight_scale_inv holds 1 invalid value"):
        Fp8BlockLinear.from_fp8(w, s)
    with pytest.raises(ValueError, match=r"^model\.layers\.7\.mlp\.down_proj\.weight_scale_inv holds 1 invalid"):
        check_fp8_linear(w, s, name="model.layers.7.mlp.down_proj.weight")


def test_convert_model_names_the_layer_with_a_nonfinite_weight():
    model = nn.Sequential(nn.Linear(K, N), nn.Sequential(nn.Linear(N, N)))
    with torch.no_grad():
        model[1][0].weight[5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"1\.0\.weight_scale_inv holds 1 invalid value"):
        convert_model(model)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_quantizers_keep_nan_scales(quantizer):
    """A NaN group's scale stays NaN: a max/clamp that ignores NaN, or UE8M0 rounding that wraps NaN's exponent
    to -0.0, would give a finite scale and let a NaN row come out finite."""
    x = torch.randn(3, 256, device=DEVICE)
    x[1, 5] = float("nan")
    _, s = _quantize(x, quantizer, "reference")
    assert torch.isnan(s[1, 0]), f"scale of the NaN group is {s[1, 0].item()}"
    assert torch.isfinite(s[1, 1]) and torch.isfinite(s[[0, 2]]).all()


# --------------------------------------------------------------------------- pinned to literal values

# Two tokens, K = 256 (two groups): each group's amax is 448 and every value is exact in e4m3, so the quantizer
# gives scale 1 and the fp8 values are the inputs themselves; any other FP8_MAX would round them.
EXACT_X = [[(0, 448.0), (1, 2.0), (128, -448.0), (129, 0.5)],
           [(0, -3.0), (1, 448.0), (128, 0.25), (129, 448.0), (130, -1.0)]]
EXACT_N = 256
EXACT_SCALES = [[2.0, 0.5], [0.25, 4.0]]  # per 128 x 128 block of an all-ones weight
# Per token: 2 * (group-0 sum) + 0.5 * (group-1 sum) for columns 0..127, 0.25 * ... + 4 * ... for 128..255.
EXACT_Y = [[676.25, -1677.5], [1113.625, 1900.25]]


def _exact_backends() -> list[str]:
    return [n for n in backend_names() if get_backend(n).supports(Problem.of(2, EXACT_N, 256, DEVICE, torch.float32))]


@pytest.mark.parametrize("backend", _exact_backends())
def test_exact_groups_give_exact_sums(backend):
    x = torch.zeros(2, 256)
    for row, entries in enumerate(EXACT_X):
        for col, value in entries:
            x[row, col] = value
    w = torch.ones(EXACT_N, 256).to(torch.float8_e4m3fn)
    s = torch.tensor(EXACT_SCALES)
    y = linear(x.to(DEVICE), w.to(DEVICE), s.to(DEVICE), backend=backend)
    want = torch.tensor(EXACT_Y).repeat_interleave(128, dim=1)
    assert torch.equal(y.cpu(), want), f"{backend}: {y[:, ::128].tolist()} != {EXACT_Y}"


def test_convert_stores_known_bytes_and_scales(tmp_path):
    """A converted checkpoint holds the e4m3 bytes of exact values and the scales amax / 448 of their blocks."""
    w = torch.zeros(130, 8)
    w[0, :6] = torch.tensor([448.0, -448.0, 1.0, -2.0, 0.5, 3.0])  # block (0, 0): amax 448, scale 1
    w[128:, :3] = torch.tensor([1.0, -1.0, 0.5])  # the partial block (1, 0): amax 1, scale 1/448
    name = "model.layers.0.mlp.up_proj"
    src = tmp_path / "float"
    src.mkdir()
    save_file({f"{name}.weight": w}, src / SINGLE_NAME, metadata={"format": "pt"})
    convert_checkpoint(src, tmp_path / "fp8", progress=False)
    out = load_file(tmp_path / "fp8" / SINGLE_NAME)
    assert out[f"{name}.weight_scale_inv"].tolist() == [[1.0], [float.fromhex("0x1.24924ap-9")]]
    stored = out[f"{name}.weight"].view(torch.uint8)
    assert stored[0, :6].tolist() == [0x7E, 0xFE, 0x38, 0xC0, 0x30, 0x44]
    assert stored[128:, :3].tolist() == [[0x7E, 0xFE, 0x76]] * 2
