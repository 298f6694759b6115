"""``blockfp8 convert`` end to end: the command on a plain checkpoint, then a tiny Hugging Face Llama built from a
config (nothing downloaded) checked against transformers' own FP8 format and loader."""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from blockfp8 import Fp8BlockLinear, convert_model
from blockfp8.checkpoint import (
    DEFAULT_SKIP,
    INDEX_NAME,
    SINGLE_NAME,
    iter_checkpoint,
    load_fp8_model,
    read_tensor_infos,
    save_fp8_checkpoint,
)
from blockfp8.cli import main

# Hidden 192 and intermediate 320 give partial 128-blocks on both axes; kv heads make k/v_proj 96 rows.
TINY = {"hidden_size": 192, "intermediate_size": 320, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["convert", *map(str, args), "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def plain_dir(tmp_path):
    """A float checkpoint with two decoder layers' worth of linears, norms and an embedding (no transformers)."""
    g = torch.Generator().manual_seed(0)
    state = {"embed_tokens.weight": torch.randn(64, 192, generator=g)}
    for i in range(2):
        state[f"layers.{i}.norm.weight"] = torch.ones(192)
        state[f"layers.{i}.mlp.up_proj.weight"] = torch.randn(320, 192, generator=g)
        state[f"layers.{i}.mlp.down_proj.weight"] = torch.randn(192, 320, generator=g)
    state["lm_head.weight"] = torch.randn(64, 192, generator=g)
    root = tmp_path / "float"
    root.mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, root / SINGLE_NAME)
    (root / "config.json").write_text(json.dumps({"model_type": "plain"}))
    return root


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def llama(transformers, config_kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**config_kwargs)
    # from_config keeps the rotary buffers in fp32, as from_pretrained does (``.to(bf16)`` would round them).
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="module")
def converted(transformers, tmp_path_factory):
    """(the bf16 checkpoint folder, the folder ``blockfp8 convert`` wrote from it)."""
    root = tmp_path_factory.mktemp("llama")
    llama(transformers, TINY).save_pretrained(root / "bf16")
    assert main(["convert", str(root / "bf16"), str(root / "fp8"), "--no-progress"]) == 0
    return root / "bf16", root / "fp8"


def test_cli_prints_summary_and_refuses_overwrite(plain_dir, tmp_path, capsys):
    out_dir = tmp_path / "fp8"
    rc, out, _ = run_cli(capsys, plain_dir, out_dir)
    assert rc == 0
    assert re.search(r"layers converted to fp8\s+│ 4 ", out)
    assert "worst relative error" in out and "default skip 'lm_head'" in out
    stamp = (out_dir / SINGLE_NAME).stat().st_mtime_ns
    rc, _, err = run_cli(capsys, plain_dir, out_dir)
    assert rc == 2 and "already exists; pass --overwrite" in err
    assert (out_dir / SINGLE_NAME).stat().st_mtime_ns == stamp
    rc, out, _ = run_cli(capsys, plain_dir, out_dir, "--overwrite", "--max-shard-size", "100kB",
                         "--skip", "layers.1.*", "--skip", "up_proj")
    assert rc == 0 and (out_dir / INDEX_NAME).is_file() and not (out_dir / SINGLE_NAME).exists()
    assert re.search(r"layers converted to fp8\s+│ 1 ", out) and "--skip 'layers.1.*'" in out
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert sorted(qc["modules_to_not_convert"]) == ["embed_tokens", "layers.0.mlp.up_proj", "layers.1.mlp.down_proj",
                                                    "layers.1.mlp.up_proj", "lm_head"]
    assert read_tensor_infos(out_dir)["layers.0.mlp.down_proj.weight"].dtype == "F8_E4M3"


def test_cli_reports_bad_input(tmp_path, capsys):
    rc, _, err = run_cli(capsys, tmp_path, tmp_path / "out")
    assert rc == 2 and "no model.safetensors.index.json" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_skip_pattern_matching_no_layer_is_a_one_line_error(plain_dir, tmp_path, capsys):
    rc, out, err = run_cli(capsys, plain_dir, tmp_path / "out", "--skip", "layer.0.*")
    assert rc == 2 and not out and err.count("\n") == 1 and "Traceback" not in err
    assert "skip pattern 'layer.0.*' matches no 2-D float weight of " in err
    assert "close names: 'layers.0', 'layers.1', 'layers'" in err
    assert "the full name of any module containing it, or any one component of the name" in err
    assert not (tmp_path / "out").exists()


def test_cli_skip_pattern_naming_a_parent_module_skips_its_layers(plain_dir, tmp_path, capsys):
    rc, out, _ = run_cli(capsys, plain_dir, tmp_path / "out", "--skip", "mlp")
    assert rc == 0 and re.search(r"layers converted to fp8\s+│ 0 ", out) and "--skip 'mlp'" in out
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert sorted(qc["modules_to_not_convert"]) == ["embed_tokens", "layers.0.mlp.down_proj", "layers.0.mlp.up_proj",
                                                    "layers.1.mlp.down_proj", "layers.1.mlp.up_proj", "lm_head"]


