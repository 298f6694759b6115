"""Public functional API: ``gemm`` (fp8 in) and ``linear`` (float in), both routed by the dispatcher.

Both are ``torch.library`` custom ops (``torch.ops.blockfp8.gemm`` / ``torch.ops.blockfp8.linear``) with fake
implementations, so ``torch.compile(fullgraph=True)`` and ``torch.export`` treat them as single opaque nodes: the
dispatcher runs inside the op with concrete shapes, never in traced code, and CUDA-graph capture records whatever
kernels it picked. ``linear`` has an autograd formula for its input (and bias): the fp8 weight is frozen, so
adapters can be trained on top of an FP8 base, eagerly or compiled.

The eager path. Calling a custom op costs tens of microseconds of host time in its wrapper (40 us measured on an
H200, docs/performance.md), which a plain eager call -- no tracing, no autograd, no tensor subclass or mode --
does not need: there ``gemm``/``linear`` run the same implementation directly. And the work that does not depend
on the activation (backend choice, launch config, weight descriptor, weight-side checks) is done once per
(weight, M) and kept in a ``LinearPlan``: ``Fp8BlockLinear`` holds its plans, the functional API keeps a small
cache. A plan is rebuilt when the weight tensors are replaced, the device or dtype changes, a forced backend
changes, or the dispatcher's tables change; its results are bit-identical to the op's.

The op is assembled here: the dispatcher names a backend, and ``quantize_for`` picks the activation quantizer
that writes the scale layout that backend reads.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

from .backends import Backend, Problem, get_backend
from .device import current_raw_stream
from .dispatch import ENV_VAR, Operands, check_backend_name, choose, generation
from .format import FLOAT_DTYPES, is_decode
from .quant import QuantizedActivation, dequantize_weight, quantize_activation
from .timer import capture_graph
from .validate import check_gemm_input, check_linear_input


def _rows(shape: torch.Size) -> int:
    return math.prod(shape[:-1])


def _pick(m: int, n: int, k: int, device: torch.device, out_dtype: torch.dtype, backend: str | None,
          operands: Operands | None = None) -> Backend:
    return get_backend(choose(Problem.of(m, n, k, device, out_dtype), backend or None, operands))


def quantize_for(be: Backend, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize 2-D float ``x`` per 1x128 group straight into the scale layout ``be`` reads: the fused Triton
    quantizer on CUDA, the torch quantizer elsewhere (both bit-identical)."""
    if x.is_cuda:
        # Imported on first CUDA use, like every kernel module: Triton reads TRITON_INTERPRET when a kernel is
        # defined, and the command line sets it (on machines without a GPU) after `import blockfp8`.
        from .backends.triton.act_quant import quantize_activation_fused

        return quantize_activation_fused(x, layout=be.scale_layout)
    return quantize_activation(x)


