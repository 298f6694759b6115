"""``blockfp8 bench-hf``: tokens/s of ``model.generate()`` on a transformers model built from a config.

Variants of one randomly initialised model (Llama- or Qwen3-shaped; ``lm_head`` stays bf16 in all):

* ``bf16``: the model as transformers builds it;
* ``transformers-fp8``: transformers' own FP8 path, its ``FP8Linear`` layers (what ``from_pretrained`` builds
  for a block-FP8 checkpoint, with ``FineGrainedFP8Config``) holding the very fp8 tensors of the next variant;
* ``blockfp8``: ``blockfp8.hf.quantize`` of the model;
* ``blockfp8-fused`` (on request): that model with ``blockfp8.hf.fuse_producers`` (its norms and SiLU-mul write
  the fp8 inputs of the projections they feed; q/k/v in one GEMM and gate/up in another), sharing its other fp8
  tensors.

Modes: ``eager`` (the default dynamic KV cache, no compilation) and, on CUDA, ``compiled`` (transformers'
static KV cache, with which ``generate`` compiles the decode step with ``torch.compile``, mode
"reduce-overhead"). Each cell generates ``--new-tokens`` tokens after a ``--prompt-len`` prompt at each batch
size; tokens/s is batch x new tokens over the median wall time of a ``generate`` call (prefill included). The
first calls (kernel JIT, compilation, CUDA-graph recording, blockfp8's eager graphs of the prompt's prefill;
``untimed_calls``) are untimed and reported as setup seconds. The variants of a cell are timed in turn, one call
each per repeat, so drift of the host's speed weighs on all alike.

Fidelity, on one forward pass of the prompts per FP8 variant and batch:

* per layer: each block-FP8 linear's output against the float32 reference (dequantize, then matmul) of that
  layer's own input, as the relative Frobenius error. A variant is ``wrong`` when any layer is further than
  ``TOLERANCE`` (5e-3, the project's bound for one GEMM with bf16 output) from the format's exact numerics.
  Judging each GEMM on its own input keeps the verdict independent of depth: a random-weight model amplifies
  any difference from layer to layer (on an H100, the blockfp8 model's logits were 0.992 cosine from the
  reference model's on the 4-layer llama preset and 0.96 on 16 layers, where the format itself was 0.87 from
  bf16), so one logits threshold cannot serve every depth.
* per-position logits, as the cosine over the vocabulary at each position (random weights make greedy tokens
  meaningless, logits are not), against the bf16 model (what block FP8 costs on this model; on a random-weight
  model the format alone costs more than on a trained one, whose weights and activations are smoother) and
  against the format reference, the blockfp8 model on the reference backend. Both are reported, neither is a
  verdict.

A cell that cannot run gets its reason in the row: ``unavailable`` for what this machine lacks (a package, or
transformers' FP8 kernel, which it fetches from the Hugging Face Hub and cannot load offline or untrusted),
``crashed`` for any other error.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from .. import hf
from ..eager_graphs import EagerGraphs
from ..hf_config import fp8_layout
from ..nn import Fp8BlockLinear
from ..quant import QuantizedActivation, quantize_activation
from ..reference import TOLERANCE, reference_gemm, rel_error
from ..testing import Status
from ..testing.environment import dist_version, environment, environment_line
from ..testing.timing import synchronize, time_steps
from .common import announce, modes_on, parse_names, positive_ints, resolve_device, short_error

BF16, HF_FP8, BLOCKFP8, FUSED = "bf16", "transformers-fp8", "blockfp8", "blockfp8-fused"
VARIANTS = (BF16, HF_FP8, BLOCKFP8, FUSED)
DEFAULT_VARIANTS = (BF16, HF_FP8, BLOCKFP8)  # blockfp8-fused on request
MODES = ("eager", "compiled")
SEED = 0

# Decoder shapes of real width (Llama-3-8B, Qwen3-8B; their vocabularies are 128256 and 151936, see --vocab)
# and a tiny one for the CPU, where the Triton kernels run under the interpreter.
PRESETS = {
    "llama": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8},
    "qwen3": {"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 128},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2},
}
# Per device: preset, layers, vocab, prompt tokens, new tokens, timed repeats. The real-width default keeps
# lm_head (bf16 in every variant) at 262 MB next to 1.7 GB of bf16 decoder linears, so it does not hide the
# decoder; the CPU default finishes in well under a minute.
DEFAULTS = {"cuda": ("llama", 4, 32000, 32, 64, 3), "cpu": ("tiny", 2, 512, 8, 8, 3)}


# ------------------------------------------------------------------------------------------- the models


def build_config(preset: str, layers: int, vocab: int):
    """The transformers config of ``preset`` with ``layers`` decoder layers and a ``vocab``-token vocabulary."""
    import transformers

    cls = transformers.Qwen3Config if preset == "qwen3" else transformers.LlamaConfig
    return cls(**PRESETS[preset], num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096,
               tie_word_embeddings=False)


def build_bf16(config, device: torch.device) -> nn.Module:
    import transformers

    torch.manual_seed(SEED)
    # Initialised on the device: random init of a 16-layer real-width model takes minutes on the CPU, seconds on a
    # GPU. from_config keeps the rotary buffers in fp32, as from_pretrained does.
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.to(device).eval()


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares every parameter and buffer with it (no tensor memory)."""
    return copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})


