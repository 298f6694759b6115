"""Everything ``blockfp8 bench`` times, behind one interface: blockfp8's backends, the dispatched op, and
outside peers (cuBLAS bf16, torchao's block-FP8 Triton GEMMs).

A ``Method`` says whether it is available here (with a reason when not), whether it supports a problem, and
``bind``s itself to one cell's ``Operands``: it returns the callable to time and one argument set per weight
copy (L2-cold rotation, see ``timing.py``). Any layout conversion a method needs (scale transposes, padding,
the bf16 weight) happens in ``bind``, once, outside the timed region. Optional packages are imported lazily,
so a missing torchao only marks its peers unavailable.

Two modes: ``"gemm"`` takes fp8 activations with their scales; ``"linear"`` takes the bf16 activation and
includes the method's own activation quantization.

torchao peers:

* ``torchao``: ``torchao.prototype.blockwise_fp8_training.kernels.triton_fp8_gemm_1x128_128x128`` (torchao
  0.15+), a 1x128 x 128x128 block-scaled Triton GEMM autotuned over 6 configs keyed on (N, K). Its autotune
  cache is cleared for each new M so every M gets its own best config (otherwise the config picked at the
  first M would be reused for all). Its scale pointers run past M and N in the last tile, so its scale
  tensors are given padded buffers.
* ``torchao-inference``: torchao's inference GEMM ``blockwise_fp8_gemm`` (the DeepSeek-V3 reference kernel;
  ``torchao.kernel.blockwise_quantization`` in 0.15-0.18, ``torchao.quantization...float8.kernels`` later).
  It autotunes 48 configs and compiles each anew for every (N, K, log2 M bucket), so its first call per cell
  is slow; it is not in the default peer set.

In linear mode both use torchao's activation quantizer ``fp8_blockwise_act_quant`` (one simple Triton kernel;
the training kernel's own quantizer autotunes 45 configs, compiled anew for every K). For ``torchao`` its row-major
scales are then transposed into the column-major layout the GEMM asserts, inside the timed call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .act_quant import empty_scales
from .backends import Problem, Support, backend_names, get_backend
from .dispatch import choose
from .ops import gemm, linear
from .quant import (
    cdiv,
    dequantize_activation,
    dequantize_weight,
    expand_block_scales,
    quantize_activation,
    quantize_weight,
)
from .timing import cold_copies, l2_cache_bytes

BF16 = torch.bfloat16
# blockfp8 backends that wrap another library: they count as peers when ranking the dispatched op.
EXTERNAL_BACKENDS = ("cublas", "deepgemm")


@dataclass
class Operands:
    """Inputs of one (N, K, M) cell. ``weights`` holds copies with equal values (rotated for L2-cold timing);
    the activation is shared by all calls, as a layer's input sits in L2 after the op that produced it."""

    x: torch.Tensor  # (M, K) bf16: the linear's input
    x_fp8: torch.Tensor  # (M, K) quantized by blockfp8's quantizer
    x_scale: torch.Tensor  # (M, Kb) fp32 row-major
    x_scale_col: torch.Tensor  # (M, Kb) fp32 column-major, TMA-aligned (act_quant.empty_scales "col")
    x_dequant: torch.Tensor  # (M, K) bf16 dequantized activation: the bf16 peer's input
    weights: list[tuple[torch.Tensor, torch.Tensor]]  # (w_fp8 (N, K), weight_scale_inv (Nb, Kb)) copies

    @property
    def mnk(self) -> tuple[int, int, int]:
        m, k = self.x.shape
        return m, self.weights[0][0].shape[0], k

    def scales(self, layout: str) -> torch.Tensor:
        if layout == "row":
            return self.x_scale
        if layout == "col":
            return self.x_scale_col
        raise ValueError(f"layout must be 'row' or 'col', got {layout!r}")


def weight_copy_bytes(n: int, k: int) -> int:
    """Bytes of one fp8 weight with its fp32 block scales."""
    return n * k + 4 * cdiv(n, 128) * cdiv(k, 128)


