"""Shapes from where users have them: a checkpoint's safetensors headers (block-FP8 or bf16), a transformers
config built on the meta device, and their tensor-parallel local shapes."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from blockfp8 import Fp8BlockLinear, quantize_weight
from blockfp8.distributed import local_shape, shard
from blockfp8.testing.shapes import (
    LinearLayer,
    checkpoint_linears,
    layer_shapes,
    load_shapes,
    model_shapes,
    parallel_style,
    shape_set,
    stacked_linears,
)

# A two-layer Llama-like model: hidden 256, 4 heads of 64 (2 KV heads), intermediate 512, vocabulary 1000.
LAYOUT = {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (128, 256), "self_attn.v_proj": (128, 256),
          "self_attn.o_proj": (256, 256), "mlp.gate_proj": (512, 256), "mlp.up_proj": (512, 256),
          "mlp.down_proj": (256, 512)}
TP1 = {(256, 256): "self_attn.o_proj+self_attn.q_proj x4", (128, 256): "self_attn.k_proj+self_attn.v_proj x4",
       (512, 256): "mlp.gate_proj+mlp.up_proj x4", (256, 512): "mlp.down_proj x2"}


def _write_checkpoint(folder, fp8: bool) -> None:
    tensors = {"model.embed_tokens.weight": torch.zeros(1000, 256, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(256, dtype=torch.bfloat16),
               "lm_head.weight": torch.zeros(1000, 256, dtype=torch.bfloat16)}
    for layer in range(2):
        for name, (n, k) in LAYOUT.items():
            prefix = f"model.layers.{layer}.{name}"
            w = torch.randn(n, k)
            if fp8:
                tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale_inv"] = quantize_weight(w)
            else:
                tensors[f"{prefix}.weight"] = w.to(torch.bfloat16)
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.mark.parametrize("fp8", [True, False])
def test_checkpoint_shapes(tmp_path, fp8):
    _write_checkpoint(tmp_path / "ckpt", fp8)
    layers = checkpoint_linears(tmp_path / "ckpt")
    assert len(layers) == 14 and LinearLayer("model.layers.1.mlp.down_proj", 256, 512) in layers
    assert {(s.n, s.k): s.name for s in model_shapes(tmp_path / "ckpt")} == TP1  # embeddings and lm_head left out


def test_transformers_config_on_the_meta_device(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=1000)
    config.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    assert {(s.n, s.k): s.name for s in model_shapes(tmp_path)} == TP1


def test_tensor_parallel_shapes(tmp_path):
    _write_checkpoint(tmp_path / "ckpt", True)
    shapes = {(s.n, s.k) for s in model_shapes(tmp_path / "ckpt", tp=2)}
    # q: N 256 -> 128 per rank; k, v: N 128 -> 64 rows, rank 1's start inside a 128-block adds 64 leading zero rows
    # (its local weight is 128 rows); gate, up: N 512 -> 256; o: K 256 -> 128; down: K 512 -> 256.
    assert shapes == {(128, 256), (64, 256), (256, 256), (256, 128)}


def test_tp_rule_by_name():
    assert [parallel_style(n) for n in ("model.layers.0.self_attn.qkv_proj", "mlp.gate_up_proj", "x.q_b_proj",
                                        "self_attn.o_proj", "mlp.down_proj", "mlp.gate", "fused_qkv_a_proj")] == \
        ["column", "column", "column", "row", "row", None, None]
    # gate_up's halves are split on their own: rank 0 holds half of gate and half of up. Where the halves'
    # split points fall inside 128-blocks, that gives other local shapes than one split of the whole.
    assert layer_shapes(LinearLayer("mlp.gate_up_proj", 36864, 7168), 8) == [(4608, 7168)]
    assert layer_shapes(LinearLayer("mlp.gate_up_proj", 400, 256), 2) == [(304, 256), (400, 256)]
    assert layer_shapes(LinearLayer("mlp.fused_proj", 400, 256), 2) == [(400, 256)]  # unknown name: replicated
    assert layer_shapes(LinearLayer("mlp.gate", 256, 7168), 8) == [(256, 7168)]  # replicated


@pytest.mark.parametrize("n,k,tp,style,parts", [(400, 256, 2, "column", (200, 200)), (2112, 256, 8, "column", None),
                                                 (256, 1000, 3, "row", None), (130, 520, 2, "row", None)])
def test_local_shape_is_what_shard_builds(n, k, tp, style, parts):
    layer = Fp8BlockLinear.from_linear(nn.Linear(k, n, bias=False))
    for rank in range(tp):
        built = shard(layer, rank, tp, style, parts=parts)
        assert local_shape(n, k, rank, tp, style, parts) == tuple(built.weight.shape)


def test_deepseek_tp8_set_is_the_tp_rule_applied():
    """The shipped deepseek-v3-tp8 set equals the TP rule applied to the deepseek-v3 set."""
    full = {s.name: s for s in shape_set("deepseek-v3")}
    for s in shape_set("deepseek-v3-tp8"):
        assert layer_shapes(LinearLayer(s.name, full[s.name].n, full[s.name].k), 8) == [(s.n, s.k)]


def test_bad_model_folders(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        model_shapes(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither"):
        model_shapes(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ValueError):
        model_shapes(tmp_path)
    with pytest.raises(ValueError, match="--tp"):
        model_shapes(tmp_path, tp=0)


def test_new_shape_sets_load():
    for name, count in (("qwen3-32b", 4), ("llama-3.1-8b", 4), ("glm-4.5-air", 6)):
        shapes = load_shapes(name)
        assert len(shapes) == count and all(s.n % 16 == 0 and s.k % 16 == 0 for s in shapes)
    assert load_shapes("qwen3-32b")[0].n == 10240  # q 64 x 128 + k, v 8 x 128


def _llama_config(folder, kv_heads: int = 2, intermediate: int = 384) -> None:
    """A config-only Llama folder (no weights): hidden 256, 4 heads of 64, two layers; the fields config_linears
    needs to build the model on the meta device."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "head_dim": 64,
        "num_attention_heads": 4, "num_key_value_heads": kv_heads, "intermediate_size": intermediate,
        "num_hidden_layers": 2, "vocab_size": 1000}))


