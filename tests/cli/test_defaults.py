"""What a new user meets first: --version, the help texts, and on a machine without CUDA commands whose defaults
are CPU-sized, say what they will do (and how to run the full version) before working, and show progress as
plain lines when stderr is not a terminal."""

import argparse
import re

import pytest
import torch

import blockfp8
import blockfp8.cli.bench_e2e as cli_bench_e2e
import blockfp8.cli.check as cli_check
import blockfp8.cli.demo as cli_demo
import blockfp8.cli.fidelity as cli_fidelity
from blockfp8.cli import COMMANDS, main
from blockfp8.cli.tp_demo import _sizes
from blockfp8.testing.conformance import CheckResult

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the defaults of a machine without CUDA")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"blockfp8 {blockfp8.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", blockfp8.__version__)


def test_top_level_help(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "blockfp8 makes block-scaled FP8 linear layers (float8_e4m3fn weights with one fp32 scale per 128x128 " \
           "block, activations quantized per 1x128 group) fast and correct in PyTorch;" in text
    for name, help_text in COMMANDS.items():
        assert f"{name} {help_text.split()[0]}" in text, name
    assert "start with 'blockfp8 check'" in text and "then 'blockfp8 tune'" in text


def test_no_command_prints_the_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_reliability_help_says_where_it_writes(capsys):
    assert main(["reliability", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "print which bad inputs raise what" in text
    assert "write the markdown to this file instead of stdout" in text


def test_reliability_check_needs_out(capsys):
    assert main(["reliability", "--check"]) == 2
    assert "--check compares a file with the generated text: name it with --out FILE" in capsys.readouterr().err


@CPU_ONLY
def test_bench_defaults_on_cpu(capsys):
    assert main(["bench"]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0] == ("bench: 2 shapes x 2 M values x 3 methods x 2 modes on cpu (CPU-sized smoke test); the full "
                      "version: blockfp8 bench --full (DeepSeek-V3 shapes x the M sweep, meant for a GPU)")
    cells = [line for line in err if re.match(r"bench \d/4 ", line)]
    assert [c.split(" done")[0] for c in cells] == ["bench 1/4 200x300 M=1", "bench 2/4 200x300 M=16",
                                                    "bench 3/4 130x1000 M=1", "bench 4/4 130x1000 M=16"]
    assert "about" in cells[0] and "s left" in cells[0]
    assert "130x1000" in captured.out and "CPU times: one thread" in captured.out


@CPU_ONLY
def test_check_defaults_on_cpu(monkeypatch, capsys):
    seen = []

    def fake_matrix(shapes, ms, names, probe, progress):  # the matrix itself is tests/testing/test_conformance.py's
        seen.append(((shapes[0].n, shapes[0].k), ms))
        return CheckResult("cpu", 5e-3, [])

    monkeypatch.setattr(cli_check, "check_matrix", fake_matrix)
    assert main(["check"]) == 0
    assert seen == [((64, 128), [1, 7, 77]), ((8, 256), [1, 7, 77]), ((130, 1000), [1, 7, 77]),
                    ((200, 300), [1, 7, 77])]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("check: 4 shapes x 3 M values, every available backend (CPU-sized")
    assert err[0].endswith("the full version: blockfp8 check --full (GPU-sized shapes, meant for a GPU)")
    assert [line.split(" done")[0] for line in err[1:]] == [
        "check 1/4 N=64 K=128", "check 2/4 N=8 K=256", "check 3/4 N=130 K=1000", "check 4/4 N=200 K=300"]


@CPU_ONLY
@pytest.mark.parametrize("argv,preset,batches,steps,warmup", [
    ([], "tiny", [1], 3, 1),
    (["--steps", "7", "--batch", "2,3"], "tiny", [2, 3], 7, 1),
])
def test_bench_e2e_defaults_on_cpu(monkeypatch, capsys, argv, preset, batches, steps, warmup):
    seen = {}

    def fake_run(bf16_model, fp8_model, variants, settings, log=print, fused_model=None):
        seen.update(preset=bf16_model.cfg.name, settings=settings)
        return [], {}

    monkeypatch.setattr(cli_bench_e2e, "run_benchmark", fake_run)
    assert main(["bench-e2e", *argv]) == 0
    s = seen["settings"]
    assert (seen["preset"], s.batches, s.steps, s.warmup, s.modes) == (preset, batches, steps, warmup, ["eager"])
    first = capsys.readouterr().err.splitlines()[0]
    assert ("the full version: blockfp8 bench-e2e --full" in first) == (argv == [])


def test_tp_demo_sizes():
    args = argparse.Namespace(small=False, full=False, steps=None, gemm_reps=None)
    assert _sizes(args, torch.device("cpu")) == (True, {"steps": 5, "gemm_reps": 5})
    assert _sizes(args, torch.device("cuda")) == (False, {"steps": 20, "gemm_reps": 20})
    full = argparse.Namespace(small=False, full=True, steps=3, gemm_reps=None)
    assert _sizes(full, torch.device("cpu")) == (False, {"steps": 3, "gemm_reps": 20})
    with pytest.raises(ValueError, match="--small and --full"):
        _sizes(argparse.Namespace(small=True, full=True, steps=None, gemm_reps=None), torch.device("cpu"))


@CPU_ONLY
@pytest.mark.parametrize("argv,sentences", [([], 100), (["--full"], 300), (["--sentences", "12"], 12)])
def test_fidelity_defaults_on_cpu(monkeypatch, capsys, argv, sentences):
    seen = []

    def fake(n, **kwargs):
        seen.append(n)
        raise KeyboardInterrupt  # stop here: the sentence count is what is checked

    monkeypatch.setattr(cli_fidelity, "measure_fidelity", fake)
    assert main(["fidelity", *argv]) == 130
    assert seen == [sentences]
    assert f"embed {sentences} generated sentences on cpu" in capsys.readouterr().err


def test_demo_times_with_one_cpu_thread(monkeypatch):
    """With the default pool, small CPU matmuls stalled for whole scheduler ticks on a 2-core machine
    (docs/e2e.md): the demo measures on one thread, and gives the pool back afterwards."""
    seen = []

    def fake_demo(device, preset, layers, batch):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt  # stop here: the thread count is what is checked

    monkeypatch.setattr(cli_demo, "demo", fake_demo)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["demo", "--device", "cpu"]) == 130
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
