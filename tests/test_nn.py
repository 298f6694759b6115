"""Fp8BlockLinear and convert_model."""

import math

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
    report = convert_model(net, skip=["lm_head", "*.gate", "layers.1.mlp.*"], default_skip=False)
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


# ------------------------------------------------------------------------- every use of a shared layer


def _float_lin(k: int = 256, n: int = 256, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def test_linear_used_twice_in_one_parent():
    """Sequential(lin, ReLU(), lin): the second use used to stay float while the report said 'converted 1'."""
    lin = _float_lin()
    model = nn.Sequential(lin, nn.ReLU(), lin)
    want = Fp8BlockLinear.from_linear(lin)
    report = convert_model(model)
    assert report.converted == ["0", "2"] and report.shared == {"2": "0"} and not report.skipped
    assert model[0] is model[2] and isinstance(model[2], Fp8BlockLinear)
    assert str(report).startswith("converted 2 linear layer(s), skipped 0 (1 of these name(s) reach a layer")
    assert "  2 is the same layer as 0" in str(report)
    x = torch.randn(3, 256)
    assert torch.equal(model(x), want(torch.relu(want(x))))


@pytest.mark.parametrize("build", ["module_list", "module_dict", "shared_parent"])
def test_every_use_of_a_shared_layer_is_converted(build):
    lin = _float_lin()
    if build == "module_list":
        model, names = nn.ModuleList([lin, nn.GELU(), lin, lin]), ["0", "2", "3"]
    elif build == "module_dict":
        model, names = nn.ModuleDict({"a": lin, "b": nn.Sequential(lin)}), ["a", "b.0"]
    else:  # one block (holding two uses) placed twice
        block = nn.Sequential(lin, lin)
        model, names = nn.Sequential(block, block), ["0.0", "0.1", "1.0", "1.1"]
    report = convert_model(model)
    assert report.converted == names and set(report.shared) == set(names[1:])
    layers = [model.get_submodule(name) for name in names]
    assert all(layer is layers[0] for layer in layers) and isinstance(layers[0], Fp8BlockLinear)
    assert not any(type(m) is nn.Linear for m in model.modules())


def test_shared_layer_with_one_skipped_name_stays_float_everywhere():
    lin = _float_lin()
    model = nn.ModuleDict({"proj": lin, "out": nn.Sequential(lin)})
    report = convert_model(model, skip=["proj"])
    assert report.converted == [] and report.skipped == {
        "proj": "matches skip pattern 'proj'", "out.0": "the same layer as proj (matches skip pattern 'proj')"}
    assert model["proj"] is model["out"][0] is lin


# ------------------------------------------------------------------------------------- default skips


def test_default_skips_are_the_checkpoint_converters():
    from blockfp8.checkpoint import DEFAULT_SKIP as CHECKPOINT_SKIP
    from blockfp8.nn import DEFAULT_SKIP

    assert DEFAULT_SKIP is CHECKPOINT_SKIP
    assert DEFAULT_SKIP == ("*embed*", "*norm*", "lm_head", "gate")


def test_convert_model_default_skips_and_turning_them_off():
    def model() -> nn.Module:
        return nn.ModuleDict({
            "up_proj": nn.Linear(128, 128), "lm_head": nn.Linear(128, 64), "embed_proj": nn.Linear(128, 128),
            "mlp": nn.ModuleDict({"gate": nn.Linear(128, 8), "gate_proj": nn.Linear(128, 128)}),
            "q_norm": nn.Linear(128, 128)})

    m = model()
    report = convert_model(m)
    assert sorted(report.converted) == ["mlp.gate_proj", "up_proj"]
    assert report.skipped == {"lm_head": "default skip 'lm_head'", "embed_proj": "default skip '*embed*'",
                              "mlp.gate": "default skip 'gate'", "q_norm": "default skip '*norm*'"}
    assert type(m["lm_head"]) is nn.Linear and isinstance(m["up_proj"], Fp8BlockLinear)
    m = model()
    assert len(convert_model(m, default_skip=False).converted) == 6 and isinstance(m["lm_head"], Fp8BlockLinear)
    m = model()
    report = convert_model(m, skip="up_*", default_skip=False)
    assert report.skipped == {"up_proj": "matches skip pattern 'up_*'"} and len(report.converted) == 5


# ------------------------------------------------------------------------- load_state_dict: what arrives


def _state(n: int = 200, k: int = 300, bias: bool = True) -> dict:
    wq, ws = blockfp8.quantize_weight(torch.randn(n, k))
    state = {"weight": wq, "weight_scale_inv": ws}
    if bias:
        state["bias"] = torch.randn(n).to(torch.bfloat16)
    return state


def _with_byte(w: torch.Tensor, byte: int, index=(3, 17)) -> torch.Tensor:
    w = w.clone()
    w.view(torch.uint8)[index] = byte
    return w


def _set(t: torch.Tensor, value: float, index=(1, 2)) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def test_load_state_dict_refuses_a_float_weight():
    """The report's case: a bf16 weight was cast into the fp8 buffer (output error 0.996 against the layer)."""
    state = _state()
    layer = Fp8BlockLinear(300, 200)
    with pytest.raises(TypeError, match=r"^weight must have dtype float8_e4m3fn, got bfloat16"):
        layer.load_state_dict({**state, "weight": blockfp8.dequantize_weight(state["weight"], state["weight_scale_inv"],
                                                                            dtype=torch.bfloat16)})
    assert torch.equal(layer.weight.float(), torch.zeros(200, 300))  # untouched


BAD_STATES = {
    "fp32 weight": (lambda s: {**s, "weight": s["weight"].float()}, TypeError, r"^weight must have dtype float8"),
    "e5m2 weight": (lambda s: {**s, "weight": s["weight"].to(torch.float8_e5m2)}, TypeError, "^weight must have"),
    "uint8 weight": (lambda s: {**s, "weight": s["weight"].view(torch.uint8)}, TypeError, "^weight must have"),
    "fp16 scale": (lambda s: {**s, "weight_scale_inv": s["weight_scale_inv"].half()}, TypeError,
                   r"^weight_scale_inv must have dtype float32, got float16"),
    "scale transposed": (lambda s: {**s, "weight_scale_inv": s["weight_scale_inv"].t().contiguous()}, ValueError,
                         r"^weight_scale_inv must have shape \(2, 3\) .*got \(3, 2\) \(transposed\?\)"),
    "scale padded": (lambda s: {**s, "weight_scale_inv": torch.ones(4, 4)}, ValueError, r"padded\?"),
    "weight transposed": (lambda s: {**s, "weight": s["weight"].t().contiguous()}, ValueError,
                          r"^weight must have shape \(200, 300\) \(this layer's weight\), got \(300, 200\)"),
    "NaN scale": (lambda s: {**s, "weight_scale_inv": _set(s["weight_scale_inv"], math.nan)}, ValueError,
                  r"^weight_scale_inv holds 1 invalid value\(s\).*\(1, 2\): nan"),
    "zero scale": (lambda s: {**s, "weight_scale_inv": _set(s["weight_scale_inv"], 0.0)}, ValueError, "0.0"),
    "negative scale": (lambda s: {**s, "weight_scale_inv": _set(s["weight_scale_inv"], -1.0)}, ValueError, "-1.0"),
    "Inf scale": (lambda s: {**s, "weight_scale_inv": _set(s["weight_scale_inv"], math.inf)}, ValueError, "inf"),
    "scale 2^57": (lambda s: {**s, "weight_scale_inv": _set(s["weight_scale_inv"], 2.0**57)}, ValueError, "2\\^56"),
    "NaN byte 0x7F": (lambda s: {**s, "weight": _with_byte(s["weight"], 0x7F)}, ValueError,
                      r"^weight holds 1 NaN encoding\(s\).*\(3, 17\): byte 0x7F"),
    "NaN byte 0xFF": (lambda s: {**s, "weight": _with_byte(s["weight"], 0xFF)}, ValueError, "byte 0xFF"),
    "weight without scale": (lambda s: {"weight": s["weight"], "bias": s["bias"]}, ValueError,
                             r"has 'weight' but not 'weight_scale_inv'.*loaded together"),
    "scale without weight": (lambda s: {"weight_scale_inv": s["weight_scale_inv"]}, ValueError,
                             r"has 'weight_scale_inv' but not 'weight'"),
    "bias too long": (lambda s: {**s, "bias": torch.zeros(201)}, ValueError, r"^bias must have shape \(200,\)"),
    "bias int": (lambda s: {**s, "bias": torch.zeros(200, dtype=torch.int32)}, TypeError, "^bias must have dtype"),
    "NaN bias": (lambda s: {**s, "bias": _set(s["bias"], math.nan, (5,))}, ValueError,
                 r"^bias holds 1 NaN or Inf value\(s\); first at index \(5,\)"),
    "weight a list": (lambda s: {**s, "weight": s["weight"].float().tolist()}, TypeError,
                      "^weight must be a torch.Tensor"),
}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("case", list(BAD_STATES))
def test_load_state_dict_refuses(case, strict):
    change, error, match = BAD_STATES[case]
    with pytest.raises(error, match=match):
        Fp8BlockLinear(300, 200).load_state_dict(change(_state()), strict=strict)


def test_load_state_dict_names_the_nested_key_and_accepts_good_states():
    model = nn.ModuleDict({"blocks": nn.ModuleList([Fp8BlockLinear(300, 200)])})
    good = _state()
    with pytest.raises(ValueError, match=r"^blocks\.0\.weight_scale_inv holds 1 invalid"):
        model.load_state_dict({f"blocks.0.{k}": v for k, v in BAD_STATES["NaN scale"][0](good).items()})
    model.load_state_dict({f"blocks.0.{k}": v for k, v in good.items()})
    ref = Fp8BlockLinear.from_fp8(good["weight"], good["weight_scale_inv"], good["bias"])
    x = torch.randn(3, 300)
    assert torch.equal(model["blocks"][0](x), ref(x))
    # fp32 bias into the bf16 bias buffer is the usual dtype follow (as model.to(dtype) does), not a refusal.
    model.load_state_dict({f"blocks.0.{k}": v.float() if k == "bias" else v for k, v in good.items()})
    # assign=True installs the given tensors, so they must also be contiguous.
    fresh = Fp8BlockLinear(300, 200)
    with pytest.raises(ValueError, match="^weight must be contiguous"):
        fresh.load_state_dict({**good, "weight": good["weight"].t().contiguous().t()}, assign=True)
    fresh.load_state_dict(good, assign=True)
    assert fresh.weight is good["weight"] and torch.equal(fresh(x), ref(x))
    # a layer without bias refuses a bias as torch does (unexpected key), after the values pass
    with pytest.raises(RuntimeError, match="Unexpected key"):
        Fp8BlockLinear(300, 200, bias=False).load_state_dict(good)


# ------------------------------------------------------------------------- all or nothing, bad arguments


def _snapshot(model: nn.Module) -> tuple[dict, dict]:
    """(every module by name, every tensor by name with a copy of its values) of ``model``."""
    modules = dict(model.named_modules(remove_duplicate=False))
    tensors = {name: (t, t.detach().clone()) for name, t in model.state_dict(keep_vars=True).items()}
    return modules, tensors


def _assert_unchanged(model: nn.Module, snapshot: tuple[dict, dict]) -> None:
    modules, tensors = snapshot
    now = dict(model.named_modules(remove_duplicate=False))
    assert now.keys() == modules.keys()
    assert all(now[name] is module for name, module in modules.items())
    state = model.state_dict(keep_vars=True)
    assert state.keys() == tensors.keys()
    for name, (t, values) in tensors.items():
        assert state[name] is t, name
        torch.testing.assert_close(t.detach(), values, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_convert_model_is_all_or_nothing(bad):
    """The third linear's weight holds a NaN: nothing is swapped, every module and tensor is the original."""
    torch.manual_seed(0)
    net = Net(d=128)
    with torch.no_grad():
        net.layers[0].mlp[0].weight[5, 7] = bad  # layers.0.attn.q, layers.0.attn.o, then this one
    snapshot = _snapshot(net)
    with pytest.raises(ValueError, match=r"cannot convert layer 'layers.0.mlp.0', so no layer was converted and the "
                                         r"model is unchanged: layers.0.mlp.0.weight_scale_inv holds"):
        convert_model(net, default_skip=False)
    _assert_unchanged(net, snapshot)
    assert not any(isinstance(m, Fp8BlockLinear) for m in net.modules())


def test_convert_model_refuses_a_root_linear_and_bad_arguments():
    lin = nn.Linear(256, 256)
    with pytest.raises(TypeError, match=r"model is itself an nn.Linear.*Fp8BlockLinear.from_linear\(layer\)"):
        convert_model(lin)
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        convert_model({"fc": lin})
    with pytest.raises(TypeError, match="skip patterns must be str, got int 3"):
        convert_model(nn.Sequential(lin), skip=["fc", 3])
    with pytest.raises(TypeError, match="skip must be a pattern or an iterable of patterns"):
        convert_model(nn.Sequential(lin), skip=3)


def _decoder() -> nn.Module:
    """Names as in a transformers decoder: model.layers.<i>.mlp.up_proj, ..., lm_head."""
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.ModuleDict({
        "self_attn": nn.ModuleDict({"q_proj": nn.Linear(128, 128)}),
        "mlp": nn.ModuleDict({"up_proj": nn.Linear(128, 256), "down_proj": nn.Linear(256, 128)}),
        "input_layernorm": nn.LayerNorm(128)}) for _ in range(2))
    model = nn.ModuleDict({"embed_tokens": nn.Embedding(10, 128), "layers": layers})
    return nn.ModuleDict({"model": model, "lm_head": nn.Linear(128, 10)})


@pytest.mark.parametrize("pattern,hint", [
    ("layer.0.*", "close names: 'layers', 'model.layers.0', 'model.layers.1'"),
    ("mlpp", "close names: 'mlp'"),
    ("feed_forward", "layers are named like 'lm_head', 'model.layers.0.self_attn.q_proj', "
                     "'model.layers.0.mlp.up_proj'"),
    ("input_layernorm", "it matches only other modules, which this conversion leaves as they are: "
                        "'model.layers.0.input_layernorm', 'model.layers.1.input_layernorm'"),
])
def test_skip_pattern_matching_no_layer_is_an_error(pattern, hint):
    model = _decoder()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError) as info:
        convert_model(model, skip=["lm_head", pattern])
    message = str(info.value)
    assert message.startswith(f"skip pattern {pattern!r} matches no linear layer of the model (plain nn.Linear); ")
    assert hint in message
    assert message.endswith("matched against a layer's full dotted name, the full name of any module containing it, "
                            "or any one component of the name, so 'mlp' and 'model.layers.0.*' both skip "
                            "'model.layers.0.mlp.up_proj'.")
    _assert_unchanged(model, snapshot)


