"""The public fused producers: the custom ops and their torch path, QuantizedActivation through every backend and
both scale layouts, the modules built on them, torch.compile, and input checks."""

import os

import pytest
import torch
from torch import nn

import blockfp8
from blockfp8 import Fp8BlockLinear, Fp8GatedMLP, Fp8RMSNorm, QuantizedActivation, rms_norm_quant, silu_mul_quant
from blockfp8.backends import Problem, backend_names, get_backend
from blockfp8.format import SCALE_LAYOUTS
from blockfp8.fused import default_layout, rms_norm, scale_layout_for, silu_mul
from blockfp8.quant import exp_fp32, mean_square, quantize_activation, quantize_weight
from blockfp8.reference import TOLERANCE, rel_error
from blockfp8.testing import default_device
from blockfp8.testing.operands import float64_gemm, random_activation, random_fp8_weight

DEVICE = default_device()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's warnings on the NaN/Inf inputs


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int32)


def _x(m=3, k=200, dtype=torch.bfloat16, seed=1):
    return random_activation(m, k, seed=seed, device=DEVICE, dtype=dtype, spread=2.0)


# ------------------------------------------------------------------------------------------ definitions


def test_exp_is_within_an_ulp_and_saturates_like_exp():
    t = torch.linspace(-87, 88.7, 200_001)
    true = torch.exp(t.double())
    ulp = torch.nextafter(true.float(), torch.tensor(float("inf"))).double() - true.float().double()
    assert ((exp_fp32(t).double() - true).abs() / ulp).max() <= 1.0
    edge = exp_fp32(torch.tensor([-1000.0, -87.5, 0.0, 88.8, float("inf"), float("nan")]))
    assert edge[:4].tolist() == [0.0, 0.0, 1.0, float("inf")] and edge[4] == float("inf") and torch.isnan(edge[5])


def test_definitions_agree_with_the_plain_torch_ops():
    # The exact definitions differ from torch's own fp32 ops by rounding only: at most one ulp of the dtype.
    x = _x(8, 7168, seed=4)
    w = random_activation(7168, 1, seed=5, device=x.device).view(7168)
    xf = x.float()
    plain = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(x.dtype)
    ours = rms_norm(x, w, 1e-6)
    assert (ours.float() - plain.float()).abs().max() <= plain.float().abs().max() * 2**-7
    assert (ours != plain).float().mean() < 1e-3
    assert mean_square(xf).shape == (8, 1)
    gu = _x(8, 2048, seed=6) * 3
    gate, up = gu.chunk(2, -1)
    assert (silu_mul(gu) != nn.functional.silu(gate) * up).float().mean() < 1e-3


def test_mean_square_does_not_depend_on_the_summation_order():
    x = _x(4, 5000, dtype=torch.float32, seed=7)
    x = x * torch.tensor([1.0, 1e-30, 1e30, 1.0], device=x.device).view(4, 1)
    perm = torch.randperm(5000, device=x.device)
    assert torch.equal(mean_square(x), mean_square(x[:, perm]))
    assert torch.equal(mean_square(x), mean_square(x.flip(-1)))


# ----------------------------------------------------------------------------------- ops and the torch path