def make_weight_copies(n: int, k: int, device: torch.device | str, copies: int | None = None,
                       seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A random block-FP8 weight (block magnitudes spread over ~e^+-2, so a misapplied block scale shows as
    a large error) and ``copies`` copies of it; by default enough for L2-cold timing (1 off CUDA)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device, dtype=BF16)
    spread = torch.exp(torch.randn(cdiv(n, 128), cdiv(k, 128), generator=g, device=device))
    w.mul_(expand_block_scales(spread, (n, k), (128, 128)))
    wq, ws = quantize_weight(w)
    del w
    if copies is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            copies = cold_copies(weight_copy_bytes(n, k), l2_cache_bytes(device), free)
        else:
            copies = 1
    return [(wq, ws)] + [(wq.clone(), ws.clone()) for _ in range(copies - 1)]


def make_operands(weights: list[tuple[torch.Tensor, torch.Tensor]], m: int, seed: int = 1) -> Operands:
    """Random bf16 activations (per-token magnitudes spread) for ``weights``, quantized once."""
    w0 = weights[0][0]
    k, device = w0.shape[1], w0.device
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device)
    x = (x * torch.exp(torch.randn(m, 1, generator=g, device=device))).to(BF16)
    xq, xs = quantize_activation(x)
    col = empty_scales(m, xs.shape[1], "col", device)
    col.copy_(xs)
    return Operands(x, xq, xs, col, dequantize_activation(xq, xs, dtype=BF16), weights)


def reference_output(ops: Operands) -> torch.Tensor:
    """The fp32 ground truth for the cell (reference GEMM on the first weight copy)."""
    from .reference import reference_gemm

    w, s = ops.weights[0]
    return reference_gemm(ops.x_fp8, ops.x_scale, w, s, out_dtype=torch.float32)


@dataclass
class Bound:
    """A method bound to one cell: time ``fn(*args)`` for ``args`` in ``arg_sets`` (one per weight copy)."""

    fn: Callable[..., torch.Tensor]
    arg_sets: list[tuple]


class Method:
    """One timed implementation. ``kind`` is "backend", "dispatch" or "peer"."""

    name: str = ""
    kind: str = "peer"
    # True when both modes run the same computation (bf16 matmul): timed once, reported for both.
    mode_independent: bool = False

    def availability(self) -> tuple[bool, str]:
        return True, ""

    def supports(self, p: Problem) -> Support:
        return Support(True)

    def bind(self, mode: str, ops: Operands) -> Bound:
        raise NotImplementedError

    def label(self, p: Problem) -> str:
        return self.name


def _per_copy(ops: Operands, fn: Callable, make: Callable[[torch.Tensor, torch.Tensor], tuple]) -> Bound:
    return Bound(fn, [make(w, s) for w, s in ops.weights])


def _check_mode(mode: str) -> None:
    if mode not in ("gemm", "linear"):
        raise ValueError(f"mode must be 'gemm' or 'linear', got {mode!r}")


class BackendMethod(Method):
    """A blockfp8 backend called directly (gemm) or forced through ``blockfp8.linear(backend=...)``."""

    kind = "backend"

    def __init__(self, name: str) -> None:
        self.name = name
        self.backend = get_backend(name)

    def availability(self) -> tuple[bool, str]:
        return self.backend.availability()

    def supports(self, p: Problem) -> Support:
        return self.backend.supports(p)

    def bind(self, mode: str, ops: Operands) -> Bound:
        _check_mode(mode)
        be, name = self.backend, self.name
        if mode == "gemm":
            xs = ops.scales(be.scale_layout)
            return _per_copy(ops, lambda xq, xsc, w, s: be.run(xq, xsc, w, s, None, BF16),
                             lambda w, s: (ops.x_fp8, xs, w, s))
        return _per_copy(ops, lambda x, w, s: linear(x, w, s, backend=name), lambda w, s: (ops.x, w, s))


