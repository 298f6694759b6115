"""A small decoder stack in plain torch whose linear layers have real checkpoint shapes.

Every block is: RMSNorm -> a latent-attention-shaped part -> residual, RMSNorm -> gated MLP -> residual.
The attention part follows DeepSeek-V3's multi-head latent attention *shapes*, not its full math:

* ``fused_qkv_a_proj`` (hidden -> q_lora + kv_lora + rope) splits into a query latent, a KV latent and a
  shared rope key, each latent RMS-normed;
* ``q_b_proj`` (q_lora -> heads * (nope + rope)) and ``kv_b_proj`` (kv_lora -> heads * (nope + v)) expand
  them per head;
* the new token attends over a fixed-size random context (a static "KV cache" buffer) plus itself, with no
  rotary embedding and no weight absorption;
* ``o_proj`` (heads * v -> hidden) brings the heads back.

So one decode step runs every linear once with M = batch size, and every tensor has a static shape: no
``.item()``, no data-dependent branch, no cache mutation. ``torch.compile(fullgraph=True)`` and CUDA-graph
capture work by construction. Weights are random (seeded) with std 1/sqrt(K), so with RMSNorm before every
projection the activations stay O(1) through the stack.

``with_fused_producers`` gives a converted model the engines' fused producers (``blockfp8.fused``): every RMSNorm
in front of a linear quantizes its output for it (the MLP's norm also takes the residual add), and the MLP's
SiLU-mul quantizes for ``down_proj``; only ``o_proj`` (fed by attention) still quantizes its own input.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from ..modules import Fp8GatedMLP, Fp8RMSNorm
from ..nn import Fp8BlockLinear
from ..quant import QuantizedActivation


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of a ``Decoder``. Linear shapes (N x K) follow from them; see ``linear_shapes``."""

    name: str
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    context_len: int = 16  # keys/values already in the static cache
    vocab: int | None = None  # None: the model maps hidden states to hidden states (no embedding, no head)
    norm_eps: float = 1e-6

    @property
    def qk_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim


def tiny(n_layers: int = 2) -> DecoderConfig:
    """CPU-sized model; hidden 200 and several other dims are not multiples of 128 (tail blocks everywhere)."""
    return DecoderConfig(
        name="tiny", hidden=200, intermediate=576, n_layers=n_layers, n_heads=4, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_dim=32, qk_rope_dim=24, v_head_dim=32, context_len=8, vocab=512,
    )


def deepseek_v3(n_layers: int = 2) -> DecoderConfig:
    """DeepSeek-V3's attention and dense-MLP linear shapes (hidden 7168, 128 heads), no embedding or head."""
    return DecoderConfig(
        name="deepseek-v3", hidden=7168, intermediate=18432, n_layers=n_layers, n_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128, context_len=64, vocab=None,
    )


PRESETS = {"tiny": tiny, "deepseek-v3": deepseek_v3}


def linear_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear in one block (plus ``lm_head`` when the config has a vocabulary)."""
    shapes = {
        "attn.fused_qkv_a_proj": (cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_dim, cfg.hidden),
        "attn.q_b_proj": (cfg.n_heads * cfg.qk_dim, cfg.q_lora_rank),
        "attn.kv_b_proj": (cfg.n_heads * (cfg.qk_nope_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "attn.o_proj": (cfg.hidden, cfg.n_heads * cfg.v_head_dim),
        "mlp.gate_up_proj": (2 * cfg.intermediate, cfg.hidden),
        "mlp.down_proj": (cfg.hidden, cfg.intermediate),
    }
    if cfg.vocab:
        shapes["lm_head"] = (cfg.vocab, cfg.hidden)
    return shapes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32: bf16 sums of squares over 7168 elements lose too much.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def _linear(k: int, n: int) -> nn.Linear:
    return nn.Linear(k, n, bias=False)


class LatentAttention(nn.Module):
    """Shape-faithful stand-in for multi-head latent attention over a static context."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        shapes = linear_shapes(cfg)
        self.fused_qkv_a_proj = _linear(*reversed(shapes["attn.fused_qkv_a_proj"]))
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.q_b_proj = _linear(*reversed(shapes["attn.q_b_proj"]))
        self.kv_b_proj = _linear(*reversed(shapes["attn.kv_b_proj"]))
        self.o_proj = _linear(*reversed(shapes["attn.o_proj"]))
        # The context every sequence in the batch attends to; shared across the batch to keep it small.
        self.register_buffer("cache_k", torch.empty(cfg.n_heads, cfg.context_len, cfg.qk_dim))
        self.register_buffer("cache_v", torch.empty(cfg.n_heads, cfg.context_len, cfg.v_head_dim))

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        c = self.cfg
        b, s, _ = (x.values if isinstance(x, QuantizedActivation) else x).shape
        q_lat, kv_lat, k_rope = self.fused_qkv_a_proj(x).split([c.q_lora_rank, c.kv_lora_rank, c.qk_rope_dim], -1)
        q = self.q_b_proj(self.q_a_norm(q_lat)).view(b, s, c.n_heads, c.qk_dim)
        kv = self.kv_b_proj(self.kv_a_norm(kv_lat)).view(b, s, c.n_heads, c.qk_nope_dim + c.v_head_dim)
        k_nope, v = kv.split([c.qk_nope_dim, c.v_head_dim], -1)
        # The rope key is one vector per token shared by all heads, as in MLA.
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(b, s, c.n_heads, c.qk_rope_dim)], -1)
        keys = torch.cat([self.cache_k.expand(b, -1, -1, -1), k.transpose(1, 2)], 2)
        values = torch.cat([self.cache_v.expand(b, -1, -1, -1), v.transpose(1, 2)], 2)
        scores = torch.matmul(q.transpose(1, 2), keys.transpose(-1, -2)).float() / math.sqrt(c.qk_dim)
        # Causal among the new tokens (decode has s == 1, so this mask is all True there).
        mask = torch.ones(s, c.context_len + s, dtype=torch.bool, device=q.device).tril(c.context_len)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(values.dtype)
        out = torch.matmul(probs, values).transpose(1, 2).reshape(b, s, c.n_heads * c.v_head_dim)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    """SwiGLU MLP with the gate and up projections fused into one linear (one GEMM per step)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_up_proj = _linear(cfg.hidden, 2 * cfg.intermediate)
        self.down_proj = _linear(cfg.intermediate, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = LatentAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.mlp_norm, Fp8RMSNorm):
            # Fused producers: the residual add happens inside the MLP norm's kernel, which returns the sum.
            xq, x = self.mlp_norm(self.attn(self.attn_norm(x)), x)
            return x + self.mlp(xq)
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """A stack of ``Block``s. Input: token ids [B, S] (when the config has a vocabulary) or hidden states
    [B, S, hidden]; output: logits [B, S, vocab] with a vocabulary, else final-normed hidden states."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden) if cfg.vocab else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = _linear(cfg.hidden, cfg.vocab) if cfg.vocab else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            if self.embed_tokens is None:
                raise TypeError(f"config {self.cfg.name!r} has no vocabulary: x must be hidden states, got {x.dtype}")
            x = self.embed_tokens(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else x


@torch.no_grad()
def init_weights(model: Decoder, seed: int = 0) -> None:
    """Deterministic random init: linears N(0, 1/K), embeddings and the context cache N(0, 1), norms 1.

    Values are drawn in fp32 from a generator on the model's device, so one seed gives the same model on
    every run on one device type (CPU and CUDA streams differ).
    """
    device = next(model.buffers()).device
    if device.type == "meta":
        return
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("norm.weight"):
            t.fill_(1.0)
            continue
        std = 1.0 / math.sqrt(t.shape[-1]) if t.dim() == 2 and "embed" not in name else 1.0
        t.copy_(torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32).mul_(std))