def test_default_skip_patterns_may_match_nothing():
    """No embedding, norm, lm_head or gate here; DEFAULT_SKIP passed as skip is exempt too."""
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    assert convert_model(nn.Sequential(nn.Linear(128, 128))).converted == ["0"]
    assert convert_model(model, skip=blockfp8.nn.DEFAULT_SKIP).converted == ["0", "1"]


@pytest.mark.parametrize("pattern,skipped", [
    ("mlp", ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj",
             "model.layers.1.mlp.down_proj"]),
    ("model.layers.1", ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                        "model.layers.1.mlp.down_proj"]),
    ("*.layers.0.self_attn", ["model.layers.0.self_attn.q_proj"]),
    ("up_proj", ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]),
])
def test_skip_pattern_naming_a_parent_module_skips_its_layers(pattern, skipped):
    model = _decoder()
    report = convert_model(model, skip=[pattern])
    assert report.skipped == {"lm_head": "default skip 'lm_head'",
                              **{name: f"matches skip pattern {pattern!r}" for name in skipped}}
    assert all(type(model.get_submodule(name)) is nn.Linear for name in skipped)
    assert len(report.converted) == 6 - len(skipped)
    assert all(isinstance(model.get_submodule(name), Fp8BlockLinear) for name in report.converted)


def test_conversion_report_repr_is_short():
    names = [f"model.layers.{i}.mlp.{proj}" for i in range(80) for proj in ("gate_proj", "up_proj", "down_proj")]
    report = blockfp8.ConversionReport(converted=names, skipped={"lm_head": "default skip 'lm_head'"},
                                       shared={"model.tied": "lm_head"})
    text = repr(report)
    assert len(text) < 250, text
    assert text == ("ConversionReport(converted: 240 ['model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.up_proj', "
                    "...], skipped: 1 ['lm_head'], shared: 1; report.converted, .skipped and .shared list every name)")
    assert "skipped lm_head: default skip 'lm_head'" in str(report) and "model.tied is the same layer" in str(report)
    assert repr(blockfp8.ConversionReport()) == ("ConversionReport(converted: 0, skipped: 0, shared: 0; "
                                                 "report.converted, .skipped and .shared list every name)")