class DispatchMethod(Method):
    """The public ops with the dispatcher choosing: ``blockfp8.gemm`` / ``blockfp8.linear``."""

    name = "blockfp8"
    kind = "dispatch"

    def choice(self, p: Problem) -> str:
        return choose(p)

    def supports(self, p: Problem) -> Support:
        try:
            self.choice(p)
        except ValueError as e:
            return Support(False, str(e))
        return Support(True)

    def label(self, p: Problem) -> str:
        return f"{self.name}->{self.choice(p)}"

    def bind(self, mode: str, ops: Operands) -> Bound:
        _check_mode(mode)
        if mode == "gemm":
            m, n, k = ops.mnk
            # The scales come in the layout the chosen backend reads, as a model feeding gemm() would keep them.
            layout = get_backend(self.choice(Problem.of(m, n, k, ops.x.device))).scale_layout
            xs = ops.scales(layout)
            return _per_copy(ops, lambda xq, xsc, w, s: gemm(xq, xsc, w, s), lambda w, s: (ops.x_fp8, xs, w, s))
        return _per_copy(ops, lambda x, w, s: linear(x, w, s), lambda w, s: (ops.x, w, s))


class Bf16Peer(Method):
    """cuBLAS bf16 (``torch.matmul``) on the dequantized activation and weight: the unquantized baseline.

    Its input is the dequantized activation in both modes, so its error against the block-FP8 reference is
    only bf16 rounding; it has no quantization step, so its linear time equals its GEMM time."""

    name = "bf16"
    mode_independent = True

    def bind(self, mode: str, ops: Operands) -> Bound:
        _check_mode(mode)
        w0 = dequantize_weight(*ops.weights[0], dtype=BF16)
        copies = [w0] + [w0.clone() for _ in ops.weights[1:]]
        return Bound(lambda x, w: torch.matmul(x, w.t()), [(ops.x_dequant, w) for w in copies])


def _import_first(candidates: tuple[tuple[str, str], ...]) -> tuple[Callable | None, str]:
    """The first importable ``module.attr`` of ``candidates`` (or None and why not)."""
    errors = []
    for module, attr in candidates:
        try:
            return getattr(importlib.import_module(module), attr), ""
        except Exception as e:  # noqa: BLE001 - an optional package may fail to import in any way
            errors.append(f"{module}.{attr}: {type(e).__name__}: {e}")
    return None, "; ".join(errors)


TORCHAO_ACT_QUANT = (
    ("torchao.prototype.blockwise_fp8_inference", "fp8_blockwise_act_quant"),
    ("torchao.kernel.blockwise_quantization", "fp8_blockwise_act_quant"),
)
TORCHAO_INFERENCE_GEMM = (
    ("torchao.kernel.blockwise_quantization", "blockwise_fp8_gemm"),
    ("torchao.prototype.blockwise_fp8_inference", "blockwise_fp8_gemm"),
    ("torchao.quantization.quantize_.workflows.float8.kernels", "_blockwise_fp8_gemm"),
)
TORCHAO_TRAINING_KERNELS = "torchao.prototype.blockwise_fp8_training.kernels"


class _TorchaoPeer(Method):
    """Shared parts of the torchao peers: CUDA only, K % 128 == 0 (its quantizer asserts it, and the training
    GEMM masks K only in whole 128-groups), lazy imports."""

    _checked: tuple[bool, str] | None = None

    def availability(self) -> tuple[bool, str]:
        if self._checked is None:
            if not torch.cuda.is_available():
                self._checked = (False, "no CUDA device")
            else:
                self._checked = self._load()
        return self._checked

    def _load(self) -> tuple[bool, str]:
        raise NotImplementedError

    def supports(self, p: Problem) -> Support:
        ok, why = self.availability()
        if not ok:
            return Support(False, why)
        if p.k % 128:
            return Support(False, f"needs K % 128 == 0, got K={p.k}")
        if p.out_dtype != BF16:
            return Support(False, f"bf16 output only, got {p.out_dtype}")
        return Support(True)

    def _act_quant(self) -> Callable:
        fn, why = _import_first(TORCHAO_ACT_QUANT)
        if fn is None:
            raise RuntimeError(f"torchao activation quantizer not found: {why}")
        return fn


class TorchaoInferencePeer(_TorchaoPeer):
    name = "torchao-inference"

    def _load(self) -> tuple[bool, str]:
        self._gemm, why = _import_first(TORCHAO_INFERENCE_GEMM)
        return (self._gemm is not None), why

    def bind(self, mode: str, ops: Operands) -> Bound:
        _check_mode(mode)
        g = self._gemm
        if mode == "gemm":
            # Row-major (M, Kb) activation scales and (Nb, Kb) weight scales, all contiguous: the blockfp8 layout.
            return _per_copy(ops, lambda xq, xs, w, s: g(xq, xs, w, s, 128),
                             lambda w, s: (ops.x_fp8, ops.x_scale, w, s))
        quant = self._act_quant()

        def run(x, w, s):
            xq, xs = quant(x, 128)
            return g(xq, xs, w, s, 128)

        return _per_copy(ops, run, lambda w, s: (ops.x, w, s))


