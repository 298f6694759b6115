"""Public functional API: ``gemm`` (fp8 in) and ``linear`` (float in), both routed by the dispatcher.

One path for every entry. The work that does not depend on the activation (backend choice, launch config,
grid, workspace size, weight-side checks) is done once per (weight tensors, M, dtypes) and kept in a
``LinearPlan``; plans live in one ``PlanRegistry``, keyed by the weight tensor, for as long as it lives. Every
entry looks its plan up there and calls it:

* a plain eager call (``Fp8BlockLinear.forward``, ``linear``, ``gemm``) calls the plan directly; an eager
  decode-size ``linear`` replays the plan's CUDA graph (``GraphedLinear``), since launching two kernels from
  Python costs more host time than a replay;
* with autograd on, an eager call goes through ``_LinearFn`` (a ``torch.autograd.Function``) around the same
  plan: the custom op's wrapper costs tens of microseconds a call, the Function a few;
* ``torch.compile``, ``torch.export``, tensor subclasses and dispatch modes see the ``torch.library`` custom ops
  ``torch.ops.blockfp8.linear`` / ``torch.ops.blockfp8.gemm`` (fake implementations give output shapes;
  ``linear`` has an autograd formula for its input and bias). Inside, at run time, the op looks up the same plan
  and launches its kernels directly.

What a call allocates, it returns or frees: a plan holds no tensor, and a Triton split-K GEMM takes its counters
from a per-call workspace that the activation quantizer zeroes in the same launch (``GemmPlan.counters``). So a
capture -- a caller's ``torch.cuda.graph``, or the CUDA graphs of ``torch.compile(mode="reduce-overhead")``,
whose cudagraph trees refuse memory left in their pool that is not a graph output -- records only the
quantizer and the GEMM, and keeps nothing alive. Plans are built outside captures: the first call of a shape
inside a capture gets a plan for that capture only (the static choice; nothing is timed inside a capture).

The fp8 weight is frozen: only the input (and a trainable bias) get gradients, so adapters can be trained on top
of an FP8 base, eagerly or compiled.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .backends import Backend, Problem, get_backend
from .backends.base import GemmPlan
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


def _triton_runs_on(x: torch.Tensor) -> bool:
    # Read per call: the command line sets TRITON_INTERPRET (CPU machines) after `import blockfp8`.
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def quantize_for(be: Backend, x: torch.Tensor, zero: torch.Tensor | None = None,
                 zero_count: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize 2-D float ``x`` per 1x128 group straight into the scale layout ``be`` reads: the Triton
    quantizer on CUDA (and on CPU for the Triton backend under the interpreter), the torch quantizer elsewhere
    (both bit-identical). ``zero``/``zero_count``: int32 counters of the next GEMM to zero on the way."""
    if x.is_cuda or (be.name == "triton" and _triton_runs_on(x)):
        # Imported on first use, like every kernel module: Triton reads TRITON_INTERPRET when a kernel is
        # defined, and the command line sets it (on machines without a GPU) after `import blockfp8`.
        from .backends.triton.act_quant import quantize_activation_fused

        return quantize_activation_fused(x, layout=be.scale_layout, zero=zero, zero_count=zero_count)
    if zero is not None and zero_count:
        zero[:zero_count].zero_()
    return quantize_activation(x)