def build_blockfp8(bf16: nn.Module) -> nn.Module:
    model = sharing_copy(bf16)
    hf.quantize(model, skip=["lm_head"])
    return model


def build_transformers_fp8(bf16: nn.Module, blockfp8_model: nn.Module) -> nn.Module:
    """transformers' FP8 model as its loader builds it for a block-FP8 checkpoint, on blockfp8's fp8 tensors."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import FP8Linear, replace_with_fp8_linear
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    model = sharing_copy(bf16)
    qc = FineGrainedFP8Config(modules_to_not_convert=fp8_layout(blockfp8_model)[1])
    model = replace_with_fp8_linear(model, modules_to_not_convert=qc.modules_to_not_convert, quantization_config=qc)
    for name, layer in model.named_modules():
        if isinstance(layer, FP8Linear):
            src = blockfp8_model.get_submodule(name)
            for attr in ("weight", "weight_scale_inv", "bias"):
                if getattr(src, attr) is not None:
                    setattr(layer, attr, nn.Parameter(getattr(src, attr), requires_grad=False))
    # from_pretrained attaches its quantizer; generate() asks it whether the model may be compiled.
    model.hf_quantizer = FineGrainedFP8HfQuantizer(qc, pre_quantized=True)
    return model


# ------------------------------------------------------------------------------------------ measurement


@dataclass
class Row:
    variant: str
    mode: str
    batch: int
    status: str = Status.OK
    tokens_per_s: float | None = None
    ms_per_token: float | None = None
    speedup: float | None = None
    setup_s: float | None = None
    logits_cos_min: float | None = None  # against bf16
    logits_cos_mean: float | None = None
    format_cos_min: float | None = None  # against the format reference (the reference backend)
    layer_error: float | None = None  # the largest per-layer error against the float32 reference
    note: str = ""


@dataclass
class Settings:
    batches: list[int]
    prompt_len: int
    new_tokens: int
    repeats: int
    modes: list[str]
    device: torch.device


def _from_hub_kernels(e: BaseException) -> bool:
    """Whether ``e`` came out of the Hugging Face ``kernels`` package (transformers loads its FP8 kernel with it)."""
    try:
        import kernels
    except ImportError:
        return False
    root = os.path.dirname(os.path.abspath(kernels.__file__)) + os.sep
    tb = e.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(root):
            return True
        tb = tb.tb_next
    return False


def failure_status(e: BaseException) -> str:
    """A missing package or Hub kernel is unavailable; any other exception is a crash."""
    return Status.UNAVAILABLE if isinstance(e, ImportError) or _from_hub_kernels(e) else Status.CRASHED


def failure_note(e: BaseException) -> str:
    """One line for the row: why the cell could not run."""
    if _from_hub_kernels(e):
        repo = re.search(r"'([\w.-]+/[\w.-]+)'", str(e))
        return (f"needs the Hub kernel {repo.group(1) if repo else 'of its FP8 layers'}, which could not be loaded "
                f"here (offline or not trusted: {type(e).__name__})")
    return short_error(e)


@torch.inference_mode()
def forward_checked(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """(float logits of ``model`` on ``ids``, the largest relative error of any block-FP8 linear against the
    float32 reference on that layer's own input; None when the model has no such layer)."""
    worst: list[float] = []

    def check(layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0]
        if not isinstance(x, (torch.Tensor, QuantizedActivation)):
            return  # a slice of a stacked projection's output (hf.fuse_producers): the stacked layer was checked
        if isinstance(x, QuantizedActivation):  # from a fused producer: its own quantization is the input
            xq, xs = x.values.reshape(-1, x.shape[-1]), x.scales.reshape(-1, x.scales.shape[-1])
        else:
            xq, xs = quantize_activation(x.reshape(-1, x.shape[-1]))
        ref = reference_gemm(xq, xs, layer.weight, layer.weight_scale_inv, layer.bias, torch.float32)
        worst.append(rel_error(out.reshape(ref.shape), ref))

    # Any linear layer holding a 2-D fp8 weight and its block scales: blockfp8's and transformers' own.
    handles = [m.register_forward_hook(check) for m in model.modules()
               if isinstance(getattr(m, "weight_scale_inv", None), torch.Tensor)
               and isinstance(getattr(m, "weight", None), torch.Tensor)
               and m.weight.dtype == torch.float8_e4m3fn and m.weight.dim() == 2]
    try:
        logits = model(ids).logits.float()
    finally:
        for h in handles:
            h.remove()
    return logits, max(worst) if worst else None


def prompts(vocab: int, batch: int, length: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + batch)
    return torch.randint(1, vocab, (batch, length), generator=g).to(device)


def generation_kwargs(mode: str, new_tokens: int) -> dict:
    # No end-of-sequence token: every call generates exactly new_tokens tokens.
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    if mode == "compiled":
        kwargs["cache_implementation"] = "static"
    else:
        kwargs["disable_compile"] = True
    return kwargs


def cosine(got: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(min, mean) over positions of the cosine between two [batch, positions, vocab] logits at each position."""
    cos = torch.nn.functional.cosine_similarity(got, reference, dim=-1)
    return cos.min().item(), cos.mean().item()


@torch.inference_mode()
def format_logits(blockfp8_model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits of ``blockfp8_model`` with every block-FP8 layer on the float32 reference backend: the format's
    exact numerics, against which the kernels are judged."""
    layers = [m for m in blockfp8_model.modules() if isinstance(m, Fp8BlockLinear)]
    saved = [m.backend for m in layers]
    try:
        for m in layers:
            m.backend = "reference"
        return blockfp8_model(ids).logits.float()
    finally:
        for m, b in zip(layers, saved, strict=True):
            m.backend = b


def untimed_calls(model: nn.Module, mode: str, device: torch.device) -> int:
    """generate() calls before a cell is timed: the first (kernel JIT); reduce-overhead compilation records its
    CUDA graphs over the next two; blockfp8's eager CUDA graphs of the prompt's prefill (one linear call per
    generate() at the prompt's shape) capture on a layer's ``EagerGraphs.HOT``-th call of a shape, in the
    compiled mode too, where transformers runs the prefill uncompiled."""
    calls = 3 if mode == "compiled" else 1
    if device.type == "cuda" and any(isinstance(m, Fp8BlockLinear) for m in model.modules()):
        calls = max(calls, EagerGraphs.HOT)
    return calls


@torch.inference_mode()
def setup_generate(model: nn.Module, ids: torch.Tensor, mode: str, s: Settings) -> tuple[float, Callable[[], float]]:
    """(setup seconds, a function timing one generate call in seconds) of one cell: the untimed first calls
    (kernel JIT, compilation, CUDA-graph recording) run here."""
    kwargs = generation_kwargs(mode, s.new_tokens)

    def generate() -> torch.Tensor:
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

    t0 = time.perf_counter()
    out = generate()
    for _ in range(untimed_calls(model, mode, s.device) - 1):
        generate()
    synchronize(s.device)
    setup = time.perf_counter() - t0
    if out.shape[1] != ids.shape[1] + s.new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {s.new_tokens}")

    def timed() -> float:
        with torch.inference_mode():
            return time_steps(generate, s.device, warmup=0, steps=1)[0]

    return setup, timed


def prepare_cell(row: Row, model: nn.Module, references: tuple[torch.Tensor, torch.Tensor | None],
                 ids: torch.Tensor, cosines: dict[str, tuple], s: Settings) -> Callable[[], float]:
    """Fill ``row``'s fidelity (once per variant and batch) and setup time; return its timed generate call.
    ``references``: the bf16 model's logits and the format reference's (None without an FP8 variant)."""
    if row.variant != BF16 and row.variant not in cosines:
        got, worst = forward_checked(model, ids)
        bf16, fmt = references
        cosines[row.variant] = (*cosine(got, bf16), None if fmt is None else cosine(got, fmt)[0], worst)
    row.logits_cos_min, row.logits_cos_mean, row.format_cos_min, row.layer_error = cosines.get(
        row.variant, (None, None, None, None))
    row.setup_s, timed = setup_generate(model, ids, row.mode, s)
    return timed


def finish_cell(row: Row, times: list[float], s: Settings) -> None:
    """Speed from the timed calls, and the verdict."""
    seconds = statistics.median(times)
    row.tokens_per_s = row.batch * s.new_tokens / seconds
    row.ms_per_token = seconds / s.new_tokens * 1e3
    if row.layer_error is not None and not row.layer_error <= TOLERANCE:
        row.status = Status.WRONG


class _Cells:
    """One (batch, mode) group of rows: each variant's timed call, its times so far, and failures recorded in
    its row (``unavailable`` collects the variants missing something, for later groups)."""

    def __init__(self, rows: list[Row], unavailable: dict[str, str]) -> None:
        self.rows, self.unavailable = rows, unavailable
        self.timers: dict[int, Callable[[], float]] = {}
        self.times: dict[int, list[float]] = {}

    def fail(self, i: int, e: Exception) -> None:
        row = self.rows[i]
        row.status, row.note = failure_status(e), failure_note(e)
        row.tokens_per_s = row.ms_per_token = None
        if row.status == Status.UNAVAILABLE:
            self.unavailable[row.variant] = row.note
        self.timers.pop(i, None)

    def time_once(self, i: int) -> None:
        try:
            self.times.setdefault(i, []).append(self.timers[i]())
        except Exception as e:  # noqa: BLE001 - one failing cell must not stop the rest
            self.fail(i, e)


def run_benchmark(models: dict[str, nn.Module | BaseException], vocab: int, s: Settings,
                  log: Callable[[str], None], bounds: dict[int, tuple[float, float]] | None = None) -> list[Row]:
    """Every (batch, mode, variant) cell; ``models`` maps a variant to its model or to why it could not be built.
    ``bounds`` (filled per batch): the format reference's logits cosine (min, mean) against bf16 -- what block
    FP8 itself costs on this model.

    The cells of one (batch, mode) are timed interleaved: each repeat times one generate call of every variant
    in turn, so a host that speeds up or slows down over the run (measured on an H100 host: a second bf16 run 22%
    slower than the first, with blockfp8 between them) weighs on every variant alike. Compiled models alternate
    between their CUDA-graph trees as well (an H100 run of five such rounds at 16 layers: no re-recording, and
    one-after-the-other timing had put blockfp8 at 1.05x bf16 where interleaved rounds measured 1.2x)."""
    rows: list[Row] = []
    bf16 = models[BF16]
    fp8 = models.get(BLOCKFP8)
    # A missing package or kernel stays missing: its variant is not tried again in later cells.
    unavailable: dict[str, str] = {}
    for batch in s.batches:
        ids = prompts(vocab, batch, s.prompt_len, s.device)
        with torch.inference_mode():
            reference = bf16(ids).logits.float()
        fmt = format_logits(fp8, ids) if isinstance(fp8, nn.Module) else None
        if fmt is not None and bounds is not None:
            bounds[batch] = cosine(fmt, reference)
        cosines: dict[str, tuple] = {}
        for mode in s.modes:
            cells = _Cells([Row(variant, mode, batch) for variant in models], unavailable)
            for i, (row, model) in enumerate(zip(cells.rows, models.values(), strict=True)):
                if row.variant in unavailable:
                    row.status, row.note = Status.UNAVAILABLE, unavailable[row.variant]
                    continue
                try:
                    if isinstance(model, BaseException):
                        raise model
                    cells.timers[i] = prepare_cell(row, model, (reference, fmt), ids, cosines, s)
                except Exception as e:  # noqa: BLE001 - one failing cell must not stop the rest
                    cells.fail(i, e)
            for _ in range(s.repeats):
                for i in list(cells.timers):
                    cells.time_once(i)
            for i in cells.timers:
                finish_cell(cells.rows[i], cells.times[i], s)
            base = cells.rows[0] if cells.rows[0].variant == BF16 else None
            for row in cells.rows:
                if base is not None and base.tokens_per_s and row.tokens_per_s:
                    row.speedup = row.tokens_per_s / base.tokens_per_s
                rows.append(row)
                log(row_line(row))
    return rows


# ----------------------------------------------------------------------------------------------- output


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


COLUMNS = ("variant", "mode", "batch", "status", "tokens/s", "ms/token", "vs bf16", "worst layer err",
           "cos vs bf16 min", "cos vs bf16 mean", "cos vs format ref min", "setup s", "note")


def _cells(r: Row) -> list[str]:
    speedup = "-" if r.speedup is None else f"{r.speedup:.2f}x"
    return [r.variant, r.mode, str(r.batch), r.status, _fmt(r.tokens_per_s, ".1f"), _fmt(r.ms_per_token, ".2f"),
            speedup, _fmt(r.layer_error, ".2e"), _fmt(r.logits_cos_min, ".5f"), _fmt(r.logits_cos_mean, ".5f"),
            _fmt(r.format_cos_min, ".5f"), _fmt(r.setup_s, ".2f"), r.note]


def fidelity_line(bounds: dict[int, tuple[float, float]]) -> str:
    """What the format itself allows on this model, and how a variant is judged."""
    got = "; ".join(f"batch {b}: min {lo:.5f}, mean {mean:.5f}" for b, (lo, mean) in bounds.items()) or "not measured"
    return (f"fidelity: a variant is wrong when any of its block-FP8 layers is further than {TOLERANCE:g} (relative "
            f"error, 'worst layer err') from the float32 reference on that layer's own input -- the format's exact "
            f"numerics, judged per GEMM as the project judges every backend; the logits cosines are informative "
            f"(a deep random-weight model amplifies any difference); the format reference itself against bf16 "
            f"(what block FP8 costs on this model): {got}")


def row_line(r: Row) -> str:
    """One finished row, for stderr."""
    return "bench-hf: " + " | ".join(f"{c} {v}" for c, v in zip(COLUMNS, _cells(r), strict=True) if v not in ("", "-"))


def to_markdown(rows: list[Row], header: list[str]) -> str:
    lines = [*header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[Row], title: str) -> None:
    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("variant", "mode", "status", "note") else "right", overflow="fold")
    for r in rows:
        table.add_row(*_cells(r))
    Console(width=None if sys.stdout.isatty() else 180).print(table)


# -------------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="decoder shapes (default: llama on CUDA, tiny on CPU)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000 on CUDA, 512 on CPU)")
    p.add_argument("--batch", type=positive_ints, default=[1, 16], help="batch sizes, comma-separated")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32 on CUDA, 8 on CPU)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per call (default 64; CPU 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed generate calls per cell (default 3)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)} (CPU: eager only)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", default=None, help="write rows and environment as JSON to this path")
    p.add_argument("--markdown", default=None, help="write the table as Markdown to this path")