def test_format_matches_transformers_fp8_loader(transformers, converted):
    """Key names, dtypes and shapes are exactly those of transformers' FP8Linear model for this config."""
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    bf16_dir, fp8_dir = converted
    config = transformers.AutoConfig.from_pretrained(fp8_dir)
    qc = transformers.FineGrainedFP8Config.from_dict(config.quantization_config)
    assert (qc.quant_method, qc.activation_scheme, list(qc.weight_block_size)) == ("fp8", "dynamic", [128, 128])
    assert sorted(qc.modules_to_not_convert) == ["lm_head", "model.embed_tokens"]
    with torch.device("meta"):
        expected = transformers.LlamaForCausalLM(config)
    expected = replace_with_fp8_linear(expected, modules_to_not_convert=qc.modules_to_not_convert,
                                       quantization_config=qc, pre_quantized=True)
    want = expected.state_dict()
    infos = read_tensor_infos(fp8_dir)
    assert set(infos) == set(want)
    for name, info in infos.items():
        if want[name].dtype == torch.float8_e4m3fn or name.endswith("weight_scale_inv"):
            assert info.torch_dtype == want[name].dtype, name
        else:  # unquantized tensors keep the checkpoint's dtype
            assert info.dtype == "BF16", name
        assert info.shape == tuple(want[name].shape), name
    assert infos["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)  # ceil(320/128), ceil(192/128)
    assert infos["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape == (1, 2)
    original = json.loads((bf16_dir / "config.json").read_text())
    written = json.loads((fp8_dir / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "quantization_config"} == original
    assert (fp8_dir / "generation_config.json").is_file()


def test_load_fp8_model_matches_in_memory_conversion(transformers, converted):
    bf16_dir, fp8_dir = converted
    model = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16).eval()
    config = transformers.AutoConfig.from_pretrained(fp8_dir)
    fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    report = load_fp8_model(fresh.eval(), fp8_dir, progress=False)
    assert len(report.replaced) == 14 and not report.missing and not report.unexpected
    assert isinstance(fresh.model.layers[1].mlp.down_proj, Fp8BlockLinear)
    ref = copy.deepcopy(model)
    convert_model(ref, skip=DEFAULT_SKIP)
    with torch.no_grad():
        got, want, bf16 = fresh(IDS).logits, ref(IDS).logits, model(IDS).logits
    assert torch.equal(got, want)
    cos = torch.nn.functional.cosine_similarity(got.float().flatten(), bf16.float().flatten(), dim=0)
    assert cos > 0.99


def test_save_converted_transformers_model(transformers, converted, tmp_path):
    """Converting in memory and saving writes the same tensors as converting the checkpoint on disk."""
    bf16_dir, fp8_dir = converted
    ref = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16)
    convert_model(ref, skip=DEFAULT_SKIP)
    save_fp8_checkpoint(ref, tmp_path / "saved")
    saved = dict(iter_checkpoint(tmp_path / "saved", progress=False))
    on_disk = dict(iter_checkpoint(fp8_dir, progress=False))
    assert saved.keys() == on_disk.keys()
    for name, t in saved.items():
        assert t.dtype == on_disk[name].dtype and torch.equal(t.view(torch.uint8), on_disk[name].view(torch.uint8))
    config = transformers.AutoConfig.from_pretrained(tmp_path / "saved")
    assert config.architectures == ["LlamaForCausalLM"] and config.hidden_size == 192
    assert config.quantization_config["modules_to_not_convert"] == ["lm_head"]  # the only nn.Linear left


def test_transformers_loads_checkpoint_on_cpu(transformers, tmp_path):
    """transformers' own loader gets exactly our weights: dequantized to bf16 on CPU, kept FP8 on a GPU.

    Dimensions are multiples of 128 here: transformers 5.24 derives the block size on CPU as
    shape // scale grid, which is wrong for partial blocks (docs/checkpoints.md).
    """
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load quantized checkpoints")
    from blockfp8 import dequantize_weight

    kwargs = {**TINY, "hidden_size": 256, "intermediate_size": 384}
    llama(transformers, kwargs).save_pretrained(tmp_path / "bf16")
    assert main(["convert", str(tmp_path / "bf16"), str(tmp_path / "fp8"), "--no-progress"]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")
    state = dict(iter_checkpoint(tmp_path / "fp8", progress=False))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        got = loaded.get_submodule(name).weight.detach().cpu()
        if got.dtype == torch.float8_e4m3fn:
            # With a GPU, transformers keeps the layer in FP8: the bytes and scales must be ours.
            scale = loaded.get_submodule(name).weight_scale_inv.detach().cpu()
            assert torch.equal(got.view(torch.uint8), state[f"{name}.weight"].view(torch.uint8)), name
            assert torch.equal(scale, state[f"{name}.weight_scale_inv"]), name
            continue
        want = dequantize_weight(state[f"{name}.weight"], state[f"{name}.weight_scale_inv"], dtype=torch.bfloat16)
        assert torch.equal(got.to(torch.bfloat16), want), name