def test_stacked_shapes_of_a_fused_model(tmp_path):
    pytest.importorskip("transformers")
    _llama_config(tmp_path / "cfg")
    separate = {(256, 256): "self_attn.o_proj+self_attn.q_proj x4", (128, 256): "self_attn.k_proj+self_attn.v_proj x4",
                (384, 256): "mlp.gate_proj+mlp.up_proj x4", (256, 384): "mlp.down_proj x2"}
    assert {(s.n, s.k): s.name for s in model_shapes(tmp_path / "cfg")} == separate
    # q 256 + k 128 + v 128 rows over K 256; gate 384 + up 384 rows over K 256: what fuse_producers stacks.
    assert {(s.n, s.k): s.name for s in model_shapes(tmp_path / "cfg", stacked=True)} == \
        {**separate, (512, 256): "self_attn.qkv_proj x2", (768, 256): "mlp.gate_up_proj x2"}


@pytest.mark.parametrize("kv_heads,intermediate,want", [
    (1, 512, {(1024, 256)}),  # k_proj N 64 ends inside a 128-row block: q/k/v stay separate, gate/up stack
    (2, 320, {(512, 256)}),  # gate_proj N 320 ends inside one: gate/up stay separate, q/k/v stack
])
def test_stacked_shapes_need_whole_blocks(tmp_path, kv_heads, intermediate, want):
    pytest.importorskip("transformers")
    _llama_config(tmp_path / "cfg", kv_heads, intermediate)
    plain = {(s.n, s.k) for s in model_shapes(tmp_path / "cfg")}
    assert {(s.n, s.k) for s in model_shapes(tmp_path / "cfg", stacked=True)} - plain == want


def test_stacked_linears_by_prefix():
    layers = [LinearLayer("a.q_proj", 256, 64), LinearLayer("a.k_proj", 128, 64), LinearLayer("a.v_proj", 128, 64),
              LinearLayer("b.q_proj", 256, 64), LinearLayer("b.k_proj", 128, 64), LinearLayer("b.v_proj", 128, 32),
              LinearLayer("c.gate_proj", 256, 64), LinearLayer("c.up_proj", 128, 64), LinearLayer("up_proj", 128, 8),
              LinearLayer("gate_proj", 128, 8), LinearLayer("d.q_proj", 192, 64), LinearLayer("d.k_proj", 128, 64),
              LinearLayer("d.v_proj", 128, 64)]
    # b's v_proj has another K, c's up_proj another N and d's q_proj ends inside a 128-row block: none of them
    # stacks; a top-level gate/up pair does.
    assert stacked_linears(layers) == [LinearLayer("a.qkv_proj", 512, 64), LinearLayer("gate_up_proj", 256, 8)]


def test_stacked_shapes_need_one_rank(tmp_path):
    with pytest.raises(ValueError, match="--tp 1"):
        model_shapes(tmp_path, tp=2, stacked=True)