def _linear_operands(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> Operands:
    return lambda: (*quantize_activation(x.reshape(-1, x.shape[-1])), weight, weight_scale_inv)


def _gemm_operands(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                   weight_scale_inv: torch.Tensor) -> Operands:
    k = x_fp8.shape[-1]
    return lambda: (x_fp8.reshape(-1, k).contiguous(), x_scale.reshape(-1, x_scale.shape[-1]), weight,
                    weight_scale_inv)


def _scales_2d(x_scale: torch.Tensor, m: int) -> torch.Tensor:
    """(M, Kb) scales with their strides kept: a "col" tensor stays column-major, also at M=1, where a reshape
    may give the size-1 dimension any stride and DeepGEMM would then transpose it again (a kernel per call)."""
    s = x_scale if x_scale.dim() == 2 else x_scale.reshape(m, -1)
    if m == 1 and s.stride(0) != 1 and s.stride(1) != 1:
        s = s.as_strided((1, s.shape[1]), (1, s.stride(1)))
    return s


class LinearPlan:
    """One weight's GEMM at M rows, everything decided that does not depend on the activation: the backend
    and its ``GemmPlan``. Holds no tensor: every call passes the weight, its scales and the bias.

    ``linear`` takes float activations, ``gemm`` fp8 activations with their scales. ``keep``: False for a plan
    made while a CUDA graph is being captured (used for that capture only).
    """

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, m: int, backend: str | None, operands: Operands | None = None) -> None:
        n, k = weight.shape
        self.m, self.n, self.out_dtype = m, n, out_dtype
        self.keep = not (weight.is_cuda and torch.cuda.is_current_stream_capturing())
        # ``operands`` (built only if online tuning measures this cell, on its first call) are this call's.
        self.backend = _pick(m, n, k, weight.device, out_dtype, backend, operands if self.keep else None)
        self.launch: GemmPlan = self.backend.plan(weight, weight_scale_inv, bias, out_dtype, m)
        self.graphs: dict[tuple[int, int], GraphedLinear] = {}

    def run_linear(self, x2: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
        """y (M, N) for 2-D float x2: the quantizer (zeroing the GEMM's counters) and the GEMM, launched."""
        launch = self.launch
        work = launch.workspace(x2.device) if launch.counters else None
        xq, xs = quantize_for(self.backend, x2, work, launch.counters)
        return launch(xq, xs, weight, weight_scale_inv, bias, work)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None, graphs: bool = True) -> torch.Tensor:
        """y [..., N] for float x [..., K] with M rows; ``graphs``: an eager call, which may replay a graph."""
        flat = x.dim() == 2  # the common case: no reshape either way (each costs a microsecond of host time)
        x2 = x if flat else x.reshape(self.m, -1)
        graphed = self._graphed(x2, weight, weight_scale_inv, bias) if graphs else None
        y = graphed(x2) if graphed is not None else self.run_linear(x2, weight, weight_scale_inv, bias)
        return y if flat else y.reshape(*x.shape[:-1], self.n)

    def _graphed(self, x2: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                 bias: torch.Tensor | None) -> GraphedLinear | None:
        """The CUDA graph of this plan for the calling thread and stream (built on first use), or None where
        eager graphs do not apply."""
        if not (GraphedLinear.enabled and x2.is_cuda and self.keep and is_decode(self.m)
                and self.backend.capturable):
            return None
        if torch.cuda.is_current_stream_capturing():  # the caller's graph records the plain launches
            return None
        where = (current_raw_stream(x2.device.index), threading.get_ident())
        ptrs = (weight.data_ptr(), weight_scale_inv.data_ptr(), 0 if bias is None else bias.data_ptr())
        graphed = self.graphs.get(where)
        # A graph reads the tensors' memory it was captured with: rebuilt if one was given new storage.
        if graphed is None or graphed.ptrs != ptrs:
            graphed = self.graphs[where] = GraphedLinear.build(
                lambda x: self.run_linear(x, weight, weight_scale_inv, bias), x2, where[0], ptrs)
        return graphed if graphed.ok else None

    def gemm(self, x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
             weight_scale_inv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y [..., N] for fp8 x_fp8 [..., K] with M rows and its scales [..., Kb]."""
        # cuBLAS and DeepGEMM need x row-major; a strided x_fp8 is copied (M*K bytes, what they read anyway).
        x2 = x_fp8.reshape(self.m, -1).contiguous()
        y = self.launch(x2, _scales_2d(x_scale, self.m), weight, weight_scale_inv, bias)
        return y.reshape(*x_fp8.shape[:-1], self.n)


class GraphedLinear:
    """A decode-size linear (quantizer + GEMM) captured once into a CUDA graph and replayed for eager calls.

    An eager decode step is host-bound: two kernel launches from Python plus their allocations cost more host
    time than one replay. Per call: copy the activation into the graph's input buffer, replay, and return a
    copy of the graph's output buffer (the next replay overwrites it, so it is never handed out). One graph per
    (plan, stream, thread): two threads never share a buffer. Graphs of one (device, stream) share one memory
    pool: their temporaries are dead once a replay's output is copied, and replays on one stream never overlap.
    Not used while a graph is being captured (the caller's own graph records the plain launches), inside the
    custom ops (``torch.compile``'s graphs record the plain launches), nor under the interpreter;
    ``BLOCKFP8_EAGER_GRAPHS=0`` turns it off.
    """

    _pools: dict[tuple, object] = {}
    # BLOCKFP8_EAGER_GRAPHS=0 launches directly; cleared for the process after a capture fails (see build).
    enabled = os.environ.get("BLOCKFP8_EAGER_GRAPHS", "1") != "0"

    def __init__(self, ok: bool, ptrs: tuple[int, ...] = (), graph=None, x: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> None:
        self.ok, self.ptrs, self.graph, self.x, self.out = ok, ptrs, graph, x, out

    @classmethod
    def build(cls, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, stream: int,
              ptrs: tuple[int, ...]) -> GraphedLinear:
        # Normal tensors even when the first call runs under inference_mode: a later call outside it copies
        # into the input buffer, which an inference tensor refuses.
        with torch.inference_mode(False), torch.no_grad():
            x = torch.empty_like(example, memory_format=torch.contiguous_format).copy_(example)
            # A shared pool lives as long as a graph captured into it: once all are freed (their layers gone),
            # torch frees the pool and its handle must not be reused, so a new one is made.
            pool, members = cls._pools.get((x.device.index, stream), (None, None))
            if not members:
                pool, members = torch.cuda.graph_pool_handle(), weakref.WeakSet()
                cls._pools[(x.device.index, stream)] = (pool, members)
            try:
                # The warm-up call compiles and fills every cache outside the capture.
                graph, out = capture_graph(lambda: fn(x), warmup=1, pool=pool, thread_local=True)
            except RuntimeError as e:
                # A failed capture can leave torch's CUDA state (its RNG's capture bookkeeping) unusable for
                # further captures: stop trying for the rest of the process and say so once.
                cls.enabled = False
                warnings.warn(f"blockfp8: capturing an eager linear into a CUDA graph failed ({type(e).__name__}: "
                              f"{e}); eager calls launch their kernels directly from now on", RuntimeWarning,
                              stacklevel=2)
                return cls(False)
        graphed = cls(True, ptrs, graph, x, out)
        members.add(graphed)
        return graphed

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x2)
        self.graph.replay()
        return self.out.clone()


class PlanRegistry:
    """The plans of every weight tensor, kept as long as that tensor lives and no longer.

    Keyed by the weight tensor's identity (checked through a weak reference, whose callback drops the weight's
    plans when it is freed, so a new tensor that reuses a freed one's id never gets its plans), then by its
    scales and bias (also checked by identity) and ``plan_key``. At most ``per_weight`` plans per weight, least
    recently used dropped first (decode uses up to 64 token counts per layer; prefill adds one per new sequence
    length). Safe to call from several threads: at worst two threads build the same plan once each.
    """

    def __init__(self, per_weight: int = 128) -> None:
        self.per_weight = per_weight
        self._weights: dict[int, tuple[weakref.ref, OrderedDict]] = {}
        self._lock = threading.Lock()

    def get(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None, key: tuple,
            build: Callable[[], LinearPlan]) -> LinearPlan:
        entry = self._weights.get(id(weight))
        full = (id(weight_scale_inv), id(bias), key)
        if entry is not None and entry[0]() is weight:
            hit = entry[1].get(full)
            if hit is not None and hit[0]() is weight_scale_inv and (bias is None or hit[1]() is bias):
                return hit[2]
        plan = build()
        if plan.keep:
            self._insert(weight, full, (weakref.ref(weight_scale_inv),
                                        None if bias is None else weakref.ref(bias), plan))
        return plan

    def _insert(self, weight: torch.Tensor, full: tuple, value: tuple) -> None:
        with self._lock:
            entry = self._weights.get(id(weight))
            if entry is None or entry[0]() is not weight:
                entry = self._weights[id(weight)] = (weakref.ref(weight, self._forget(id(weight))), OrderedDict())
            plans = entry[1]
            plans[full] = value
            plans.move_to_end(full)
            if len(plans) > self.per_weight:
                plans.popitem(last=False)

    def _forget(self, key: int) -> Callable[[weakref.ref], None]:
        def drop(ref: weakref.ref) -> None:
            entry = self._weights.get(key)
            if entry is not None and entry[0] is ref:
                del self._weights[key]

        return drop

    def plans_of(self, weight: torch.Tensor) -> list[LinearPlan]:
        """The plans kept for ``weight``, oldest first."""
        entry = self._weights.get(id(weight))
        return [] if entry is None or entry[0]() is not weight else [v[2] for v in entry[1].values()]

    def __len__(self) -> int:
        return len(self._weights)


PLANS = PlanRegistry()


def plan_key(x: torch.Tensor, out_dtype: torch.dtype, m: int, backend: str | None, quantize: bool) -> tuple:
    """Everything besides the weight tensors that a ``LinearPlan`` depends on. The environment override and the
    dispatcher's generation are read per call, so forcing a backend or installing a table takes effect at once."""
    return (m, x.device, x.dtype, out_dtype, backend or os.environ.get(ENV_VAR), generation(), quantize)


_PLAIN = (torch.Tensor, nn.Parameter)


def runs_eagerly(*tensors: torch.Tensor | None) -> bool:
    """Whether a call runs its plan directly instead of through its custom op: plain tensors (parameters
    included), nothing being traced or compiled, no torch function or dispatch mode active (those are what the
    op's registration serves)."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch.jit.is_tracing():
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    # Meta tensors (shape propagation) go through the op's fake implementation.
    return tensors[0].device.type in ("cuda", "cpu")


def _needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def _linear_plan(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 backend: str | None, m: int, check: bool, tune: bool) -> LinearPlan:
    """The registered plan of this call, built (weight side checked when ``check``) on the first call."""

    def build() -> LinearPlan:
        if check:
            check_linear_input(x, weight, weight_scale_inv, bias)
        return LinearPlan(weight, weight_scale_inv, bias, x.dtype, m, backend,
                          _linear_operands(x, weight, weight_scale_inv) if tune else None)

    return PLANS.get(weight, weight_scale_inv, bias, plan_key(x, x.dtype, m, backend, True), build)


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dL/dx, dL/dbias), each only where autograd asks for it (inputs 0 and 3 of both ``_LinearFn`` and the op).
    The fp8 weight is frozen: dL/dx = dL/dy @ W, with W the dequantized weight in the
    gradient's dtype (one (N, K) temporary per backward)."""
    weight, weight_scale_inv = ctx.saved_tensors
    x_grad, bias_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_x = grad @ dequantize_weight(weight, weight_scale_inv, dtype=grad.dtype) if x_grad else None
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if bias_grad else None
    return grad_x, grad_bias


class _LinearFn(torch.autograd.Function):
    """An eager call with autograd on: the plan forward, ``_backward`` backward (the op's own formula)."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale_inv, bias, plan):
        ctx.save_for_backward(weight, weight_scale_inv)
        return plan.linear(x, weight, weight_scale_inv, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_bias = _backward(ctx, grad)
        return grad_x, None, None, grad_bias, None


@torch.library.custom_op("blockfp8::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    n, k = weight.shape
    m = _rows(x.shape)
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    # No online tuning here: the op runs inside compiled graphs and their captures, where nothing is timed.
    plan = _linear_plan(x, weight, weight_scale_inv, bias, backend or None, m, check=True, tune=False)
    return plan.linear(x, weight, weight_scale_inv, bias, graphs=False)


@_linear_op.register_fake
def _linear_fake(x, weight, weight_scale_inv, bias, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_setup(ctx, inputs, output) -> None:
    _, weight, weight_scale_inv, _, _ = inputs
    ctx.save_for_backward(weight, weight_scale_inv)


def _linear_op_backward(ctx, grad: torch.Tensor):
    grad_x, grad_bias = _backward(ctx, grad)
    return grad_x, None, None, grad_bias, None


_linear_op.register_autograd(_linear_op_backward, setup_context=_linear_setup)


@torch.library.custom_op("blockfp8::gemm", mutates_args=())
def _gemm_op(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    n, k = weight.shape
    m = _rows(x_fp8.shape)
    if m == 0:
        return x_fp8.new_empty(*x_fp8.shape[:-1], n, dtype=out_dtype)
    return _gemm_plan(x_fp8, x_scale, weight, weight_scale_inv, bias, out_dtype, backend or None, m,
                      tune=False).gemm(x_fp8, x_scale, weight, weight_scale_inv, bias)


@_gemm_op.register_fake
def _gemm_fake(x_fp8, x_scale, weight, weight_scale_inv, bias, out_dtype, backend):
    return x_fp8.new_empty(*x_fp8.shape[:-1], weight.shape[0], dtype=out_dtype)


def _gemm_plan(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype, backend: str | None, m: int,
               tune: bool) -> LinearPlan:
    return PLANS.get(weight, weight_scale_inv, bias, plan_key(x_fp8, out_dtype, m, backend, False),
                     lambda: LinearPlan(weight, weight_scale_inv, bias, out_dtype, m, backend,
                                        _gemm_operands(x_fp8, x_scale, weight, weight_scale_inv) if tune else None))


def _linear_checked(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                    bias: torch.Tensor | None, backend: str | None, check_weights: bool) -> torch.Tensor:
    """``linear`` for a checked ``x`` (``check_weights``: the weight side is not checked yet; a new plan checks
    it before it is built, and reused plans were checked then)."""
    m = _rows(x.shape)
    if m == 0 or not runs_eagerly(x, bias):
        if check_weights:
            check_linear_input(x, weight, weight_scale_inv, bias)
        return _linear_op(x, weight, weight_scale_inv, bias, backend or "")
    plan = _linear_plan(x, weight, weight_scale_inv, bias, backend, m, check_weights, tune=True)
    if _needs_grad(x, bias):
        return _LinearFn.apply(x, weight, weight_scale_inv, bias, plan)
    return plan.linear(x, weight, weight_scale_inv, bias)


def layer_linear(x: object, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 backend: str | None) -> torch.Tensor:
    """``linear`` as a layer calls it: per call, only the activation is checked (type, dtype, K, device); the
    weight side is checked when a plan is built. A ``QuantizedActivation`` goes to ``gemm`` as in ``linear``."""
    if isinstance(x, QuantizedActivation):
        return gemm(x.values, x.scales, weight, weight_scale_inv, bias=bias, out_dtype=x.dtype, backend=backend)
    if (not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 1
            or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or x.shape[-1] != weight.shape[1]
            or x.device != weight.device):
        check_linear_input(x, weight, weight_scale_inv, bias)  # raises the error that names the problem
    return _linear_checked(x, weight, weight_scale_inv, bias, backend, check_weights=True)


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
    if m == 0 or not runs_eagerly(x_fp8, x_scale, bias) or _needs_grad(x_fp8, bias):
        return _gemm_op(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, backend or "")
    plan = _gemm_plan(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, backend, m, tune=True)
    return plan.gemm(x_fp8, x_scale, w_fp8, weight_scale_inv, bias)


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
    return _linear_checked(x, weight, weight_scale_inv, bias, backend, check_weights=False)


__all__ = ["PLANS", "GraphedLinear", "LinearPlan", "PlanRegistry", "gemm", "layer_linear", "linear",
           "quantize_for", "runs_eagerly"]
