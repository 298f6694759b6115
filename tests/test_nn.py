"""Fp8BlockLinear and convert_model."""

import pytest
import torch
from torch import nn

import blockfp8
from blockfp8 import Fp8BlockLinear, convert_model, rel_error

# Block-FP8 quantizes weights and activations to 3 mantissa bits with one scale per block/group; against
# the unquantized float layer the relative error is ~3.5% for Gaussian data (measured, test below). We
# document and test 6%: far below what a misapplied scale (errors of order 1) would give.
FLOAT_TOLERANCE = 0.06


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", [(200, 576), (64, 1000)])
def test_from_linear_close_to_float(dtype, n, k):
    lin = nn.Linear(k, n).to(dtype)
    layer = Fp8BlockLinear.from_linear(lin)
    x = torch.randn(2, 3, k, dtype=dtype)
    y = layer(x)
    assert y.shape == (2, 3, n) and y.dtype == dtype
    assert rel_error(y, lin(x)) < FLOAT_TOLERANCE
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale_inv.shape == ((n + 127) // 128, (k + 127) // 128)


def test_from_fp8_and_state_dict_names():
    wq, ws = blockfp8.quantize_weight(torch.randn(130, 300))
    layer = Fp8BlockLinear.from_fp8(wq, ws)
    assert set(layer.state_dict()) == {"weight", "weight_scale_inv"}
    fresh = Fp8BlockLinear(300, 130, bias=False)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 300)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(layer(x), blockfp8.linear(x, wq, ws))


def test_from_fp8_rejects_bad_scales():
    wq, ws = blockfp8.quantize_weight(torch.randn(130, 300))
    with pytest.raises(ValueError, match="weight_scale_inv must have shape"):
        Fp8BlockLinear.from_fp8(wq, ws[:1])
    bad = ws.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight_scale_inv"):
        Fp8BlockLinear.from_fp8(wq, bad)
    with pytest.raises(TypeError, match="nn.Linear"):
        Fp8BlockLinear.from_linear(nn.Conv1d(3, 3, 1))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(d, d), "o": nn.Linear(d, d, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(d, 3 * d), nn.GELU(), nn.Linear(3 * d, d))
        self.gate = nn.Linear(d, 4)

    def forward(self, x):
        x = x + self.attn["o"](self.attn["q"](x))
        return x + self.mlp(x) + self.gate(x).sum(-1, keepdim=True)


class Net(nn.Module):
    def __init__(self, d: int = 200) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(2)])
        self.lm_head = nn.Linear(d, 50)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def test_convert_model_nested_with_skip_list():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 200)
    want = net(x)
    report = convert_model(net, skip=["lm_head", "*.gate", "layers.1.mlp.*"])
    assert sorted(report.converted) == sorted(
        ["layers.0.attn.q", "layers.0.attn.o", "layers.0.mlp.0", "layers.0.mlp.2", "layers.1.attn.q",
         "layers.1.attn.o"]
    )
    assert set(report.skipped) == {"lm_head", "layers.0.gate", "layers.1.gate", "layers.1.mlp.0", "layers.1.mlp.2"}
    assert "matches skip pattern 'lm_head'" in report.skipped["lm_head"]
    assert isinstance(net.layers[0].mlp[0], Fp8BlockLinear) and type(net.lm_head) is nn.Linear
    assert isinstance(net.layers[1].mlp[0], nn.Linear)
    assert "converted 6 linear layer(s), skipped 5" in str(report)
    assert rel_error(net(x), want) < FLOAT_TOLERANCE


def test_convert_model_twice_is_a_no_op():
    net = Net()
    convert_model(net)
    assert convert_model(net).converted == []


def test_forced_backend_on_module():
    lin = nn.Linear(256, 64)
    layer = Fp8BlockLinear.from_linear(lin, backend="cublas")
    with pytest.raises(ValueError, match="cublas"):
        layer(torch.randn(2, 256))
    assert "backend=cublas" in repr(layer)


def test_dtype_casts_keep_fp8_weight_and_fp32_scales():
    layer = Fp8BlockLinear.from_linear(nn.Linear(256, 130))
    w, s = layer.weight.clone(), layer.weight_scale_inv.clone()
    layer.to(torch.bfloat16)
    layer.half()
    assert torch.equal(layer.weight.view(torch.uint8), w.view(torch.uint8)) and torch.equal(layer.weight_scale_inv, s)
    assert layer.bias.dtype == torch.float16
    assert layer(torch.randn(2, 256, dtype=torch.float16)).dtype == torch.float16


def test_shared_linear_stays_shared():
    shared = nn.Linear(256, 256)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    report = convert_model(model)
    assert sorted(report.converted) == ["a.0", "b.0"]
    assert model["a"][0] is model["b"][0] and isinstance(model["a"][0], Fp8BlockLinear)


def test_linear_subclasses_are_not_converted():
    """nn.MultiheadAttention reads out_proj.weight itself: its NonDynamicallyQuantizableLinear stays float."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(128, 4, batch_first=True), "fc": nn.Linear(128, 128)})
    assert convert_model(model).converted == ["fc"]
    x = torch.randn(1, 3, 128)
    model["attn"](x, x, x)