def _padded_col_scales(xs: torch.Tensor, pad: int = 256) -> torch.Tensor:
    """(M, Kb) scales column-major in a buffer padded to a multiple of ``pad`` rows (the largest tile), so a
    kernel that reads scales of masked-off rows stays inside the allocation."""
    m, kb = xs.shape
    # Uninitialized padding: it only scales rows the kernel masks off when storing.
    buf = torch.empty(kb, cdiv(max(m, 1), pad) * pad, dtype=torch.float32, device=xs.device)
    buf[:, :m] = xs.t()
    return buf.t()[:m]


def _padded_weight_scales_t(ws: torch.Tensor, pad_blocks: int = 2) -> torch.Tensor:
    """(Kb, Nb) column-major view of (Nb, Kb) weight scales, with ``pad_blocks`` spare rows behind the last
    block row (a 256-wide tile at the N tail reads up to two block rows past Nb)."""
    nb, kb = ws.shape
    buf = torch.ones(nb + pad_blocks, kb, dtype=torch.float32, device=ws.device)
    buf[:nb] = ws
    return buf[:nb].t()


class TorchaoPeer(_TorchaoPeer):
    name = "torchao"

    def __init__(self) -> None:
        self._tuned_for: tuple[int, int, int] | None = None

    def _load(self) -> tuple[bool, str]:
        self._gemm, why = _import_first(((TORCHAO_TRAINING_KERNELS, "triton_fp8_gemm_1x128_128x128"),))
        return (self._gemm is not None), why

    def _retune(self, mnk: tuple[int, int, int]) -> None:
        # The autotuner keys on (N, K) only; forget its pick when M changes so each M gets its best config.
        if mnk == self._tuned_for:
            return
        kernels = importlib.import_module(TORCHAO_TRAINING_KERNELS)
        cache = getattr(getattr(kernels, "triton_fp8_gemm_1x128_128x128_kernel", None), "cache", None)
        if isinstance(cache, dict):
            cache.clear()
        self._tuned_for = mnk

    def bind(self, mode: str, ops: Operands) -> Bound:
        _check_mode(mode)
        self._retune(ops.mnk)
        g = self._gemm
        copies = [(w, _padded_weight_scales_t(s)) for w, s in ops.weights]
        if mode == "gemm":
            xs = _padded_col_scales(ops.x_scale)
            return Bound(lambda xq, xsc, w, st: g(xq, w.t(), xsc, st, 128, BF16),
                         [(ops.x_fp8, xs, w, st) for w, st in copies])
        quant = self._act_quant()

        def run(x, w, st):
            xq, xs = quant(x, 128)
            return g(xq, w.t(), _padded_col_scales(xs), st, 128, BF16)

        return Bound(run, [(ops.x, w, st) for w, st in copies])


PEERS: dict[str, Callable[[], Method]] = {
    "bf16": Bf16Peer,
    "torchao": TorchaoPeer,
    "torchao-inference": TorchaoInferencePeer,
}


def methods_for(backends: list[str], peers: list[str], dispatched: bool = True) -> list[Method]:
    """Method objects for the named backends, the dispatched op (optional) and the named peers."""
    out: list[Method] = []
    for name in backends:
        if name not in backend_names():
            raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(backend_names())}")
        out.append(BackendMethod(name))
    if dispatched:
        out.append(DispatchMethod())
    for name in peers:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; known peers: {', '.join(PEERS)}")
        out.append(PEERS[name]())
    return out


def counts_as_peer(method_name: str, kind: str) -> bool:
    """Whether a method is an outside implementation the dispatched op is compared against: the peers and
    the backends that wrap another library (cuBLAS, DeepGEMM); not blockfp8's own kernels."""
    return kind == "peer" or (kind == "backend" and method_name in EXTERNAL_BACKENDS)
