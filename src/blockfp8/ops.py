"""Public functional API: ``gemm`` (fp8 in) and ``linear`` (float in), both routed by the dispatcher.

One path for every entry. The work that does not depend on the activation (backend choice, launch config,
grid, workspace size, weight-side checks) is done once per (weight tensors, M, dtypes) and kept in a
``LinearPlan``; plans live in one ``PlanRegistry``, keyed by the weight tensor, for as long as it lives. Every
entry looks its plan up there and calls it:

* a plain eager call (``Fp8BlockLinear.forward``, ``linear``, ``gemm``) calls the plan directly; an eager
  decode-size call replays a CUDA graph of the plan instead (``eager_graphs.EagerGraphs``, which needs no copy
  of the input or the output in a decode loop), since launching two kernels from Python costs more host time
  than a replay; a layer's next call with the same everything goes straight to the set its last call replayed
  (``Shortcut``);
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
import weakref
from collections import OrderedDict
from collections.abc import Callable
from functools import cache

import torch
from torch import nn

from .backends import Backend, Problem, get_backend
from .backends.base import GemmPlan
from .device import current_device_index, current_raw_stream
from .dispatch import ENV_VAR, Operands, check_backend_name, choose, generation
from .eager_graphs import EagerGraphs
from .format import DEFAULT_GROUP, FLOAT_DTYPES, FP8_DTYPE, cdiv, is_decode
from .quant import QuantizedActivation, dequantize_weight, quantize_activation
from .validate import check_gemm_input, check_linear_input, check_weight_values


def _rows(shape: torch.Size) -> int:
    return math.prod(shape[:-1])


def _pick(m: int, n: int, k: int, device: torch.device, out_dtype: torch.dtype, backend: str | None,
          operands: Operands | None = None) -> Backend:
    return get_backend(choose(Problem.of(m, n, k, device, out_dtype), backend or None, operands))


def _triton_runs_on(x: torch.Tensor) -> bool:
    # Read per call: the command line sets TRITON_INTERPRET (CPU machines) after `import blockfp8`.
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@cache
def _fused_quantizer() -> Callable:
    """The Triton activation quantizer, imported on first use like every kernel module (Triton reads
    TRITON_INTERPRET when a kernel is defined, and the command line sets it after `import blockfp8` on machines
    without a GPU), then kept: an import statement per call costs a microsecond."""
    from .backends.triton.act_quant import quantize_activation_fused

    return quantize_activation_fused


def quantize_for(be: Backend, x: torch.Tensor, zero: torch.Tensor | None = None,
                 zero_count: int = 0, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize 2-D float ``x`` per 1x128 group straight into the scale layout ``be`` reads: the Triton
    quantizer on CUDA (and on CPU for the Triton backend under the interpreter), the torch quantizer elsewhere
    (both bit-identical). ``zero``/``zero_count``: int32 counters of the next GEMM to zero on the way. ``rows``:
    the row count the GEMM wants (``GemmPlan.rows``); the Triton quantizer pads to it, the torch one does not
    (the GEMM pads what it gets)."""
    if x.is_cuda or (be.name == "triton" and _triton_runs_on(x)):
        return _fused_quantizer()(x, layout=be.scale_layout, zero=zero, zero_count=zero_count, rows=rows)
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

    ``run_linear`` takes float activations, ``run_gemm`` fp8 activations with their scales. ``keep``: False for a plan
    made while a CUDA graph is being captured (used for that capture only).
    """

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, m: int, backend: str | None, operands: Operands | None = None) -> None:
        n, k = weight.shape
        self.m, self.n, self.out_dtype = m, n, out_dtype
        self.keep = not (weight.is_cuda and torch.cuda.is_current_stream_capturing())
        # ``operands`` (built only if online tuning measures this cell, on its first call) are this call's. Inside
        # a capture nothing is measured; online tuning notes why for ``explain``, and the next eager call tunes.
        self.backend = _pick(m, n, k, weight.device, out_dtype, backend, operands)
        self.launch: GemmPlan = self.backend.plan(weight, weight_scale_inv, bias, out_dtype, m)
        # Eager calls replay CUDA graphs (eager_graphs.py): decode sizes on CUDA, with a backend that captures.
        self.graphed = weight.is_cuda and self.keep and is_decode(m) and self.backend.capturable
        self.device_index = weight.device.index
        self.graphs: dict[tuple, EagerGraphs] = {}

    def run_linear(self, x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                   bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """y [..., N] for float x [..., K]: the quantizer (zeroing the GEMM's counters) and the GEMM, launched,
        into ``out`` (contiguous, x's leading shape) when given."""
        launch = self.launch
        flat = x.dim() == 2  # the common case: no reshape either way (each costs a microsecond of host time)
        work = launch.workspace(x.device) if launch.counters else None
        xq, xs = quantize_for(self.backend, x if flat else x.reshape(self.m, -1), work, launch.counters, launch.rows)
        if out is not None:
            launch(xq, xs, weight, weight_scale_inv, bias, work, out if flat else out.view(self.m, self.n))
            return out
        y = launch(xq, xs, weight, weight_scale_inv, bias, work)
        return y if flat else y.reshape(*x.shape[:-1], self.n)

    def run_gemm(self, x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                 weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """y [..., N] for fp8 x_fp8 [..., K] and its scales [..., Kb], launched into ``out`` when given."""
        # cuBLAS and DeepGEMM need x row-major; a strided x_fp8 is copied (M*K bytes, what they read anyway).
        x2 = x_fp8.reshape(self.m, -1).contiguous()
        xs = _scales_2d(x_scale, self.m)
        if out is not None:
            self.launch(x2, xs, weight, weight_scale_inv, bias, None, out.view(self.m, self.n))
            return out
        return self.launch(x2, xs, weight, weight_scale_inv, bias).reshape(*x_fp8.shape[:-1], self.n)

    def graph_set(self, x: torch.Tensor, layout: tuple) -> EagerGraphs | None:
        """The CUDA graphs of the calling thread and stream for inputs of ``layout`` (``x`` the first input), or
        None when the call must launch directly (``eager_graphs.EagerGraphs``)."""
        if not EagerGraphs.enabled or _capturing():
            return None  # a caller's capture records the plain launches
        if _current_device() != self.device_index:
            return None  # a replay runs on the current device's stream: only the weight's device is graphed
        stream = current_raw_stream(self.device_index)
        key = (stream, threading.get_ident(), layout)
        # A graph reads the weight tensors' memory it was captured with. This plan is found only while they keep
        # the storage it was built for (``weight_state``): a tensor given new storage gets a new plan and new sets.
        graphs = self.graphs.get(key)
        if graphs is None:
            if len(self.graphs) >= _GRAPH_SETS:
                self.graphs.clear()  # many threads or layouts over time: start over rather than grow
            graphs = self.graphs[key] = EagerGraphs(x.device, (*x.shape[:-1], self.n), self.out_dtype, stream)
        return graphs


_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: False)
_current_device = current_device_index

# Most eager-graph sets per plan (one per stream, thread and input layout in use).
_GRAPH_SETS = 8


def _watched(table: dict, weight: torch.Tensor) -> weakref.ref:
    """A weak reference to ``weight`` whose callback removes ``table[id(weight)]`` (an entry whose first item is
    this reference) when the weight dies -- unless a newer tensor given the same id owns the entry by then."""
    key = id(weight)

    def drop(ref: weakref.ref) -> None:
        entry = table.get(key)
        if entry is not None and entry[0] is ref:
            del table[key]

    return weakref.ref(weight, drop)


def weight_state(weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 versioned: bool | None = None) -> tuple | None:
    """What a plan or a shortcut was made for besides the tensors' identity: each one's storage and, where torch
    tracks it, its version (every in-place write bumps it; inference tensors keep none). A tensor given new
    storage (``param.data = ...``, another shape) or written in place (new values, which may be NaN) gets a new
    plan, whose build checks the weight side again.

    The first item says whether versions are in it; ``versioned`` (that item of a kept state: a hot-path
    comparison) skips asking the tensors again (None: ask them). None when ``versioned`` no longer holds (a tensor
    turned into an inference tensor), which matches no kept state."""
    if versioned is None:
        versioned = not (weight.is_inference() or weight_scale_inv.is_inference()
                         or (bias is not None and bias.is_inference()))
    if not versioned:
        return (False, weight.data_ptr(), weight_scale_inv.data_ptr(), 0 if bias is None else bias.data_ptr())
    try:
        return (True, weight.data_ptr(), weight_scale_inv.data_ptr(), weight._version, weight_scale_inv._version,
                None if bias is None else (bias.data_ptr(), bias._version))
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


# weight id -> (weak reference, weight_state) of the weights whose values were last checked in that state.
_VALUES_CHECKED: dict[int, tuple[weakref.ref, tuple]] = {}


def check_values_once(weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The weight side's values checked (NaN/Inf/zero/negative scales, NaN fp8 bytes, a non-finite bias) when a
    plan is built for a state of these tensors not checked before: a read of the weight (and a device sync) once
    per weight and state, never per call. Inside a CUDA graph capture nothing can be read; the eager calls
    before one (or after it) check."""
    if weight.is_meta or (weight.is_cuda and _capturing()):
        return
    state = weight_state(weight, weight_scale_inv, bias)
    entry = _VALUES_CHECKED.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == state:
        return
    check_weight_values(weight, weight_scale_inv, bias)
    ref = entry[0] if entry is not None and entry[0]() is weight else _watched(_VALUES_CHECKED, weight)
    _VALUES_CHECKED[id(weight)] = (ref, state)


class PlanRegistry:
    """The plans of every weight tensor, kept as long as that tensor lives and no longer.

    Keyed by the weight tensor's identity (checked through a weak reference, whose callback drops the weight's
    plans when it is freed, so a new tensor that reuses a freed one's id never gets its plans), then by its
    scales and bias (also checked by identity) and ``plan_key``; a plan is found only while the tensors are in the
    state it was built for (``weight_state``: same storage, no in-place write since). At most ``per_weight``
    plans per weight, least recently used dropped first (decode uses up to 64 token counts per layer; prefill adds
    one per new sequence length). Safe to call from several threads: at worst two threads build the same plan once each.
    """

    def __init__(self, per_weight: int = 128) -> None:
        self.per_weight = per_weight
        self._weights: dict[int, tuple[weakref.ref, OrderedDict]] = {}
        self._lock = threading.Lock()

    def find(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
             key: tuple) -> LinearPlan | None:
        """The plan kept for these tensors and ``key``, or None."""
        entry = self._weights.get(id(weight))
        if entry is not None and entry[0]() is weight:
            hit = entry[1].get((id(weight_scale_inv), id(bias), key))
            if (hit is not None and hit[0]() is weight_scale_inv and (bias is None or hit[1]() is bias)
                    and hit[3] == weight_state(weight, weight_scale_inv, bias, hit[3][0])):
                return hit[2]
        return None

    def get(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None, key: tuple,
            build: Callable[[], LinearPlan]) -> LinearPlan:
        """The plan kept for these tensors and ``key``, built (and kept, unless made inside a capture) if none."""
        plan = self.find(weight, weight_scale_inv, bias, key)
        if plan is None:
            plan = build()
            if plan.keep:
                self._insert(weight, (id(weight_scale_inv), id(bias), key),
                             (weakref.ref(weight_scale_inv), None if bias is None else weakref.ref(bias), plan,
                              weight_state(weight, weight_scale_inv, bias)))
        return plan

    def _insert(self, weight: torch.Tensor, full: tuple, value: tuple) -> None:
        with self._lock:
            entry = self._weights.get(id(weight))
            if entry is None or entry[0]() is not weight:
                entry = self._weights[id(weight)] = (_watched(self._weights, weight), OrderedDict())
            plans = entry[1]
            plans[full] = value
            plans.move_to_end(full)
            if len(plans) > self.per_weight:
                plans.popitem(last=False)

    def plans_of(self, weight: torch.Tensor) -> list[LinearPlan]:
        """The plans kept for ``weight``, oldest first."""
        entry = self._weights.get(id(weight))
        return [] if entry is None or entry[0]() is not weight else [v[2] for v in entry[1].values()]

    def __len__(self) -> int:
        return len(self._weights)


PLANS = PlanRegistry()


def plan_key(x_dtype: torch.dtype, out_dtype: torch.dtype, m: int, backend: str | None, quantize: bool) -> tuple:
    """Everything besides the weight tensors that a ``LinearPlan`` depends on (the device is the weight's). The
    environment override and the dispatcher's generation are read per call, so forcing a backend or installing
    a table takes effect at once."""
    return (m, x_dtype, out_dtype, backend or env_backend(), generation(), quantize)


def _env_reader() -> Callable[[], str | None]:
    """A reader of ``BLOCKFP8_BACKEND``: ``os.environ.get`` costs ~0.7 us a call (it encodes the key each time),
    too much for every layer call; the mapping's own store, read with the key encoded once, costs ~0.1 us."""
    data, encode, decode = (getattr(os.environ, a, None) for a in ("_data", "encodekey", "decodevalue"))
    if not (isinstance(data, dict) and callable(encode) and callable(decode)):
        return lambda: os.environ.get(ENV_VAR)
    key = encode(ENV_VAR)

    def read() -> str | None:
        value = data.get(key)
        return None if value is None else decode(value)

    return read


env_backend = _env_reader()


_PLAIN = (torch.Tensor, nn.Parameter)


def runs_eagerly(*tensors: torch.Tensor | None) -> bool:
    """Whether a call runs its plan directly instead of through its custom op: plain tensors (parameters
    included), nothing being traced or compiled, no torch function or dispatch mode active (those are what the
    op's registration serves)."""
    if _intercepted():
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    # Meta tensors (shape propagation) go through the op's fake implementation.
    return not tensors[0].is_meta


_is_compiling = torch.compiler.is_compiling
_torch_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_tracing = torch._C._get_tracing_state  # what torch.jit.is_tracing() reads, outside TorchScript


def _intercepted() -> bool:
    """Whether something other than a plain eager call is running: compilation, tracing, or an active torch
    function or dispatch mode (the custom ops' registration serves those)."""
    return bool(_is_compiling() or _torch_function_mode() or _dispatch_stack_len() or _tracing())


def _needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def _linear_plan(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 backend: str | None, m: int, check: bool, tune: bool) -> LinearPlan:
    """The registered plan of this call, built (weight side checked when ``check``) on the first call."""
    key = plan_key(x.dtype, x.dtype, m, backend, True)
    plan = PLANS.find(weight, weight_scale_inv, bias, key)
    if plan is not None:
        return plan

    def build() -> LinearPlan:
        if check:
            check_linear_input(x, weight, weight_scale_inv, bias)
        check_values_once(weight, weight_scale_inv, bias)
        return LinearPlan(weight, weight_scale_inv, bias, x.dtype, m, backend,
                          _linear_operands(x, weight, weight_scale_inv) if tune else None)

    return PLANS.get(weight, weight_scale_inv, bias, key, build)


def _grads(weight: torch.Tensor, weight_scale_inv: torch.Tensor, grad: torch.Tensor, x_grad: bool,
           bias_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dL/dx, dL/dbias), each only where autograd asks for it. The fp8 weight is frozen: dL/dx = dL/dy @ W, with
    W the dequantized weight in the gradient's dtype (one (N, K) temporary per backward)."""
    grad_x = grad @ dequantize_weight(weight, weight_scale_inv, dtype=grad.dtype) if x_grad else None
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if bias_grad else None
    return grad_x, grad_bias


_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default


class _LinearFn(torch.autograd.Function):
    """An eager call with autograd on: the plan forward, ``_grads`` backward (the op's own formula).

    Takes (x, bias, (weight, weight_scale_inv, plan, graphs)): autograd inspects every tensor argument of a
    Function on each call, and only x and the bias can need a gradient (the fp8 weight is frozen), so the weight
    side rides in one plain tuple and is kept on ``ctx`` (inputs of the call: no reference cycle). ``graphs``: the
    call's ``EagerGraphs`` set (``LinearPlan.graph_set``), or None to launch directly."""

    @staticmethod
    def forward(ctx, x, bias, frozen):
        weight, weight_scale_inv, plan, graphs = frozen
        ctx.frozen = weight, weight_scale_inv
        y = None if graphs is None else graphs((x,), plan.run_linear, (weight, weight_scale_inv, bias))
        if y is None:
            y = plan.run_linear(x, weight, weight_scale_inv, bias)
        # A Function's output that is a view (a reshaped N-D result) refuses in-place ops; one that autograd does
        # not count as a view accepts them, as any linear's output does.
        return _UNSAFE_VIEW(y, y.shape) if y._is_view() else y

    @staticmethod
    def backward(ctx, grad):
        return (*_grads(*ctx.frozen, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1]), None)


# Function.apply's Python wrapper (functorch bookkeeping, argument binding) costs about as much again as the C++
# apply under it; without functorch transforms or wrapped tensors it only forwards to that C++ apply.
_RAW_APPLY = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")
_raw_linear_fn = _RAW_APPLY.__get__(None, _LinearFn) if _RAW_APPLY is not None else _LinearFn.apply
_transforms_active = torch._C._are_functorch_transforms_active
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _linear_fn(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
               plan: LinearPlan, graphs: EagerGraphs | None) -> torch.Tensor:
    """``_LinearFn.apply``, through the C++ apply directly where that is all the wrapper would do."""
    apply = _LinearFn.apply if _transforms_active() or _is_wrapped(x) else _raw_linear_fn
    return apply(x, bias, (weight, weight_scale_inv, plan, graphs))


@torch.library.custom_op("blockfp8::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    n, k = weight.shape
    m = _rows(x.shape)
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    # No online tuning here: the op runs inside compiled graphs and their captures, where nothing is timed.
    plan = _linear_plan(x, weight, weight_scale_inv, bias, backend or None, m, check=True, tune=False)
    return plan.run_linear(x, weight, weight_scale_inv, bias)


@_linear_op.register_fake
def _linear_fake(x, weight, weight_scale_inv, bias, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_setup(ctx, inputs, output) -> None:
    _, weight, weight_scale_inv, _, _ = inputs
    ctx.save_for_backward(weight, weight_scale_inv)


def _linear_op_backward(ctx, grad: torch.Tensor):
    grad_x, grad_bias = _grads(*ctx.saved_tensors, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[3])
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
                      tune=False).run_gemm(x_fp8, x_scale, weight, weight_scale_inv, bias)


@_gemm_op.register_fake
def _gemm_fake(x_fp8, x_scale, weight, weight_scale_inv, bias, out_dtype, backend):
    return x_fp8.new_empty(*x_fp8.shape[:-1], weight.shape[0], dtype=out_dtype)


def _gemm_plan(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype, backend: str | None, m: int,
               tune: bool, check: bool = False) -> LinearPlan:
    """The registered plan of this gemm call, built (every input checked when ``check``) on the first call."""
    key = plan_key(x_fp8.dtype, out_dtype, m, backend, False)
    plan = PLANS.find(weight, weight_scale_inv, bias, key)
    if plan is not None:
        return plan

    def build() -> LinearPlan:
        if check:
            check_gemm_input(x_fp8, x_scale, weight, weight_scale_inv, bias, out_dtype)
        check_values_once(weight, weight_scale_inv, bias)
        return LinearPlan(weight, weight_scale_inv, bias, out_dtype, m, backend,
                          _gemm_operands(x_fp8, x_scale, weight, weight_scale_inv) if tune else None)

    return PLANS.get(weight, weight_scale_inv, bias, key, build)


def gemm_plan_of(weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, m: int, backend: str | None) -> LinearPlan | None:
    """The plan an earlier eager ``gemm`` call of M fp8 rows built for these tensors, or None (nothing built)."""
    return PLANS.find(weight, weight_scale_inv, bias, plan_key(FP8_DTYPE, out_dtype, m, backend, False))


def _gemm_activation_ok(x_fp8: object, x_scale: object, w_fp8: object) -> bool:
    """The per-call part of ``check_gemm_input`` as one boolean (metadata a caller may change between calls:
    the activation's type, dtype, shape and device against the weight's K and device). The weight side is
    checked in full when a plan is built for it."""
    if not (isinstance(x_fp8, torch.Tensor) and isinstance(x_scale, torch.Tensor) and isinstance(w_fp8, torch.Tensor)):
        return False
    if x_fp8.dtype != FP8_DTYPE or x_scale.dtype != torch.float32 or x_fp8.dim() < 1 or w_fp8.dim() != 2:
        return False
    k = x_fp8.shape[-1]
    if w_fp8.shape[1] != k or x_scale.shape[:-1] != x_fp8.shape[:-1] or x_scale.shape[-1] != cdiv(k, DEFAULT_GROUP):
        return False
    dev = x_fp8.get_device()
    return (x_scale.get_device() == dev == w_fp8.get_device()
            and x_fp8.is_cuda == x_scale.is_cuda == w_fp8.is_cuda)


def _linear_checked(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                    bias: torch.Tensor | None, backend: str | None, check_weights: bool) -> torch.Tensor:
    """``linear`` for a checked ``x`` (``check_weights``: the weight side is not checked yet; a new plan checks
    it before it is built, and reused plans were checked then, which is how a layer calls: its eager graphed calls
    are remembered for the next one, ``Shortcut``)."""
    m = x.shape[0] if x.dim() == 2 else _rows(x.shape)
    if m == 0 or not runs_eagerly(x, bias):
        if check_weights:
            check_linear_input(x, weight, weight_scale_inv, bias)
        return _linear_op(x, weight, weight_scale_inv, bias, backend or "")
    plan = _linear_plan(x, weight, weight_scale_inv, bias, backend, m, check_weights, tune=True)
    graphs = plan.graph_set(x, (x.shape, x.stride())) if plan.graphed else None
    if _needs_grad(x, bias):
        y = _linear_fn(x, weight, weight_scale_inv, bias, plan, graphs)
        replayed = graphs is not None and y.untyped_storage()._cdata == graphs.storage
    else:
        y = None if graphs is None else graphs((x,), plan.run_linear, (weight, weight_scale_inv, bias))
        replayed = y is not None
        if y is None:
            y = plan.run_linear(x, weight, weight_scale_inv, bias)
    if replayed and check_weights:
        SHORTCUTS.remember(x, weight, weight_scale_inv, bias, backend, plan, graphs)
    return y


class Shortcut:
    """A layer's last eager call that replayed a CUDA graph, kept so that the next call with the same
    everything replays the same ``EagerGraphs`` set without looking up its plan and set again (a layer in a decode
    loop calls with one activation layout step after step). Same everything: what the full path checks or keys
    on -- the activation's exact type, shape, strides, dtype and device; the scale and bias tensors; the backend
    setting, ``BLOCKFP8_BACKEND`` and the dispatcher's generation; no grad needed, nothing compiling, tracing or
    intercepting; no capture under way; the current device, stream and thread; the weight tensors' storage.
    Anything else falls back to the full path, which remembers its result again. A call that needs gradients
    goes through ``_LinearFn`` around the same set."""

    __slots__ = ("shape", "stride", "dtype", "device", "scales", "bias", "backend", "env", "generation", "stream",
                 "thread", "graphs", "plan", "state")

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                 bias: torch.Tensor | None, backend: str | None, plan: LinearPlan, graphs: EagerGraphs) -> None:
        self.shape, self.stride, self.dtype, self.device = x.shape, x.stride(), x.dtype, x.get_device()
        self.state = weight_state(weight, weight_scale_inv, bias)
        self.scales = weakref.ref(weight_scale_inv)
        self.bias = None if bias is None else weakref.ref(bias)
        self.backend, self.env, self.generation = backend, env_backend(), generation()
        self.stream, self.thread = current_raw_stream(self.device), threading.get_ident()
        self.graphs, self.plan = graphs, plan

    def __call__(self, x: object, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 backend: str | None) -> torch.Tensor | None:
        """The replayed output, or None: the call takes the full path."""
        if (type(x) is not torch.Tensor or x.shape != self.shape or x.dtype is not self.dtype
                or x.stride() != self.stride or x.get_device() != self.device):
            return None
        graphs = self._graphs(weight, weight_scale_inv, bias, backend)
        if graphs is None:
            return None
        if _needs_grad(x, bias):
            return _linear_fn(x, weight, weight_scale_inv, bias, self.plan, graphs)
        return graphs((x,), self.plan.run_linear, (weight, weight_scale_inv, bias))

    def _graphs(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                backend: str | None) -> EagerGraphs | None:
        """The kept set, when everything but the activation is as it was."""
        if (self.scales() is not weight_scale_inv
                or (bias is not None if self.bias is None else self.bias() is not bias)
                or backend != self.backend or env_backend() != self.env or generation() != self.generation):
            return None
        if _intercepted() or _capturing():
            return None
        if (not EagerGraphs.enabled or _current_device() != self.device or threading.get_ident() != self.thread
                or current_raw_stream(self.device) != self.stream):
            return None
        # The set reads the storage it was captured with, and the plan was built (and checked) for these values.
        if weight_state(weight, weight_scale_inv, bias, self.state[0]) != self.state:
            return None
        return self.graphs


class GemmShortcut(Shortcut):
    """``Shortcut`` for a layer fed by a fused producer: its ``QuantizedActivation`` input is matched on the fp8
    values' shape and strides, the scales' shape and strides (their layout) and the output dtype, and the set
    replays the GEMM alone. A bias that needs a gradient takes the full path (the op's)."""

    __slots__ = ("scale_shape", "scale_stride")

    def __init__(self, x: QuantizedActivation, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                 bias: torch.Tensor | None, backend: str | None, plan: LinearPlan, graphs: EagerGraphs) -> None:
        super().__init__(x.values, weight, weight_scale_inv, bias, backend, plan, graphs)
        self.dtype = x.dtype  # the output's: the values are always fp8
        self.scale_shape, self.scale_stride = x.scales.shape, x.scales.stride()

    def __call__(self, x: object, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 backend: str | None) -> torch.Tensor | None:
        if type(x) is not QuantizedActivation:
            return None
        values, scales = x.values, x.scales
        if (type(values) is not torch.Tensor or type(scales) is not torch.Tensor or x.dtype is not self.dtype
                or values.dtype is not FP8_DTYPE or scales.dtype is not torch.float32
                or values.shape != self.shape or values.stride() != self.stride
                or scales.shape != self.scale_shape or scales.stride() != self.scale_stride
                or values.get_device() != self.device or scales.get_device() != self.device):
            return None
        graphs = self._graphs(weight, weight_scale_inv, bias, backend)
        if graphs is None or _needs_grad(values, bias):
            return None
        return graphs((values, scales), self.plan.run_gemm, (weight, weight_scale_inv, bias))


class ShortcutRegistry:
    """Each weight tensor's ``Shortcut``, kept as long as the tensor lives (a weak reference's callback drops it),
    like its plans: a copy of a layer, or a layer given a new weight tensor, starts without one."""

    def __init__(self) -> None:
        self._by_weight: dict[int, tuple[weakref.ref, Shortcut]] = {}

    def of(self, weight: torch.Tensor) -> Shortcut | None:
        entry = self._by_weight.get(id(weight))
        return entry[1] if entry is not None and entry[0]() is weight else None

    def remember(self, x: torch.Tensor | QuantizedActivation, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                 bias: torch.Tensor | None, backend: str | None, plan: LinearPlan, graphs: EagerGraphs) -> None:
        kind = Shortcut if type(x) is torch.Tensor else GemmShortcut if type(x) is QuantizedActivation else None
        if kind is None:
            return
        entry = self._by_weight.get(id(weight))
        ref = entry[0] if entry is not None and entry[0]() is weight else _watched(self._by_weight, weight)
        self._by_weight[id(weight)] = (ref, kind(x, weight, weight_scale_inv, bias, backend, plan, graphs))


SHORTCUTS = ShortcutRegistry()


def layer_linear(x: object, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 backend: str | None) -> torch.Tensor:
    """``linear`` as a layer calls it: per call, only the activation is checked (type, dtype, K, device); the
    weight side is checked when a plan is built. A ``QuantizedActivation`` goes to ``gemm`` as in ``linear``."""
    # Under torch.compile this branch is dropped while tracing (is_compiling() is a constant there).
    shortcut = None if _is_compiling() else SHORTCUTS.of(weight)
    if shortcut is not None:
        y = shortcut(x, weight, weight_scale_inv, bias, backend)
        if y is not None:
            return y
    if isinstance(x, QuantizedActivation):
        return _layer_gemm(x, weight, weight_scale_inv, bias, backend)
    # get_device(): an int, cheaper than comparing torch.device objects; a CPU/meta pair that it cannot tell
    # apart does not run eagerly, and the op's path checks everything.
    if (not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 1
            or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or x.shape[-1] != weight.shape[1]
            or x.get_device() != weight.get_device() or x.is_cuda != weight.is_cuda):
        check_linear_input(x, weight, weight_scale_inv, bias)  # raises the error that names the problem
    return _linear_checked(x, weight, weight_scale_inv, bias, backend, check_weights=True)


def _layer_gemm(x: QuantizedActivation, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                bias: torch.Tensor | None, backend: str | None) -> torch.Tensor:
    """``gemm`` of a fused producer's output as a layer calls it: a call that replayed a graph is remembered for
    the layer's next one (``GemmShortcut``)."""
    return _gemm_checked(x.values, x.scales, weight, weight_scale_inv, bias, x.dtype, backend, remember=x)


def _gemm_checked(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, weight_scale_inv: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, backend: str | None,
                  remember: QuantizedActivation | None = None) -> torch.Tensor:
    """``gemm`` once its backend name is checked. ``remember``: a layer's input, whose call is remembered when it
    replayed a graph (``SHORTCUTS``)."""
    if not _gemm_activation_ok(x_fp8, x_scale, w_fp8):
        check_gemm_input(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype)  # names the problem
    m = x_fp8.shape[0] if x_fp8.dim() == 2 else _rows(x_fp8.shape)
    if m == 0 or not runs_eagerly(x_fp8, x_scale, bias) or _needs_grad(x_fp8, bias):
        check_gemm_input(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype)
        return _gemm_op(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, backend or "")
    # Every input is checked in full when the plan is built; a found plan was built for these very tensors.
    plan = _gemm_plan(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, backend, m, tune=True, check=True)
    if plan.graphed:
        layout = (x_fp8.shape, x_fp8.stride(), x_scale.shape, x_scale.stride())
        graphs = plan.graph_set(x_fp8, layout)
        y = None if graphs is None else graphs((x_fp8, x_scale), plan.run_gemm, (w_fp8, weight_scale_inv, bias))
        if y is not None:
            if remember is not None:
                SHORTCUTS.remember(remember, w_fp8, weight_scale_inv, bias, backend, plan, graphs)
            return y
    return plan.run_gemm(x_fp8, x_scale, w_fp8, weight_scale_inv, bias)


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
    check_backend_name(backend)
    return _gemm_checked(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, backend)


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


__all__ = ["PLANS", "LinearPlan", "PlanRegistry", "gemm", "layer_linear", "linear",
           "quantize_for", "runs_eagerly"]
