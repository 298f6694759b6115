"""The decoder used by the demo and the end-to-end benchmark: shapes, init, FP8 fidelity, compile, CUDA graphs."""

from dataclasses import replace

import pytest
import torch

import blockfp8
from blockfp8.backends import Problem, backend_names, get_backend
from blockfp8.modules import Fp8GatedMLP, Fp8RMSNorm
from blockfp8.nn import Fp8BlockLinear
from blockfp8.reference import TOLERANCE, rel_error
from blockfp8.testing.decoder import (
    decode_step,
    deepseek_v3,
    hidden_input,
    linear_shapes,
    make_model,
    tiny,
    with_fused_producers,
)
from blockfp8.testing.timing import capture_graph

DEEPSEEK_V3_SHAPES = {
    "attn.fused_qkv_a_proj": (2112, 7168),
    "attn.q_b_proj": (24576, 1536),
    "attn.kv_b_proj": (32768, 512),
    "attn.o_proj": (7168, 16384),
    "mlp.gate_up_proj": (36864, 7168),
    "mlp.down_proj": (7168, 18432),
}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def test_deepseek_v3_linears_have_the_real_shapes():
    assert linear_shapes(deepseek_v3()) == DEEPSEEK_V3_SHAPES
    # Built on the meta device: every layer of the stack, no memory.
    model = make_model("deepseek-v3", n_layers=3, device="meta")
    found = {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert found == {f"layers.{i}.{name}": shape for i in range(3) for name, shape in DEEPSEEK_V3_SHAPES.items()}


def test_tiny_preset_has_tail_blocks():
    dims = {d for shape in linear_shapes(tiny()).values() for d in shape}
    assert tiny().hidden % 128 != 0
    assert any(d % 128 for d in dims) and any(d > 128 for d in dims)


def test_init_is_deterministic_and_seeded():
    a, b, c = make_model("tiny", 1), make_model("tiny", 1), make_model("tiny", 1, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.mlp.down_proj.weight"], sc["layers.0.mlp.down_proj.weight"])
    w = a.layers[0].mlp.down_proj.weight.float()
    assert w.std().item() == pytest.approx(1 / tiny().intermediate ** 0.5, rel=0.05)


def test_activations_stay_bounded_through_layers():
    model = make_model("tiny", n_layers=8, dtype=torch.float32)
    rms = []
    for layer in model.layers:
        layer.register_forward_hook(lambda _m, _i, out: rms.append(out.pow(2).mean().sqrt().item()))
    out = decode_step(model, hidden_input(model, 3))
    assert out.shape == (3, 1, tiny().vocab)
    assert torch.isfinite(out).all()
    assert all(0.5 < r < 5 for r in rms), rms


def test_token_and_hidden_inputs():
    model = make_model("tiny", 1)
    assert decode_step(model, torch.tensor([[1], [2]])).shape == (2, 1, 512)
    assert decode_step(model, hidden_input(model, 2)[:, 0]).shape == (2, 1, 512)
    # Prefill-shaped input works too (causal among the new tokens).
    assert model(torch.randint(0, 512, (2, 5))).shape == (2, 5, 512)


def test_bad_arguments():
    with pytest.raises(ValueError, match="preset"):
        make_model("gpt-9")
    with pytest.raises(ValueError, match="n_layers"):
        make_model("tiny", n_layers=0)
    with pytest.raises(TypeError, match="no vocabulary"):
        make_model("deepseek-v3", 1, device="meta")(torch.zeros(1, 1, dtype=torch.long))


def test_converted_model_is_close_to_bf16():
    ref = make_model("tiny", 2)
    fp8 = make_model("tiny", 2)
    report = blockfp8.convert_model(fp8)
    assert len(report.converted) == 2 * 6 and report.skipped == {"lm_head": "default skip 'lm_head'"}
    x = torch.randint(0, 512, (4, 1))
    assert _cosine(decode_step(fp8, x), decode_step(ref, x)) > 0.99


def test_compiled_converted_model_has_no_graph_break_and_matches_eager():
    model = make_model("tiny", 1)
    blockfp8.convert_model(model)
    x = hidden_input(model, 2)
    with torch.inference_mode():
        eager = model(x)
        torch._dynamo.reset()
        # fullgraph=True raises on any graph break. aot_eager traces through the custom ops' fake
        # implementations like Inductor does, without Inductor's C++ build (about a minute on a CI core).
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert rel_error(compiled, eager) <= 1e-3


def _gpu_friendly():
    """tiny with every dim a multiple of 16 (cuBLAS and DeepGEMM refuse the tiny preset's K=200)."""
    return replace(tiny(1), hidden=256, q_lora_rank=128, kv_lora_rank=64, qk_rope_dim=32, v_head_dim=32)


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["tiny", "aligned"])
@pytest.mark.parametrize("backend", [*backend_names(), None])
def test_cuda_graph_replay_matches_eager(backend, config):
    cfg = tiny(1) if config == "tiny" else _gpu_friendly()
    if backend is not None:
        be = get_backend(backend)
        refused = [be.supports(Problem.of(4, n, k, "cuda")) for n, k in linear_shapes(cfg).values()]
        if not all(refused):
            pytest.skip(f"{backend}: {next(r.reason for r in refused if not r)}")
    model = make_model(cfg, device="cuda")
    blockfp8.convert_model(model, backend=backend)
    assert all(m.backend == backend for m in model.modules() if isinstance(m, Fp8BlockLinear))
    static_x = hidden_input(model, 4)
    with torch.inference_mode():
        eager = model(static_x)
        graph, static_out = capture_graph(lambda: model(static_x), warmup=3)
        graph.replay()
        torch.cuda.synchronize()
        # Split-K Triton sums partials in arrival order, so replay may differ from eager in the last bit.
        assert rel_error(static_out, eager) <= TOLERANCE
        # A new input through the same graph: the replay really recomputes.
        new_x = hidden_input(model, 4, seed=7)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(static_out, model(new_x)) <= TOLERANCE


def test_fused_producers_match_the_unfused_model_and_share_its_weights():
    fp8 = make_model("tiny", 2)
    blockfp8.convert_model(fp8)
    fused = with_fused_producers(fp8)
    blocks = fused.layers
    assert all(isinstance(b.attn_norm, Fp8RMSNorm) and isinstance(b.mlp_norm, Fp8RMSNorm)
               and isinstance(b.attn.q_a_norm, Fp8RMSNorm) and isinstance(b.mlp, Fp8GatedMLP) for b in blocks)
    assert not isinstance(fp8.layers[0].attn_norm, Fp8RMSNorm)  # the original model is left as it was
    ptrs = sorted(t.data_ptr() for t in (*fp8.parameters(), *fp8.buffers()))
    assert ptrs == sorted(t.data_ptr() for t in (*fused.parameters(), *fused.buffers()))
    x = hidden_input(fp8, 4)
    unfused_out, fused_out = decode_step(fp8, x), decode_step(fused, x)
    assert rel_error(fused_out, unfused_out) <= TOLERANCE
    with torch.inference_mode():
        torch._dynamo.reset()
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, fused_out)


def test_fused_producers_need_a_converted_model():
    with pytest.raises(ValueError, match=r"layers.0.attn.fused_qkv_a_proj is not an Fp8BlockLinear"):
        with_fused_producers(make_model("tiny", 1))


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["tiny", "aligned"])
def test_fused_producers_under_cuda_graphs(config):
    cfg = tiny(1) if config == "tiny" else _gpu_friendly()
    model = make_model(cfg, device="cuda")
    blockfp8.convert_model(model)
    fused = with_fused_producers(model)
    static_x = hidden_input(model, 16)
    with torch.inference_mode():
        unfused = model(static_x)
        eager = fused(static_x)
        assert rel_error(eager, unfused) <= TOLERANCE
        graph, static_out = capture_graph(lambda: fused(static_x), warmup=3)
        static_x.copy_(hidden_input(model, 16, seed=7))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(static_out, fused(static_x)) <= TOLERANCE
        torch._dynamo.reset()
        compiled = torch.compile(fused, fullgraph=True, dynamic=False)(static_x)
        assert rel_error(compiled, model(static_x)) <= TOLERANCE
