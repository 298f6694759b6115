"""The command line's one error policy (``blockfp8.cli.main``): a user error prints one line naming the argument or
file and exits 2; a bug prints its traceback and exits 1; ``--debug`` prints the traceback of any error; Ctrl-C
exits 130 with one line after the command cleaned up."""

import errno
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import blockfp8.checkpoint.converting as converting
import blockfp8.cli.explain as cli_explain
from blockfp8.cli import main

NO_CUDA = not torch.cuda.is_available()
# The checkpoint reader's own checks of config.json and the index come with the checkpoint value checks; until
# they are in, these inputs end in an AttributeError (a traceback) or an unhelpful TypeError.
def run(capsys, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line(err: str, command: str | None) -> str:
    """The single stderr line of a user error (and that it is the only line and no traceback)."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"blockfp8 {command}: error: " if command else "blockfp8: error: "), err
    return lines[0]


@pytest.fixture
def float_dir(tmp_path):
    """A minimal float checkpoint: one 2-D bf16 linear weight and a config.json."""
    root = tmp_path / "model"
    root.mkdir()
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"layer.weight": w}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"model_type": "test"}))
    return root


def convert(capsys, in_dir, out_dir, *extra) -> tuple[int, str, str]:
    return run(capsys, "convert", in_dir, out_dir, "--no-progress", *extra)


def leftovers(parent) -> list[str]:
    """Hidden partial or old output folders a failed write left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------- convert inputs


def test_list_valued_config_is_one_line(float_dir, tmp_path, capsys):
    (float_dir / "config.json").write_text("[1, 2]")
    rc, _, err = convert(capsys, float_dir, tmp_path / "out")
    assert rc == 2 and "config.json" in one_line(err, "convert")
    assert not (tmp_path / "out").exists()


def test_string_quantization_config_is_one_line(float_dir, tmp_path, capsys):
    (float_dir / "config.json").write_text(json.dumps({"quantization_config": "fp8"}))
    rc, _, err = convert(capsys, float_dir, tmp_path / "out")
    line = one_line(err, "convert")
    assert rc == 2 and "config.json" in line and "quantization_config" in line


def test_int_in_weight_map_is_one_line(float_dir, tmp_path, capsys):
    index = {"metadata": {}, "weight_map": {"layer.weight": 5}}
    (float_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, _, err = convert(capsys, float_dir, tmp_path / "out")
    assert rc == 2 and "model.safetensors.index.json" in one_line(err, "convert")


def test_missing_input_folder_is_one_line(tmp_path, capsys):
    rc, _, err = convert(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert rc == 2 and f"IN_DIR {tmp_path / 'nowhere'} does not exist" in one_line(err, "convert")


# ---------------------------------------------------------------------------------------------- convert output


def test_out_dir_under_a_file_is_one_line(float_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc, _, err = convert(capsys, float_dir, blocker / "out")
    assert rc == 2 and str(blocker) in one_line(err, "convert")
    assert blocker.read_text() == "not a folder"


def test_full_disk_names_out_dir(float_dir, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):  # a write on a full disk: an errno, no file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(converting, "write_config", full)
    out = tmp_path / "out"
    rc, _, err = convert(capsys, float_dir, out)
    line = one_line(err, "convert")
    assert rc == 2 and str(out) in line and "No space left on device" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_read_only_folder_names_the_path(float_dir, tmp_path, monkeypatch, capsys):
    def read_only(path, *args, **kwargs):  # what creating the output folder meets on a read-only disk
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(converting, "atomic_output_dir", read_only)
    rc, _, err = convert(capsys, float_dir, tmp_path / "out")
    line = one_line(err, "convert")
    assert rc == 2 and str(tmp_path / "out") in line and "Read-only file system" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder_is_one_line(float_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        rc, _, err = convert(capsys, float_dir, locked / "out")
    finally:
        locked.chmod(0o755)
    assert rc == 2 and str(locked) in one_line(err, "convert")


def test_ctrl_c_during_convert_cleans_up_and_exits_130(float_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(converting, "quantize_weight", interrupted)
    before = sorted(p.name for p in float_dir.iterdir())
    out = tmp_path / "out"
    rc, _, err = convert(capsys, float_dir, out)
    assert rc == 130 and err.splitlines() == ["blockfp8 convert: interrupted"]
    assert not out.exists() and leftovers(tmp_path) == []
    assert sorted(p.name for p in float_dir.iterdir()) == before


# ------------------------------------------------------------------------------------------------ other commands


@pytest.mark.skipif(not NO_CUDA, reason="checks the message on a machine without CUDA")
def test_explain_on_cuda_without_cuda(capsys):
    rc, _, err = run(capsys, "explain", 1, 5, 5, "--device", "cuda")
    assert rc == 2 and "--device 'cuda': no CUDA device" in one_line(err, "explain")


@pytest.mark.parametrize("mnk,name", [((-1, 5, 5), "m"), ((0, 0, 0), "m"), ((4, 0, 5), "n"), ((4, 5, -3), "k")])
def test_explain_refuses_empty_or_negative_shapes(capsys, mnk, name):
    rc, _, err = run(capsys, "explain", *mnk)
    assert rc == 2 and f"argument {name}: expected an int >= 1" in one_line(err, "explain")


def test_check_from_missing_json(tmp_path, capsys):
    rc, _, err = run(capsys, "check", "--from-json", tmp_path / "missing.json")
    assert rc == 2 and str(tmp_path / "missing.json") in one_line(err, "check")


def test_check_from_json_that_is_not_a_result(tmp_path, capsys):
    (tmp_path / "other.json").write_text("[1, 2]")
    rc, _, err = run(capsys, "check", "--from-json", tmp_path / "other.json")
    assert rc == 2 and f"--from-json {tmp_path / 'other.json'} is not a saved" in one_line(err, "check")


def test_check_shape_no_backend_can_run(capsys):
    rc, _, err = run(capsys, "check", "--shapes", "0:128")
    assert rc == 2 and "'0:128' needs positive N and K" in one_line(err, "check")


def test_negative_bench_e2e_layers(capsys):
    rc, _, err = run(capsys, "bench-e2e", "--layers", "-2")
    assert rc == 2 and "argument --layers: expected an int >= 1, got -2" in one_line(err, "bench-e2e")


def test_unknown_command_and_bad_value(capsys):
    rc, _, err = run(capsys, "frobnicate")
    assert rc == 2 and "invalid choice: 'frobnicate'" in one_line(err, None)
    rc, _, err = run(capsys, "bench", "--reps", "0")
    assert rc == 2 and "argument --reps: expected an int >= 1, got 0" in one_line(err, "bench")


# ------------------------------------------------------------------------------------------------ bugs, --debug


def test_a_bug_shows_its_traceback(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(cli_explain, "explain", broken)
    rc, _, err = run(capsys, "explain", 1, 64, 128)
    assert rc == 1
    assert "Traceback (most recent call last)" in err and "RuntimeError: an invariant broke" in err
    assert err.splitlines()[-1].startswith("blockfp8 explain: internal error")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_of_a_user_error(capsys, where):
    argv = ["explain", 1, 5, 5, "--device", "gpu"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == ("blockfp8 explain: error: --device 'gpu' is not a device; expected e.g. "
                                    "'cpu', 'cuda' or 'cuda:1'")


# ----------------------------------------------------------------------------------- values that reach deep code

_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 100}


@pytest.mark.parametrize("bad", [{"hidden_size": "abc"}, {"num_attention_heads": 0}])
def test_tune_list_with_a_config_transformers_cannot_build_is_one_line(tmp_path, capsys, bad):
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps({**_LLAMA, **bad}))
    rc, _, err = run(capsys, "tune", "--list", "--model", tmp_path)
    assert rc == 2 and "config.json" in one_line(err, "tune")


def test_bench_save_table_that_is_not_a_table_fails_before_measuring(tmp_path, capsys, monkeypatch):
    target = tmp_path / "t.json"
    target.write_text("[1, 2]")
    import blockfp8.cli.bench as cli_bench

    monkeypatch.setattr(cli_bench, "methods_for", lambda *a: pytest.fail("measured before checking --save-table"))
    rc, _, err = run(capsys, "bench", "--save-table", target)
    assert rc == 2 and str(target) in one_line(err, "bench")
    assert target.read_text() == "[1, 2]"  # the user's file is left as it was


def test_bench_hf_vocab_of_one_is_one_line(capsys):
    rc, _, err = run(capsys, "bench-hf", "--vocab", 1)
    assert rc == 2 and "--vocab" in one_line(err, "bench-hf")


def test_explain_refuses_sizes_beyond_32_bit_offsets(capsys):
    rc, out, _ = run(capsys, "explain", 1, 5, 10**30)
    assert rc == 0
    assert "triton     refused: an operand of" in out and "beyond the 2147483647" in out


# ------------------------------------------------------------------- output files, options that would be ignored


@pytest.mark.parametrize("out_flag", ["--markdown", "--json"])
def test_check_never_writes_over_its_from_json(tmp_path, capsys, out_flag):
    saved = tmp_path / "saved.json"
    saved.write_text('{"a": 1}')
    rc, _, err = run(capsys, "check", "--from-json", saved, out_flag, saved)
    line = one_line(err, "check")
    assert rc == 2 and f"{out_flag} {saved} names the same file as --from-json" in line
    assert saved.read_text() == '{"a": 1}'


def test_bench_save_over_its_own_save_table_is_refused_first(tmp_path, capsys, monkeypatch):
    table = tmp_path / "t.json"
    table.write_text('{"keep": 1}')
    import blockfp8.cli.bench as cli_bench

    monkeypatch.setattr(cli_bench, "methods_for", lambda *a: pytest.fail("measured before checking the outputs"))
    for flag in ("--save", "--markdown"):
        rc, _, err = run(capsys, "bench", "--save-table", table, flag, table)
        assert rc == 2 and f"{flag} {table} names the same file as --save-table" in one_line(err, "bench")
    assert table.read_text() == '{"keep": 1}'


def test_output_in_a_missing_folder_or_on_a_folder_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    import blockfp8.cli.check as cli_check

    monkeypatch.setattr(cli_check, "_run_matrix", lambda *a: pytest.fail("ran before checking --json"))
    rc, _, err = run(capsys, "check", "--json", tmp_path / "nowhere" / "x.json")
    assert rc == 2 and f"folder {tmp_path / 'nowhere'} does not exist" in one_line(err, "check")
    rc, _, err = run(capsys, "check", "--markdown", tmp_path)
    assert rc == 2 and f"--markdown {tmp_path} is a folder" in one_line(err, "check")


@pytest.mark.parametrize("argv,named", [
    (["check", "--from-json", "x.json", "--m", "1", "--probe"], "--m, --probe do not apply to --from-json"),
    (["bench", "--host", "--mode", "foo"], "--mode does not apply to --host"),
    (["bench", "--host", "--backends", "cublas", "--plot", "p.png"], "--backends, --plot do not apply to --host"),
    (["tune", "--list", "--verify"], "--verify does not apply to --list"),
])
def test_options_a_mode_would_ignore_are_refused(capsys, argv, named):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and named in one_line(err, argv[0])


@pytest.mark.parametrize("argv,named", [
    (["check", "--m", "0"], "--m values must be >= 1"),
    (["check", "--m", "0,1"], "--m values must be >= 1"),
    (["check", "--m", ""], "--m list '' must hold"),
    (["check", "--shapes", ""], "--shapes '' names no shape"),
    (["check", "--backends", ","], "--backends names no backend"),
    (["tune", "--list", "--max-configs", "-5"], "argument --max-configs: expected an int >= 0, got -5"),
    (["tune", "--list", "--warm-procs", "-3"], "argument --warm-procs: expected an int >= 0, got -3"),
    (["tune", "--list", "--tp", "0"], "argument --tp: expected an int >= 1, got 0"),
    (["bench-hf", "--device", "foo"], "--device 'foo' is not a device"),
])
def test_bad_values_are_one_line(capsys, argv, named):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and named in one_line(err, argv[0])


@pytest.mark.skipif(not NO_CUDA, reason="CPU only: on a GPU every mode runs")
@pytest.mark.parametrize("command", ["bench-e2e", "bench-hf"])
def test_gpu_only_modes_named_on_the_cpu_are_refused(capsys, command):
    rc, _, err = run(capsys, command, "--modes", "eager,compiled")
    assert rc == 2 and "--modes compiled needs a CUDA device" in one_line(err, command)


@pytest.mark.skipif(not NO_CUDA, reason="CPU only: cuBLAS runs on a GPU")
def test_explain_forced_onto_a_backend_that_cannot_run_prints_the_verdicts_and_exits_2(capsys):
    rc, out, err = run(capsys, "explain", 1, 128, 128, "--backend", "cublas")
    assert "cublas     refused: no CUDA device" in out  # the verdicts still print
    assert rc == 2 and "backend 'cublas' was requested but cannot run" in one_line(err, "explain")