@pytest.mark.skipif(not INTERPRETER, reason="compares the interpreted kernel with the torch path on CPU")
@pytest.mark.parametrize("layout", SCALE_LAYOUTS)
def test_torch_path_equals_the_kernel(monkeypatch, layout):
    """The torch path (CPU without the interpreter) and the Triton path give the same bytes."""
    x, res = _x(5, 300), _x(5, 300, seed=2)
    x[2, 7] = float("nan")
    w = random_activation(300, 1, seed=3).view(300)
    gu = _x(5, 2 * 260, seed=4) * 4
    triton_out = rms_norm_quant(x, w, 1e-6, res, layout=layout), silu_mul_quant(gu, layout=layout)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch_out = rms_norm_quant(x, w, 1e-6, res, layout=layout), silu_mul_quant(gu, layout=layout)
    (qa_a, h_a), sq_a = triton_out
    (qa_b, h_b), sq_b = torch_out
    torch.testing.assert_close(h_a, h_b, rtol=0, atol=0, equal_nan=True)
    for a, b in [(qa_a, qa_b), (sq_a, sq_b)]:
        assert a.scales.stride() == b.scales.stride() and a.layout == b.layout == layout
        nan = torch.isnan(a.values.float())
        assert torch.equal(nan, torch.isnan(b.values.float()))
        assert torch.equal(_bytes(a.values)[~nan], _bytes(b.values)[~nan])
        torch.testing.assert_close(a.scales, b.scales, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_public_api_shapes_and_the_unfused_result(dtype):
    x = _x(6, 200, dtype).view(2, 3, 200)
    w = torch.ones(200, dtype=dtype, device=DEVICE)
    qa = rms_norm_quant(x, w, 1e-6, layout="col", ue8m0=True)
    assert isinstance(qa, QuantizedActivation) and qa.dtype == dtype and qa.layout == "col"
    assert qa.values.shape == (2, 3, 200) and qa.scales.shape == (2, 3, 2)
    q_ref, s_ref = quantize_activation(rms_norm(x, w, 1e-6), ue8m0=True)
    assert torch.equal(_bytes(qa.values), _bytes(q_ref)) and torch.equal(qa.scales, s_ref)
    gu = _x(6, 400, dtype, seed=3).view(2, 3, 400)
    sq = silu_mul_quant(gu)
    q_ref, s_ref = quantize_activation(silu_mul(gu))
    assert sq.values.shape == (2, 3, 200) and sq.layout == default_layout(gu) and sq.dtype == dtype
    assert torch.equal(_bytes(sq.values), _bytes(q_ref)) and torch.equal(sq.scales, s_ref)


def test_custom_ops_are_registered_and_pass_opcheck():
    x, w, res = _x(5, 200), torch.ones(200, device=DEVICE), _x(5, 200, seed=2)
    # opcheck compares the fake implementation's outputs (shapes, strides: the "col" layout) with the real ones.
    torch.library.opcheck(torch.ops.blockfp8.rms_norm_quant, (x, w, 1e-6, res, "row", False))
    torch.library.opcheck(torch.ops.blockfp8.rms_norm_quant, (x, w, 1e-6, None, "col", True))
    torch.library.opcheck(torch.ops.blockfp8.silu_mul_quant, (_x(5, 400), "col", False))


def test_eager_calls_skip_the_op_dispatch_and_traced_or_grad_calls_keep_it(monkeypatch):
    """An eager call runs the op's implementation directly (the dispatch costs tens of microseconds), with the
    op's very bytes; a call under a torch function mode, or with an input autograd tracks, goes through the op."""
    from torch.overrides import TorchFunctionMode

    from blockfp8 import fused

    x, w, res, gu = _x(5, 200), torch.ones(200, device=DEVICE), _x(5, 200, seed=2), _x(5, 400, seed=3)
    want_rms = torch.ops.blockfp8.rms_norm_quant(x, w, 1e-6, res, "col", False)
    want_silu = torch.ops.blockfp8.silu_mul_quant(gu, "col", False)
    calls = []

    def spy(op):
        def call(*args):
            calls.append(op)
            return getattr(torch.ops.blockfp8, op)(*args)
        return call

    monkeypatch.setattr(fused, "_rms_norm_quant_op", spy("rms_norm_quant"))
    monkeypatch.setattr(fused, "_silu_mul_quant_op", spy("silu_mul_quant"))
    qa, h = rms_norm_quant(x, w, 1e-6, res, layout="col")
    sq = silu_mul_quant(gu, layout="col")
    assert calls == []
    assert torch.equal(_bytes(qa.values), _bytes(want_rms[0])) and torch.equal(qa.scales, want_rms[1])
    assert torch.equal(h, want_rms[2]) and torch.equal(_bytes(sq.values), _bytes(want_silu[0]))
    assert torch.equal(sq.scales, want_silu[1])
    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        rms_norm_quant(x, w, 1e-6, layout="col")
        silu_mul_quant(gu, layout="col")
    assert calls == ["rms_norm_quant", "silu_mul_quant"]
    rms_norm_quant(x, nn.Parameter(w.clone()), 1e-6)  # an RMSNorm weight that trains
    with torch.no_grad():
        rms_norm_quant(x, nn.Parameter(w.clone()), 1e-6)
    assert calls == ["rms_norm_quant", "silu_mul_quant", "rms_norm_quant"]


# ------------------------------------------------------------------------- QuantizedActivation in a linear


def _backends_here(k: int) -> list[str]:
    return [b for b in backend_names() if get_backend(b).supports(Problem.of(4, 256, k, DEVICE))]


@pytest.mark.parametrize("layout", SCALE_LAYOUTS)
@pytest.mark.parametrize("k", [200, 256])  # 256: K % 16 == 0, which cuBLAS, DeepGEMM and Gluon need (on a GPU)
def test_linear_takes_a_quantized_activation_in_either_layout(layout, k):
    """Every backend that runs here reads both layouts and gives what the unfused linear gives, bit for bit."""
    backends = _backends_here(k)
    assert "reference" in backends and (not INTERPRETER or "triton" in backends)
    x = _x(4, k)
    w = random_activation(k, 1, seed=3, device=DEVICE).view(k)
    wq, ws = random_fp8_weight(256, k, device=DEVICE)
    bias = torch.randn(256, device=DEVICE, dtype=torch.bfloat16)
    qa = rms_norm_quant(x, w, 1e-6, layout=layout)
    for backend in backends:
        fused = blockfp8.linear(qa, wq, ws, bias, backend=backend)
        unfused = blockfp8.linear(rms_norm(x, w, 1e-6), wq, ws, bias, backend=backend)
        assert fused.dtype == torch.bfloat16 and torch.equal(fused, unfused), backend
        # An independent float64 formula: for the reference backend, reference_gemm would be itself.
        ref = float64_gemm(qa.values, qa.scales, wq, ws, bias)
        assert rel_error(fused, ref) <= TOLERANCE


def test_linear_output_has_the_original_dtype_and_modules_take_it():
    x = _x(3, 200, torch.float16)
    qa = rms_norm_quant(x, torch.ones(200, device=DEVICE), 1e-6)
    layer = Fp8BlockLinear.from_linear(nn.Linear(200, 136, bias=False, device=DEVICE))
    out = layer(qa)
    assert out.dtype == torch.float16 and out.shape == (3, 136)
    assert torch.equal(out, layer(rms_norm(x, torch.ones(200, device=DEVICE), 1e-6)))
    one = rms_norm_quant(x[0], torch.ones(200, device=DEVICE), 1e-6, layout="col")  # a single token, 1-D
    assert one.scales.shape == (2,) and torch.equal(layer(one), out[0])


def test_scale_layout_comes_from_the_dispatcher():
    shapes = [(2112, 7168), (36864, 7168)]
    assert scale_layout_for(1, shapes, "cpu") == get_backend("reference").scale_layout == "row"
    if INTERPRETER:
        assert scale_layout_for(1, shapes, "cpu", backend="triton") == "col"
    with pytest.raises(ValueError, match="at least one"):
        scale_layout_for(1, [], "cpu")
    # default_layout(t) stands for the dispatcher on CUDA: every backend but the reference prefers "col" there.
    assert {b: get_backend(b).scale_layout for b in backend_names()} == {
        b: "row" if b == "reference" else "col" for b in backend_names()}
    assert default_layout(torch.zeros(1)) == "row"


# ------------------------------------------------------------------------------------------------ modules


def test_fp8_rmsnorm_module():
    norm = torch.nn.RMSNorm(200, eps=1e-5, device=DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    layer = Fp8RMSNorm.from_norm(norm, layout="col")
    assert layer.weight is norm.weight and layer.eps == 1e-5
    x, res = _x(3, 200), _x(3, 200, seed=2)
    qa, h = layer(x, res)
    y_ref, h_ref = rms_norm(x, norm.weight, 1e-5, res)
    assert torch.equal(h, h_ref) and torch.equal(_bytes(qa.values), _bytes(quantize_activation(y_ref)[0]))
    assert qa.scales.stride() == (1, 4)

    class HfStyle(nn.Module):  # Hugging Face's Llama/Qwen3 RMSNorm names its epsilon variance_epsilon
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(64))
            self.variance_epsilon = 1e-6

    assert Fp8RMSNorm.from_norm(HfStyle()).eps == 1e-6
    assert Fp8RMSNorm.from_norm(torch.nn.RMSNorm(64)).eps == torch.finfo(torch.float32).eps
    assert Fp8RMSNorm(64).weight.shape == (64,) and "layout=auto" in repr(Fp8RMSNorm(64))
    with pytest.raises(TypeError, match="1-D weight"):
        Fp8RMSNorm.from_norm(nn.Linear(4, 4))


def _float_mlp(hidden=200, inter=256, bias=False):
    shapes = [(hidden, inter), (hidden, inter), (inter, hidden)]
    return [nn.Linear(k, n, bias=bias).to(DEVICE, torch.bfloat16) for k, n in shapes]


def test_gated_mlp_equals_the_unfused_mlp():
    gate, up, down = _float_mlp()
    mlp = Fp8GatedMLP.from_projections(gate, up, down)
    x = _x(3, 200)
    h = mlp.gate_up_proj(x)
    assert torch.equal(mlp(x), mlp.down_proj(silu_mul(h)))
    g, u = h.chunk(2, -1)
    assert rel_error(mlp(x), mlp.down_proj(nn.functional.silu(g) * u)) <= TOLERANCE
    # Fp8 projections stack with their block scales when gate's rows end on a block: the same weights.
    fp8 = [Fp8BlockLinear.from_linear(m) for m in (gate, up, down)]
    stacked = Fp8GatedMLP.from_projections(*fp8)
    assert torch.equal(stacked.gate_up_proj.weight.view(torch.uint8), mlp.gate_up_proj.weight.view(torch.uint8))
    assert stacked.down_proj is fp8[2]
    shared = Fp8GatedMLP.from_linears(mlp.gate_up_proj, mlp.down_proj)
    assert shared.gate_up_proj is mlp.gate_up_proj and torch.equal(shared(x), mlp(x))
    built = Fp8GatedMLP(200, 256, device=DEVICE)
    assert built.gate_up_proj.weight.shape == (512, 200) and built(x).shape == (3, 200)


def test_gated_mlp_refusals():
    gate, up, down = _float_mlp(inter=200, bias=True)
    w, s = quantize_weight(torch.cat([gate.weight, up.weight]))
    assert Fp8GatedMLP.from_projections(gate, up, down).gate_up_proj.bias.shape == (400,)
    assert torch.equal(Fp8GatedMLP.from_projections(gate, up, down).gate_up_proj.weight_scale_inv, s)
    fp8 = [Fp8BlockLinear.from_linear(m) for m in (gate, up, down)]
    with pytest.raises(ValueError, match="out_features % 128 == 0"):
        Fp8GatedMLP.from_projections(*fp8)
    with pytest.raises(TypeError, match="must all be nn.Linear or all Fp8BlockLinear"):
        Fp8GatedMLP.from_projections(gate, fp8[1], down)
    with pytest.raises(ValueError, match="one shape"):
        Fp8GatedMLP.from_projections(gate, nn.Linear(200, 128), down)
    with pytest.raises(ValueError, match="2 \\* down_proj.in_features"):
        Fp8GatedMLP.from_linears(nn.Linear(200, 300), nn.Linear(200, 200))
    with pytest.raises(TypeError, match="down_proj must be"):
        Fp8GatedMLP.from_linears(nn.Linear(200, 400), nn.Conv1d(1, 1, 1))
    assert w.shape == (400, 200)


def test_compiled_block_has_no_graph_break_and_matches_eager():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = Fp8RMSNorm(200, device=DEVICE)
            self.mlp = Fp8GatedMLP.from_projections(*_float_mlp())

        def forward(self, x, residual):
            xq, h = self.norm(x, residual)
            return h + self.mlp(xq)

    block = Block()
    x, res = _x(4, 200), _x(4, 200, seed=2)
    with torch.inference_mode():
        eager = block(x, res)
        torch._dynamo.reset()
        # aot_eager traces the custom ops' fake implementations as Inductor does, without its C++ build.
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, res)
    assert torch.equal(compiled, eager)


