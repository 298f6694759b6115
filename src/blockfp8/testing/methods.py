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

from ..backends import Problem, Support, backend_names, get_backend
from ..dispatch import choose
from ..format import cdiv
from ..ops import gemm, linear
from ..quant import dequantize_weight
from .operands import Operands

BF16 = torch.bfloat16


def external_backends() -> tuple[str, ...]:
    """blockfp8 backends that wrap another library: they count as peers when ranking the dispatched op."""
    return tuple(b for b in backend_names() if get_backend(b).external)


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

    def availability(self) -> Support:
        return Support(True)

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

    def availability(self) -> Support:
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

    _checked: Support | None = None

    def availability(self) -> Support:
        if self._checked is None:
            self._checked = self._load() if torch.cuda.is_available() else Support(False, "no CUDA device")
        return self._checked

    def _load(self) -> Support:
        raise NotImplementedError

    def supports(self, p: Problem) -> Support:
        available = self.availability()
        if not available:
            return available
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

    def _load(self) -> Support:
        self._gemm, why = _import_first(TORCHAO_INFERENCE_GEMM)
        return Support(self._gemm is not None, why)

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

    def _load(self) -> Support:
        self._gemm, why = _import_first(((TORCHAO_TRAINING_KERNELS, "triton_fp8_gemm_1x128_128x128"),))
        return Support(self._gemm is not None, why)

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
    return kind == "peer" or (kind == "backend" and method_name in external_backends())