def make_model(preset: str | DecoderConfig = "tiny", n_layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu", seed: int = 0) -> Decoder:
    """A ``Decoder`` from a preset name ("tiny", "deepseek-v3") or a config, randomly initialized, in eval mode.

    ``n_layers`` overrides the preset's depth. ``device="meta"`` builds shapes only (no memory, no init).
    """
    if isinstance(preset, DecoderConfig):
        cfg = preset
    elif preset in PRESETS:
        cfg = PRESETS[preset]()
    else:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or a DecoderConfig, got {preset!r}")
    if n_layers is not None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        cfg = replace(cfg, n_layers=n_layers)
    # Build on meta, then allocate once on the target in the final dtype: skips nn.Linear's default init
    # and never holds an fp32 copy of the (1.2 GB per DeepSeek-V3 layer in bf16) weights.
    with torch.device("meta"):
        model = Decoder(cfg).to(dtype)
    model = model.to_empty(device=device)
    init_weights(model, seed)
    return model.eval().requires_grad_(False)


def with_fused_producers(model: Decoder) -> Decoder:
    """A copy of a converted ``model`` (``convert_model``) that runs the fused producers: RMSNorms feeding linears
    become ``Fp8RMSNorm`` (the MLP's with the residual add), the MLP an ``Fp8GatedMLP``. Every weight tensor is
    shared with ``model``, not copied."""
    feeds = ("attn.fused_qkv_a_proj", "attn.q_b_proj", "attn.kv_b_proj", "mlp.gate_up_proj", "mlp.down_proj")
    for i, block in enumerate(model.layers):
        for name in feeds:
            if not isinstance(block.get_submodule(name), Fp8BlockLinear):
                raise ValueError(f"layers.{i}.{name} is not an Fp8BlockLinear: convert the model (convert_model) "
                                 f"before fusing its producers")
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    fused = copy.deepcopy(model, memo=shared)
    for block in fused.layers:
        block.attn_norm = Fp8RMSNorm.from_norm(block.attn_norm)
        block.mlp_norm = Fp8RMSNorm.from_norm(block.mlp_norm)
        block.attn.q_a_norm = Fp8RMSNorm.from_norm(block.attn.q_a_norm)
        block.attn.kv_a_norm = Fp8RMSNorm.from_norm(block.attn.kv_a_norm)
        block.mlp = Fp8GatedMLP.from_linears(block.mlp.gate_up_proj, block.mlp.down_proj)
    return fused


def decode_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One decode step: ``x`` is [B, 1] token ids or [B, 1, hidden] hidden states (a [B, hidden] input is
    treated as one token per sequence)."""
    if x.is_floating_point() and x.dim() == 2:
        x = x.unsqueeze(1)
    with torch.inference_mode():
        return model(x)


def hidden_input(model: Decoder, batch: int, seed: int = 1) -> torch.Tensor:
    """A deterministic [batch, 1, hidden] decode input (unit RMS) on the model's device and dtype."""
    p = next(model.parameters())
    gen = torch.Generator(device=p.device).manual_seed(seed)
    return torch.randn(batch, 1, model.cfg.hidden, generator=gen, device=p.device).to(p.dtype)