# ------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_argument():
    x, w = _x(2, 200), torch.ones(200, device=DEVICE)
    cases = [
        (lambda: rms_norm_quant(x.int(), w, 1e-6), TypeError, "x must have dtype"),
        (lambda: rms_norm_quant(x, w.int(), 1e-6), TypeError, "weight must have dtype"),
        (lambda: rms_norm_quant(x, w[:100], 1e-6), ValueError, r"weight must have shape \(200,\)"),
        (lambda: rms_norm_quant(x, w, -1.0), ValueError, "eps must be a finite float >= 0, got -1.0"),
        (lambda: rms_norm_quant(x, w, float("nan")), ValueError, "eps"),
        (lambda: rms_norm_quant(x, w, 1e-6, x.float()), TypeError, "residual must have x's dtype"),
        (lambda: rms_norm_quant(x, w, 1e-6, x[:1]), ValueError, "residual must have x's shape"),
        (lambda: rms_norm_quant(x, w, 1e-6, layout="diagonal"), ValueError, "layout must be one of"),
        (lambda: rms_norm_quant(x, w, 1e-6, ue8m0=1), TypeError, "ue8m0 must be a bool"),
        (lambda: rms_norm_quant(x[:, :0], w[:0], 1e-6), ValueError, "non-empty last dimension"),
        (lambda: rms_norm_quant(x.to("meta"), w, 1e-6), ValueError, "cpu or cuda"),
        (lambda: rms_norm_quant(x, w.to("meta"), 1e-6), ValueError, "weight is on meta but x is on"),
        (lambda: silu_mul_quant(x[:, :199]), ValueError, "even, non-zero last dimension"),
        (lambda: silu_mul_quant(x.long()), TypeError, "gate_up must have dtype"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()


@pytest.mark.parametrize("eps", [1e-2, 1.0])
def test_rms_norm_quant_uses_the_callers_eps(eps):
    x = _x(4, 256) * 0.05  # mean square ~2.5e-3: an eps of 1e-2 or 1 changes the norm several-fold
    w = torch.ones(256, device=DEVICE)
    qa = rms_norm_quant(x, w, eps, layout="row")
    want_q, want_s = quantize_activation(rms_norm(x, w, eps))
    assert torch.equal(qa.values.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(qa.scales, want_s)
    other_q, other_s = quantize_activation(rms_norm(x, w, 1e-6))
    assert not torch.equal(qa.scales, other_s)
