"""blockfp8.hf.fuse_producers: a quantized transformers decoder on the fused producers (Fp8RMSNorm, Fp8GatedMLP)
computes what the quantized model computes, generates, and refuses what it cannot fuse or save. CPU, tiny Llama."""

import pytest
import torch

from blockfp8 import hf
from blockfp8.modules import Fp8GatedMLP, Fp8NormProjections, Fp8RMSNorm, ProjectionSlice
from blockfp8.nn import Fp8BlockLinear
from blockfp8.quant import QuantizedActivation, quantize_activation

transformers = pytest.importorskip("transformers")

# Whole 128-blocks on the MLP's rows: fp8 gate and up weights stack only on block boundaries.
CONFIG = {"hidden_size": 256, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def quantized_llama():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG), dtype=torch.bfloat16)
    with torch.no_grad():  # norm weights of their own (they start at one), so a norm in the wrong place shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    hf.quantize(model.eval())
    return model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("stack_qkv", [True, False])
def test_a_fused_decoder_computes_what_the_quantized_one_does(stack_qkv):
    plain, fused = quantized_llama(), quantized_llama()
    assert hf.fuse_producers(fused, stack_qkv=stack_qkv) == ["model.layers.0", "model.layers.1"]
    layer = fused.model.layers[0]
    norm_in = Fp8NormProjections if stack_qkv else Fp8RMSNorm
    assert isinstance(layer.input_layernorm, norm_in) and isinstance(layer.post_attention_layernorm, torch.nn.Identity)
    assert isinstance(layer.mlp, Fp8GatedMLP) and isinstance(layer.mlp.norm, Fp8RMSNorm)  # the MLP runs its norm
    projection = ProjectionSlice if stack_qkv else Fp8BlockLinear
    assert all(isinstance(getattr(layer.self_attn, p), projection) for p in ("q_proj", "k_proj", "v_proj"))
    with torch.no_grad():
        want, got = plain(IDS).logits, fused(IDS).logits
    # Equal on the CPU. The producers' norm rounds once where transformers' rounds twice: an ulp of bf16 now and
    # then, which an fp8 rounding can turn into one e4m3 step (1/16) on a few elements; a norm in the wrong place
    # gives about 0.4.
    assert rel_error(got, want) < 0.05
    if not stack_qkv:
        return  # generation is the same code either way; once is enough on the CPU interpreter
    with torch.no_grad():
        out = fused.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (2, 16)


def test_stacked_projections_are_the_projections_they_replace():
    """Each slice is its projection: the same fp8 rows and scales, and the same output from a float input (its
    own rows as a linear) as from the stacked GEMM's output (a view of its columns)."""
    plain, fused = quantized_llama(), quantized_llama()
    hf.fuse_producers(fused)
    attn, attn_plain = fused.model.layers[1].self_attn, plain.model.layers[1].self_attn
    norm = fused.model.layers[1].input_layernorm
    x = torch.randn(2, 5, CONFIG["hidden_size"], dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        projected = norm(x)
        assert projected.shape == x.shape
        for p in ("q_proj", "k_proj", "v_proj"):
            piece, want = getattr(attn, p), getattr(attn_plain, p)
            assert (piece.in_features, piece.out_features) == (want.in_features, want.out_features)
            assert torch.equal(piece.weight.view(torch.uint8), want.weight.view(torch.uint8))
            assert torch.equal(piece.weight_scale_inv, want.weight_scale_inv)
            assert torch.equal(piece(x), want(x))
            assert torch.equal(piece(projected), want(norm.norm(x)))
    # The stacked weight is held once in the model's state, by the norm module that runs it.
    names = [n for n in fused.state_dict() if n.startswith("model.layers.1.") and n.endswith(".weight")]
    assert "model.layers.1.input_layernorm.proj.weight" in names
    assert not any("q_proj" in n or "k_proj" in n or "v_proj" in n for n in names)


def test_stacking_qkv_needs_whole_weight_blocks():
    """k_proj's rows must end on a 128-row block for v's scales to line up; a model where they do not keeps its
    separate projections (and is still fused)."""
    model = quantized_llama()
    attn = model.model.layers[0].self_attn
    attn.k_proj = Fp8BlockLinear.from_linear(torch.nn.Linear(CONFIG["hidden_size"], 64, bias=False,
                                                             dtype=torch.bfloat16))
    attn.v_proj = Fp8BlockLinear.from_linear(torch.nn.Linear(CONFIG["hidden_size"], 64, bias=False,
                                                             dtype=torch.bfloat16))
    hf.fuse_producers(model)
    assert isinstance(model.model.layers[0].input_layernorm, Fp8RMSNorm)
    assert isinstance(model.model.layers[1].input_layernorm, Fp8NormProjections)
    assert isinstance(attn.k_proj, Fp8BlockLinear)


def test_nothing_to_fuse_is_an_error_naming_why():
    torch.manual_seed(0)
    float_model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG))
    with pytest.raises(ValueError, match="run hf.quantize first"):
        hf.fuse_producers(float_model)
    with pytest.raises(ValueError, match="no decoder layer"):
        hf.fuse_producers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_a_fused_model_is_not_saved(tmp_path):
    model = quantized_llama()
    hf.fuse_producers(model)
    with pytest.raises(ValueError, match="fused producers"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_quantized_activation_has_the_shape_of_its_values():
    q = QuantizedActivation(*quantize_activation(torch.randn(2, 3, 256, dtype=torch.bfloat16)), torch.bfloat16)
    assert q.shape == (2, 3, 256) and q.shape[:-1] == (2, 3)


def test_a_fused_decoder_compiles_in_one_graph():
    """What transformers' compiled generate() needs: the fused model traced whole (the norm's QuantizedActivation
    read for its shape by the attention, passed to the projections)."""
    model = quantized_llama()
    hf.fuse_producers(model)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(IDS)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