def _resolve(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the per-device defaults and check every value."""
    preset, layers, vocab, prompt_len, new_tokens, repeats = DEFAULTS[device.type]
    args.preset = args.preset or preset
    for name, default in (("layers", layers), ("vocab", vocab), ("prompt_len", prompt_len),
                          ("new_tokens", new_tokens), ("repeats", repeats)):
        value = getattr(args, name)
        value = default if value is None else value
        # Prompts draw token ids from 1..vocab-1 (0 pads): a vocabulary needs two tokens.
        least = 2 if name == "vocab" else 1
        if value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
        setattr(args, name, value)
    args.variants = parse_names(args.variants, DEFAULT_VARIANTS, VARIANTS, "--variants")
    if BF16 not in args.variants:
        raise ValueError("--variants must include bf16: speed-ups and logits are measured against it")
    # The bf16 row leads each group so the others can be compared with it.
    args.variants = [v for v in VARIANTS if v in args.variants]
    # generate() compiles only on accelerators, so on the CPU "compiled" would time the eager model again.
    args.modes = modes_on(device, args.modes, MODES)
    return args


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option spelled out)."""
    return (f"blockfp8 bench-hf --preset {args.preset} --layers {args.layers} --vocab {args.vocab} "
            f"--batch {','.join(map(str, args.batch))} --prompt-len {args.prompt_len} --new-tokens {args.new_tokens} "
            f"--repeats {args.repeats} --variants {','.join(args.variants)} --modes {','.join(args.modes)}")


def build_models(config, variants: list[str], device: torch.device) -> dict[str, nn.Module | BaseException]:
    """Each variant's model, or the exception that stopped it from being built."""
    models: dict[str, nn.Module | BaseException] = {BF16: build_bf16(config, device)}
    if HF_FP8 in variants or BLOCKFP8 in variants or FUSED in variants:
        fp8 = build_blockfp8(models[BF16])
        if HF_FP8 in variants:
            try:
                models[HF_FP8] = build_transformers_fp8(models[BF16], fp8)
            except Exception as e:  # noqa: BLE001 - reported in its rows
                models[HF_FP8] = e
        if BLOCKFP8 in variants:
            models[BLOCKFP8] = fp8
        if FUSED in variants:
            models[FUSED] = sharing_copy(fp8)
            hf.fuse_producers(models[FUSED])
    return models


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    hf.import_transformers()
    args = _resolve(args, device)
    small = device.type == "cpu"
    announce(f"bench-hf: generate() of a {args.preset} x{args.layers} model (vocab {args.vocab}), batch "
             f"{','.join(map(str, args.batch))}, {args.prompt_len}-token prompt + {args.new_tokens} new tokens, "
             f"median of {args.repeats}; variants {','.join(args.variants)}; modes {','.join(args.modes)}; on "
             f"{device.type}" + (" (CPU-sized)" if small else ""),
             "on a GPU, blockfp8 bench-hf (the llama preset at real width, eager and compiled; --layers 32 for "
             "Llama-3-8B's depth)" if small else None)
    env = environment(device)
    env["transformers"] = dist_version("transformers")
    print(environment_line(env) + f" | transformers {env['transformers']}")

    t0 = time.perf_counter()
    config = build_config(args.preset, args.layers, args.vocab)
    models = build_models(config, args.variants, device)
    synchronize(device)
    print(f"built {args.preset} x{args.layers} layers, vocab {args.vocab}, and its FP8 variants in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)

    settings = Settings(args.batch, args.prompt_len, args.new_tokens, args.repeats, args.modes, device)
    bounds: dict[int, tuple[float, float]] = {}
    rows = run_benchmark(models, args.vocab, settings, log=lambda line: print(line, file=sys.stderr), bounds=bounds)
    title = (f"generate() tokens/s, {args.preset} x{args.layers} layers, prompt {args.prompt_len} + "
             f"{args.new_tokens} new tokens, median of {args.repeats}")
    print_table(rows, title)
    fidelity = fidelity_line(bounds)
    print(fidelity)

    header = [f"# bench-hf: {title}", "", f"- environment: {environment_line(env)} | transformers "
              f"{env['transformers']}", f"- command: `{_command(args)}`", f"- {fidelity}"]
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "config": config.to_diff_dict(), "command": _command(args),
                       "settings": {k: v for k, v in asdict(settings).items() if k != "device"},
                       "tolerance": TOLERANCE, "format_bound": {str(b): v for b, v in bounds.items()},
                       "rows": [asdict(r) for r in rows]}, f, indent=1, default=str)
    return 0
