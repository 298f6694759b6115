"""``blockfp8 tune`` and ``blockfp8 explain`` on the command line, on CPU: listing shapes from a model folder,
argument errors, the clean refusal to time without a GPU, and what explain says decided."""

import pytest
import torch
from safetensors.torch import save_file

from blockfp8 import quantize_weight
from blockfp8.cli import main
from blockfp8.cli.tune import NEEDS_CUDA


def _tiny_checkpoint(folder):
    folder.mkdir()
    tensors = {}
    for name, (n, k) in {"self_attn.q_proj": (256, 256), "self_attn.o_proj": (256, 256),
                         "mlp.gate_up_proj": (1024, 256), "mlp.down_proj": (256, 512)}.items():
        tensors[f"model.layers.0.{name}.weight"], tensors[f"model.layers.0.{name}.weight_scale_inv"] = \
            quantize_weight(torch.randn(n, k))
    save_file(tensors, str(folder / "model.safetensors"))


def test_list_model_shapes_with_tp(tmp_path, capsys):
    _tiny_checkpoint(tmp_path / "ckpt")
    assert main(["tune", "--list", "--model", str(tmp_path / "ckpt"), "--m", "1,64"]) == 0
    out = capsys.readouterr().out
    assert "self_attn.o_proj+self_attn.q_proj x2: N=256 K=256" in out and "3 shapes x 2 M values" in out
    assert main(["tune", "--list", "--model", str(tmp_path / "ckpt"), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    for line in ("self_attn.q_proj: N=128 K=256", "self_attn.o_proj: N=256 K=128", "mlp.gate_up_proj: N=512 K=256",
                 "mlp.down_proj: N=256 K=256"):
        assert line in out
    # --shapes and --model together: both, each shape once.
    assert main(["tune", "--list", "--model", str(tmp_path / "ckpt"), "--shapes", "256:256,64:128"]) == 0
    assert "4 shapes x 7 M values" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--tp", "0"], "--tp must be >= 1"), (["--model", "/nonexistent"], "not a folder"),
    (["--shapes", "nope"], "unknown shape set"), (["--reps", "0"], "--reps must be >= 1"),
    (["--backends", "cutlass"], "--backends"),
])
def test_argument_errors(capsys, args, message):
    assert main(["tune", "--list", *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tune_needs_cuda(capsys):
    assert main(["tune", "--shapes", "64:256", "--m", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert NEEDS_CUDA.split(":")[0] in err
    assert main(["tune", "--verify", "--shapes", "64:256"]) == 2


def test_explain_says_what_decided(capsys):
    assert main(["explain", "1", "130", "1000", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "-> reference" in out and "decided by: static rule 'cpu'" in out
