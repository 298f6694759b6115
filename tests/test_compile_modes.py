"""The paths users take on a GPU: ``torch.compile(mode="reduce-overhead")`` (CUDA graphs through Inductor's
cudagraph trees, which refuse any memory an op leaves in their pool that is not an output) of a converted MLP
and decoder with every backend, and transformers' ``generate(cache_implementation="static")``, which compiles the
decode step that way. Results must agree with eager blockfp8 calls of the same layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blockfp8
from blockfp8.backends import get_backend
from blockfp8.reference import TOLERANCE, rel_error
from blockfp8.testing.decoder import make_model

pytestmark = pytest.mark.gpu

BACKENDS = [None, "triton", "gluon", "cublas", "deepgemm"]


def _require(backend: str | None) -> None:
    if backend is not None and not get_backend(backend).availability():
        pytest.skip(f"{backend}: {get_backend(backend).availability().reason}")


def _mlp(backend: str | None) -> nn.Module:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 1024), nn.GELU(), nn.Linear(1024, 512))
    mlp = mlp.to("cuda", torch.bfloat16).eval().requires_grad_(False)
    blockfp8.convert_model(mlp, backend=backend)
    return mlp


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_overhead_mlp(backend):
    _require(backend)
    torch._dynamo.reset()
    mlp = _mlp(backend)
    compiled = torch.compile(mlp, mode="reduce-overhead")
    for m in (4, 16, 4):  # a new shape records its own graph; the first one replays again after it
        for step in range(4):
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                want = mlp(x)
                got = compiled(x).clone()  # a cudagraph tree's output is overwritten by its next replay
            assert rel_error(got.float(), want.float()) <= TOLERANCE, (backend, m, step)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return rel_error(a.float(), b.float())


@pytest.mark.parametrize("backend", [None, "triton"])
def test_reduce_overhead_decoder(backend):
    """A whole decoder (tail blocks in every dimension): Inductor fuses its norms and attention arithmetic
    differently from eager, and FP8 quantization magnifies such last-bit differences in the activations it
    quantizes (a flipped e4m3 rounding moves a value by 1/16). So the compiled FP8 model is held to what matters:
    it must be as faithful to the bf16 model as the eager FP8 model is. A wrong or stale GEMM result is off by
    the whole output, far beyond that."""
    torch._dynamo.reset()
    bf16 = make_model("tiny", n_layers=2, device="cuda")  # token ids in, logits out
    model = make_model("tiny", n_layers=2, device="cuda")
    blockfp8.convert_model(model, backend=backend)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for batch in (1, 8):
        for seed in range(3):
            x = torch.randint(0, model.cfg.vocab, (batch, 1), device="cuda",
                              generator=torch.Generator("cuda").manual_seed(seed))
            with torch.inference_mode():
                truth, eager = bf16(x), model(x)
                got = compiled(x).clone()
            assert _rel(got, truth) <= 1.5 * _rel(eager, truth), (backend, batch, seed)


def _tiny_llama(device: str = "cuda") -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=512,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device).eval()


def _generate(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                         cache_implementation="static")
    return out.sequences, torch.stack(out.scores, 1).float()


def _teacher_forced(model: nn.Module, sequences: torch.Tensor, prompt: int) -> torch.Tensor:
    """The eager model's next-token logits along ``sequences``, at the positions ``generate`` scored."""
    return model(sequences).logits[:, prompt - 1:-1].float()


@pytest.mark.parametrize("backend,fused", [(None, False), ("triton", False), (None, True)])
def test_static_cache_generate_agrees_with_eager(backend, fused):
    """transformers compiles the decode step with mode="reduce-overhead" for a static cache. Along the tokens it
    generated, its logits must be as faithful to the bf16 model's as the eager FP8 model's logits are (see
    test_reduce_overhead_decoder for why not bit for bit). ``fused``: on the fused producers, q/k/v stacked
    (hf.fuse_producers), compared with its own eager logits."""
    from blockfp8 import hf

    torch._dynamo.reset()
    bf16 = _tiny_llama()
    fp8 = _tiny_llama()
    hf.quantize(fp8, backend=backend)
    if fused:
        hf.fuse_producers(fp8)
    ids = torch.randint(1, 512, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        for _ in range(3):  # the first calls record the graphs
            sequences, scores = _generate(fp8, ids)
        truth = _teacher_forced(bf16, sequences, ids.shape[1])
        eager = _teacher_forced(fp8, sequences, ids.shape[1])
    assert _rel(scores, truth) <= 1.5 * _rel(eager, truth), (_rel(scores, truth), _rel(eager, truth))
