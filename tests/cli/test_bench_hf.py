"""``blockfp8 bench-hf`` on the CPU: a tiny Llama through generate(), bf16 vs transformers' FP8 vs blockfp8."""

import argparse
import json

import pytest
import torch

from blockfp8 import Fp8BlockLinear
from blockfp8.cli import main
from blockfp8.testing import Status

transformers = pytest.importorskip("transformers")
bench_hf = pytest.importorskip("blockfp8.cli.bench_hf")


def test_bench_hf_tiny_on_cpu(capsys, tmp_path):
    out_json, out_md = tmp_path / "hf.json", tmp_path / "hf.md"
    argv = ["bench-hf", "--device", "cpu", "--batch", "1,2", "--new-tokens", "2", "--repeats", "1",
            "--json", str(out_json), "--markdown", str(out_md)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "generate() tokens/s" in captured.out
    result = json.loads(out_json.read_text())
    rows = result["rows"]
    # Compilation needs an accelerator: by default the CPU runs eager only (naming compiled there is a user error,
    # tests/cli/test_errors.py). One stderr line per finished row.
    assert [(r["variant"], r["mode"], r["batch"]) for r in rows] == [
        (v, "eager", b) for b in (1, 2) for v in ("bf16", "transformers-fp8", "blockfp8")]
    assert sum(line.startswith("bench-hf: variant ") for line in captured.err.splitlines()) == len(rows)
    for r in rows:
        if r["variant"] == "bf16":
            assert r["status"] == Status.OK and r["tokens_per_s"] > 0 and r["speedup"] == 1.0
        elif r["variant"] == "blockfp8":
            assert r["status"] == Status.OK and r["tokens_per_s"] > 0 and r["speedup"] > 0
            assert 0.99 <= r["logits_cos_min"] <= r["logits_cos_mean"] < 1.0
            # Against the format reference (the same model on the float32 reference backend) the Triton
            # kernel's logits are much closer than the format is to bf16.
            assert r["format_cos_min"] > r["logits_cos_min"] and r["format_cos_min"] >= 0.999
            # Each layer against the float32 reference on its own input: bf16 rounding, within the bound.
            assert 1e-4 < r["layer_error"] <= 5e-3
        else:  # transformers' FP8 layers need a GPU and a Hub kernel: the row says why in one line, the command goes on
            assert r["status"] in (Status.UNAVAILABLE, Status.CRASHED) and r["note"] and r["tokens_per_s"] is None
            assert "\n" not in r["note"] and len(r["note"]) < 200
            if r["note"].startswith("needs the Hub kernel"):
                assert r["status"] == Status.UNAVAILABLE
    assert result["config"]["hidden_size"] == 256 and result["settings"]["new_tokens"] == 2
    # What the format itself costs on this model, per batch, is reported; it is not a verdict.
    assert set(result["format_bound"]) == {"1", "2"}
    assert all(0.99 <= lo <= mean < 1.0 for lo, mean in result["format_bound"].values())
    assert "the format reference itself against bf16" in captured.out
    first = captured.err.splitlines()[0]
    assert first.startswith("bench-hf: generate() of a tiny x2 model") and "the full version: on a GPU" in first
    md = out_md.read_text()
    assert "| variant | mode | batch | status | tokens/s |" in md and "cos vs format ref min" in md
    assert "--preset tiny --layers 2 --vocab 512 --batch 1,2 --prompt-len 8 --new-tokens 2" in md


def test_the_fused_variant_runs_and_is_checked_layer_by_layer(tmp_path):
    """The fused model (hf.fuse_producers: stacked q/k/v behind the norm, projections as slices of its output)
    generates, and its fp8 GEMMs, the stacked ones included, are each held to the bound."""
    out_json = tmp_path / "hf.json"
    argv = ["bench-hf", "--device", "cpu", "--batch", "1", "--new-tokens", "2", "--repeats", "1", "--modes", "eager",
            "--variants", "bf16,blockfp8-fused", "--json", str(out_json)]
    assert main(argv) == 0
    rows = json.loads(out_json.read_text())["rows"]
    fused = next(r for r in rows if r["variant"] == "blockfp8-fused")
    assert fused["status"] == Status.OK and fused["tokens_per_s"] > 0, fused["note"]
    assert 1e-4 < fused["layer_error"] <= 5e-3 and fused["logits_cos_min"] >= 0.99


def test_fp8_variants_share_one_set_of_fp8_tensors():
    from transformers.integrations.finegrained_fp8 import FP8Linear

    config = bench_hf.build_config("tiny", 1, 256)
    models = bench_hf.build_models(config, list(bench_hf.VARIANTS), torch.device("cpu"))
    ours, theirs, bf16 = models["blockfp8"], models["transformers-fp8"], models["bf16"]
    pairs = [(n, m, theirs.get_submodule(n)) for n, m in ours.named_modules() if isinstance(m, Fp8BlockLinear)]
    assert len(pairs) == 7  # q, k, v, o, gate, up, down; lm_head stays bf16
    for name, mine, hers in pairs:
        assert isinstance(hers, FP8Linear) and tuple(hers.block_size) == (128, 128), name
        assert hers.weight.data_ptr() == mine.weight.data_ptr(), name
        assert hers.weight_scale_inv.data_ptr() == mine.weight_scale_inv.data_ptr(), name
    assert type(theirs.lm_head) is torch.nn.Linear and theirs.lm_head.weight is bf16.lm_head.weight
    fused = models["blockfp8-fused"].model.layers[0]  # the producers' variant: o/down shared, q+k+v, gate+up stacked
    assert fused.self_attn.o_proj.weight.data_ptr() == ours.model.layers[0].self_attn.o_proj.weight.data_ptr()
    assert torch.equal(fused.self_attn.k_proj.weight.view(torch.uint8),
                       ours.model.layers[0].self_attn.k_proj.weight.view(torch.uint8))
    assert fused.mlp.down_proj.weight.data_ptr() == ours.model.layers[0].mlp.down_proj.weight.data_ptr()
    assert fused.mlp.gate_up_proj.out_features == 2 * ours.model.layers[0].mlp.gate_proj.out_features
    assert type(ours.model.layers[0].mlp).__name__ == "LlamaMLP"  # the blockfp8 variant itself is not fused
    assert type(bf16.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert getattr(bf16.config, "quantization_config", None) is None


def _args(**kw) -> argparse.Namespace:
    base = {"preset": None, "layers": None, "vocab": None, "prompt_len": None, "new_tokens": None, "repeats": None,
            "variants": None, "modes": None}
    return argparse.Namespace(**{**base, **kw})


def test_arguments_are_checked():
    args = bench_hf._resolve(_args(), torch.device("cpu"))
    assert (args.preset, args.layers, args.vocab, args.modes) == ("tiny", 2, 512, ["eager"])
    cuda = bench_hf._resolve(_args(variants="blockfp8,bf16"), torch.device("cuda"))
    assert (cuda.preset, cuda.layers, cuda.vocab, cuda.modes) == ("llama", 4, 32000, ["eager", "compiled"])
    assert cuda.variants == ["bf16", "blockfp8"]
    assert args.variants == ["bf16", "transformers-fp8", "blockfp8"]  # the fused variant only on request
    assert bench_hf._resolve(_args(variants="blockfp8-fused,bf16"), torch.device("cpu")).variants == [
        "bf16", "blockfp8-fused"]
    with pytest.raises(ValueError, match="--variants must include bf16"):
        bench_hf._resolve(_args(variants="blockfp8"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"--variants got \['fp4'\]"):
        bench_hf._resolve(_args(variants="bf16,fp4"), torch.device("cpu"))
    with pytest.raises(ValueError, match="--new-tokens must be >= 1, got 0"):
        bench_hf._resolve(_args(new_tokens=0), torch.device("cpu"))


def test_a_layer_off_the_reference_makes_the_variant_wrong():
    config = bench_hf.build_config("tiny", 1, 256)
    model = bench_hf.build_models(config, ["bf16", "blockfp8"], torch.device("cpu"))["blockfp8"]
    ids = bench_hf.prompts(256, 1, 8, torch.device("cpu"))
    _, worst = bench_hf.forward_checked(model, ids)
    assert worst is not None and worst <= 5e-3
    # One layer 2% off (a misapplied scale gives far more) is caught, whatever the logits say.
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: out * 1.02)
    try:
        _, worst = bench_hf.forward_checked(model, ids)
    finally:
        handle.remove()
    assert worst == pytest.approx(0.02, rel=0.2)
    row = bench_hf.Row("blockfp8", "eager", 1)
    settings = bench_hf.Settings([1], 8, 1, 1, ["eager"], torch.device("cpu"))
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: out * 1.02)
    timed = bench_hf.prepare_cell(row, model, (model(ids).logits.float(), None), ids, {}, settings)
    bench_hf.finish_cell(row, [timed()], settings)
    assert row.status == Status.WRONG and row.layer_error > 5e-3


def test_a_hub_kernel_that_cannot_load_is_unavailable_in_one_line():
    kernels = pytest.importorskip("kernels")
    import os

    inside = os.path.join(os.path.dirname(os.path.abspath(kernels.__file__)), "resolver.py")
    message = ("Kernel repository 'kernels-community/finegrained-fp8' could not verify publisher trust status. "
               "Set trust_remote_code=True or add the repository ID to the trust_remote_code allowlist to allow it")
    try:
        exec(compile(f"raise ValueError({message!r})", inside, "exec"))
    except ValueError as e:
        assert bench_hf.failure_status(e) == Status.UNAVAILABLE
        note = bench_hf.failure_note(e)
    assert note.startswith("needs the Hub kernel kernels-community/finegrained-fp8") and len(note) < 160
    # The same error from anywhere else is a crash, its note cut at a word with "...".
    try:
        raise ValueError(message)
    except ValueError as e:
        assert bench_hf.failure_status(e) == Status.CRASHED
        cut = bench_hf.short_error(e)
    assert cut.endswith(" ...") and len(cut) < 180 and cut[:-4] in "ValueError: " + message


class _Recorder(torch.nn.Module):
    """A stand-in model: logits of zeros, and a generate() that notes who ran when."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def forward(self, ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.ones(*ids.shape, 8))

    def generate(self, ids, attention_mask=None, max_new_tokens=1, **kwargs):
        self.log.append(self.name)
        return torch.zeros(ids.shape[0], ids.shape[1] + max_new_tokens, dtype=torch.long)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_variants_are_timed_in_turn_after_their_setup(mode):
    log: list[str] = []
    models = {"bf16": _Recorder("bf16", log), "blockfp8": _Recorder("blockfp8", log)}
    settings = bench_hf.Settings([1], 4, 2, 3, [mode], torch.device("cpu"))
    rows = bench_hf.run_benchmark(models, 16, settings, log=lambda line: None)
    setup = 1 if mode == "eager" else 3  # untimed calls per variant: the first, and compiled's recording calls
    assert log == ["bf16"] * setup + ["blockfp8"] * setup + ["bf16", "blockfp8"] * 3
    assert [r.status for r in rows] == [Status.OK, Status.OK] and all(r.tokens_per_s for r in rows)


def test_eager_graph_captures_of_the_prefill_stay_out_of_the_timed_calls():
    """Pinned: the prompt's prefill makes one call per layer and generate(), and a layer's eager CUDA graph of a
    shape is captured on its 8th call: on CUDA, an FP8 model's first 8 calls are setup, in both modes."""
    fp8 = torch.nn.Sequential(Fp8BlockLinear(128, 128))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [bench_hf.untimed_calls(fp8, mode, cuda) for mode in ("eager", "compiled")] == [8, 8]
    bf16 = torch.nn.Sequential(torch.nn.Linear(128, 128))
    assert [bench_hf.untimed_calls(bf16, mode, cuda) for mode in ("eager", "compiled")] == [1, 3]
    assert [bench_hf.untimed_calls(fp8, mode, cpu) for mode in ("eager", "compiled")] == [1, 3]