def _linear_operands(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> Operands:
    return lambda: (*quantize_activation(x.reshape(-1, x.shape[-1])), weight, weight_scale_inv)


def _gemm_operands(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                   weight_scale_inv: torch.Tensor) -> Operands:
    k = x_fp8.shape[-1]
    return lambda: (x_fp8.reshape(-1, k).contiguous(), x_scale.reshape(-1, x_scale.shape[-1]), weight,
                    weight_scale_inv)


class LinearPlan:
    """One weight's GEMM at M rows, everything decided that does not depend on the activation: the backend, its
    bound launch (``Backend.plan``) and, for ``linear``, the quantizer's scale layout.

    ``linear`` takes float activations, ``gemm`` fp8 activations with their scales.
    """

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, m: int, backend: str | None, operands: Operands | None = None) -> None:
        n, k = weight.shape
        self.weight, self.weight_scale_inv, self.bias = weight, weight_scale_inv, bias
        self.m, self.n, self.out_dtype = m, n, out_dtype
        # ``operands`` (built only if online tuning measures this cell, on its first call) are this call's.
        self.backend = _pick(m, n, k, weight.device, out_dtype, backend, operands)
        self.launch = self.backend.plan(weight, weight_scale_inv, bias, out_dtype, m)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """y [..., N] for float x [..., K] with M rows."""
        x2 = x.reshape(self.m, -1)
        graphed = self._graphed(x2)
        y = graphed(x2) if graphed is not None else self._linear2d(x2)
        return y.reshape(*x.shape[:-1], self.n)

    def _linear2d(self, x2: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_for(self.backend, x2)
        return self.launch(xq, xs)

    def _graphed(self, x2: torch.Tensor) -> GraphedLinear | None:
        """The plan's CUDA graph for eager decode calls (built on first use), or None where it does not apply."""
        if not (GraphedLinear.enabled and x2.is_cuda and is_decode(self.m) and self.backend.capturable):
            return None
        if torch.cuda.is_current_stream_capturing():  # the caller's graph records the plain launches
            return None
        stream = current_raw_stream(x2.device.index)
        graphed = self.__dict__.get("_graph")
        if graphed is None or graphed.stream != stream:
            graphed = self._graph = GraphedLinear.build(self._linear2d, x2, stream)
        return graphed if graphed.ok else None

    def gemm(self, x_fp8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """y [..., N] for fp8 x_fp8 [..., K] with M rows and its scales [..., Kb]."""
        # cuBLAS and DeepGEMM need x row-major; a strided x_fp8 is copied (M*K bytes, what they read anyway).
        x2 = x_fp8.reshape(self.m, -1).contiguous()
        return self.launch(x2, x_scale.reshape(self.m, -1)).reshape(*x_fp8.shape[:-1], self.n)


class GraphedLinear:
    """A decode-size linear (quantizer + GEMM) captured once into a CUDA graph and replayed for eager calls.

    An eager decode step is host-bound: each launch costs host time (Triton's compiled-kernel launcher: 8-16 us
    per kernel on an H200), and a linear is two launches plus allocations, against 15.5 us for ``F.linear`` in
    bf16. A replay costs one graph launch. Per call: copy the activation into the graph's input buffer, replay,
    and return a copy of the graph's output buffer (the next replay overwrites it, so it is never handed out).
    Graphs of one (device, stream) share one memory pool: their temporaries are dead once a replay's output is
    copied, and replays on one stream never overlap. Not used while a graph is being captured (the caller's own
    graph records the plain launches), nor under the interpreter; ``BLOCKFP8_EAGER_GRAPHS=0`` turns it off.
    """

    _pools: dict[tuple, object] = {}
    # BLOCKFP8_EAGER_GRAPHS=0 launches directly; cleared for the process after a capture fails (see build).
    enabled = os.environ.get("BLOCKFP8_EAGER_GRAPHS", "1") != "0"

    def __init__(self, stream: int, ok: bool, graph=None, x: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> None:
        self.stream, self.ok, self.graph, self.x, self.out = stream, ok, graph, x, out

    @classmethod
    def build(cls, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, stream: int) -> GraphedLinear:
        x = example.contiguous().clone()
        # A shared pool lives as long as a graph captured into it: once all are freed (their layers gone), torch
        # frees the pool and its handle must not be reused, so a new one is made.
        pool, members = cls._pools.get((x.device.index, stream), (None, None))
        if not members:
            pool, members = torch.cuda.graph_pool_handle(), weakref.WeakSet()
            cls._pools[(x.device.index, stream)] = (pool, members)
        try:
            # The warm-up call compiles and fills every cache outside the capture.
            graph, out = capture_graph(lambda: fn(x), warmup=1, pool=pool, thread_local=True)
        except RuntimeError as e:
            # A failed capture can leave torch's CUDA state (its RNG's capture bookkeeping) unusable for further
            # captures: stop trying for the rest of the process and say so once.
            cls.enabled = False
            warnings.warn(f"blockfp8: capturing an eager linear into a CUDA graph failed ({type(e).__name__}: {e}); "
                          "eager calls launch their kernels directly from now on", RuntimeWarning, stacklevel=2)
            return cls(stream, False)
        graphed = cls(stream, True, graph, x, out)
        members.add(graphed)
        return graphed

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x2)
        self.graph.replay()
        return self.out.clone()


def plan_key(x: torch.Tensor, out_dtype: torch.dtype, m: int, backend: str | None, quantize: bool) -> tuple:
    """Everything besides the weight tensors that a ``LinearPlan`` depends on. The environment override and the
    dispatcher's generation are read per call, so forcing a backend or installing a table takes effect at once."""
    return (m, x.device, x.dtype, out_dtype, backend or os.environ.get(ENV_VAR), generation(), quantize)


class PlanCache:
    """A bounded map from (weight tensors, ``plan_key``) to ``LinearPlan``: the plans of one ``Fp8BlockLinear``
    (whose weight tensors are fixed until replaced), or the functional API's cache over any weights.

    Entries hold the weight tensors weakly: a plan never keeps a freed weight alive, and a new tensor that reuses
    a freed one's id never gets its plan. At most ``size`` plans, least recently used dropped first (decode uses
    up to 64 token counts per layer; prefill adds one per new sequence length).
    """

    def __init__(self, size: int = 80) -> None:
        self.size = size
        self._plans: OrderedDict[tuple, tuple[tuple, LinearPlan]] = OrderedDict()

    def get(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None, key: tuple,
            build: Callable[[], LinearPlan]) -> LinearPlan:
        tensors = (weight, weight_scale_inv, bias)
        full = (*(id(t) for t in tensors), *key)
        hit = self._plans.get(full)
        if hit is not None and all(r() is t for r, t in zip(hit[0], tensors, strict=True) if r is not None):
            self._plans.move_to_end(full)
            return hit[1]
        plan = build()
        self._plans[full] = (tuple(weakref.ref(t) if t is not None else None for t in tensors), plan)
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)
        return plan

    def __deepcopy__(self, memo: dict) -> PlanCache:
        # A copied layer has copied weights: it builds its own plans.
        return PlanCache(self.size)

    def __reduce__(self):
        return PlanCache, (self.size,)


_FUNCTIONAL_PLANS = PlanCache(size=256)


def can_skip_op(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may run the implementation directly instead of through its custom op: plain tensors,
    nothing being traced or compiled, no autograd needed, no torch function or dispatch mode active (those are
    what the op's registration serves)."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch.jit.is_tracing():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    # Meta tensors (shape propagation) go through the op's fake implementation.
    return tensors[0].device.type in ("cuda", "cpu")


@torch.library.custom_op("blockfp8::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    n, k = weight.shape
    m = _rows(x.shape)
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    return LinearPlan(weight, weight_scale_inv, bias, x.dtype, m, backend or None,
                      _linear_operands(x, weight, weight_scale_inv)).linear(x)


@_linear_op.register_fake
def _linear_fake(x, weight, weight_scale_inv, bias, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, weight_scale_inv, bias, _ = inputs
    ctx.save_for_backward(weight, weight_scale_inv)
    ctx.bias_grad = bias is not None and bias.requires_grad


def _linear_backward(ctx, grad: torch.Tensor):
    # The fp8 weight is frozen: only the input (and a trainable bias) get gradients. dL/dx = dL/dy @ W, with W
    # the dequantized weight in the gradient's dtype (one (N, K) temporary per backward).
    weight, weight_scale_inv = ctx.saved_tensors
    grad_x = grad @ dequantize_weight(weight, weight_scale_inv, dtype=grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
    return grad_x, None, None, grad_bias, None


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("blockfp8::gemm", mutates_args=())
def _gemm_op(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    n, k = weight.shape
    m = _rows(x_fp8.shape)
    if m == 0:
        return x_fp8.new_empty(*x_fp8.shape[:-1], n, dtype=out_dtype)
    return LinearPlan(weight, weight_scale_inv, bias, out_dtype, m, backend or None,
                      _gemm_operands(x_fp8, x_scale, weight, weight_scale_inv)).gemm(x_fp8, x_scale)


@_gemm_op.register_fake
def _gemm_fake(x_fp8, x_scale, weight, weight_scale_inv, bias, out_dtype, backend):
    return x_fp8.new_empty(*x_fp8.shape[:-1], weight.shape[0], dtype=out_dtype)


def _linear_planned(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                    bias: torch.Tensor | None, backend: str | None, plans: PlanCache,
                    check_weights: bool) -> torch.Tensor:
    """``linear`` for a checked ``x``: through ``plans`` when the op may be skipped, else through the op.
    ``check_weights``: the weight side is not checked yet; a new plan checks it before it is built (reused plans
    were checked then)."""
    m = _rows(x.shape)
    if m == 0 or not can_skip_op(x, bias):
        if check_weights:
            check_linear_input(x, weight, weight_scale_inv, bias)
        return _linear_op(x, weight, weight_scale_inv, bias, backend or "")

    def build() -> LinearPlan:
        if check_weights:
            check_linear_input(x, weight, weight_scale_inv, bias)
        return LinearPlan(weight, weight_scale_inv, bias, x.dtype, m, backend,
                          _linear_operands(x, weight, weight_scale_inv))

    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        # A choice made while a caller captures a graph is the static one (nothing is timed inside a capture):
        # used for this capture, never kept for later eager calls.
        return build().linear(x)
    return plans.get(weight, weight_scale_inv, bias, plan_key(x, x.dtype, m, backend, True), build).linear(x)


def layer_linear(x: object, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 backend: str | None, plans: PlanCache) -> torch.Tensor:
    """``linear`` as a layer calls it, with the plans it keeps: per call, only the activation is checked (type,
    dtype, K, device); the weight side is checked when a plan is built. A ``QuantizedActivation`` goes to
    ``gemm`` as in ``linear``."""
    if isinstance(x, QuantizedActivation):
        return gemm(x.values, x.scales, weight, weight_scale_inv, bias=bias, out_dtype=x.dtype, backend=backend)
    if (type(x) is not torch.Tensor or x.dtype not in FLOAT_DTYPES or x.dim() < 1
            or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or x.shape[-1] != weight.shape[1]
            or x.device != weight.device):
        check_linear_input(x, weight, weight_scale_inv, bias)  # raises the error that names the problem
    return _linear_planned(x, weight, weight_scale_inv, bias, backend, plans, check_weights=True)


def gemm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
) -> torch.Tensor:
    """y[..., N] = dequant(x_fp8, x_scale) @ dequant(w_fp8, weight_scale_inv).T (+ bias), in ``out_dtype``.

    ``x_fp8`` is [..., K] float8_e4m3fn with fp32 ``x_scale`` [..., ceil(K/128)]; ``w_fp8`` is (N, K) with
    fp32 ``weight_scale_inv`` (ceil(N/128), ceil(K/128)). ``backend=None`` lets the dispatcher choose.
    """
    check_gemm_input(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype)
    check_backend_name(backend)
    m = _rows(x_fp8.shape)
    if m == 0 or not can_skip_op(x_fp8, x_scale, bias):
        return _gemm_op(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, backend or "")
    key = plan_key(x_fp8, out_dtype, m, backend, False)
    if x_fp8.is_cuda and torch.cuda.is_current_stream_capturing():  # not kept: see _linear_planned
        return LinearPlan(w_fp8, weight_scale_inv, bias, out_dtype, m, backend).gemm(x_fp8, x_scale)
    plan = _FUNCTIONAL_PLANS.get(w_fp8, weight_scale_inv, bias, key, lambda: LinearPlan(
        w_fp8, weight_scale_inv, bias, out_dtype, m, backend,
        _gemm_operands(x_fp8, x_scale, w_fp8, weight_scale_inv)))
    return plan.gemm(x_fp8, x_scale)


def linear(
    x: torch.Tensor | QuantizedActivation,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Block-FP8 linear layer: quantize x [..., K] per 1x128 group, GEMM with the fp8 weight, add bias.

    The output has x's dtype (bf16, fp16 or fp32). ``backend=None`` lets the dispatcher choose. A
    ``QuantizedActivation`` (from a fused producer, ``blockfp8.fused``) skips the quantization: its values and
    scales go straight to the GEMM, and the output has its original dtype.
    """
    if isinstance(x, QuantizedActivation):
        return gemm(x.values, x.scales, weight, weight_scale_inv, bias=bias, out_dtype=x.dtype, backend=backend)
    check_linear_input(x, weight, weight_scale_inv, bias)
    check_backend_name(backend)
    return _linear_planned(x, weight, weight_scale_inv, bias, backend, _FUNCTIONAL_PLANS, check_weights=False)


__all__ = ["LinearPlan", "PlanCache", "can_skip_op", "gemm", "linear", "layer_linear", "quantize_for"]
