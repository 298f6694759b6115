"""The interface every GEMM backend implements, and its limits expressed as data.

A backend module defines one ``Backend`` instance named ``BACKEND``. The dispatcher asks ``supports(problem)``
and gets a ``Support`` that is falsy with a human-readable reason when the backend cannot run the problem;
limits live in a ``Limits`` record, checked by one function (``Limits.allows``), so ``blockfp8 check`` can
test exactly what each backend claims.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from ..device import DeviceId, as_device, cuda_identity
from ..format import FLOAT_DTYPES


@dataclass(frozen=True)
class Problem:
    """What the dispatcher knows about one GEMM call: y[M, N] = x[M, K] @ w[N, K].T."""

    m: int
    n: int
    k: int
    device_type: str = "cpu"
    arch: tuple[int, int] | None = None  # CUDA compute capability, None off CUDA
    out_dtype: torch.dtype = torch.bfloat16
    device_name: str = ""  # keys the measured tables ("NVIDIA H100 80GB HBM3"); device_type when empty
    sms: int = 0  # SM count, with arch the device's family (device.DeviceId); 0 when unknown

    @staticmethod
    def of(m: int, n: int, k: int, device: torch.device | str, out_dtype: torch.dtype = torch.bfloat16) -> Problem:
        device = as_device(device)
        if device.type == "cuda":
            ident = cuda_identity(device.index)
            return Problem(m, n, k, "cuda", ident.arch, out_dtype, ident.name, ident.sms)
        return Problem(m, n, k, device.type, None, out_dtype, device.type)

    @property
    def device_id(self) -> DeviceId:
        """The device as the measured tables and the tuning cache know it."""
        return DeviceId(self.device_name or self.device_type, self.arch, self.sms)


@dataclass(frozen=True)
class Support:
    """Truthy when supported; otherwise ``reason`` says why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


YES = Support(True)
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    """Declared limits of a backend. Every field is checked by ``allows``; nothing else refuses a problem."""

    device_types: tuple[str, ...] = ("cpu", "cuda")
    min_arch: tuple[int, int] | None = None  # inclusive, CUDA only
    max_arch: tuple[int, int] | None = None  # inclusive, CUDA only
    n_multiple: int = 1
    k_multiple: int = 1
    m_multiple: int = 1  # a backend that pads M itself declares 1
    out_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    # Elements of the largest operand (M*K, N*K or M*N): kernels index with 32-bit offsets. None: no bound.
    max_elements: int | None = INT32_MAX
    evidence: str = ""  # where the numbers come from (a measured probe, a doc)
    cpu_hint: str = ""  # how to run it on the CPU anyway, added to the refusal when "cpu" is not in device_types

    def allows(self, p: Problem) -> Support:
        if p.device_type not in self.device_types:
            hint = f"; {self.cpu_hint}" if p.device_type == "cpu" and self.cpu_hint else ""
            return Support(False, f"runs on {'/'.join(self.device_types)}, not {p.device_type}{hint}")
        if p.device_type == "cuda" and p.arch is not None:
            if self.min_arch and p.arch < self.min_arch:
                return Support(False, f"needs compute capability >= {_arch(self.min_arch)}, device is {_arch(p.arch)}")
            if self.max_arch and p.arch > self.max_arch:
                return Support(False, f"needs compute capability <= {_arch(self.max_arch)}, device is {_arch(p.arch)}")
        for dim, mult in (("N", self.n_multiple), ("K", self.k_multiple), ("M", self.m_multiple)):
            value = getattr(p, dim.lower())
            if value % mult:
                return Support(False, f"needs {dim} % {mult} == 0, got {dim}={value}")
        largest = max(p.m * p.k, p.n * p.k, p.m * p.n)
        if self.max_elements is not None and largest > self.max_elements:
            return Support(False, f"an operand of {largest} elements is beyond the {self.max_elements} its kernels "
                                  "index")
        if p.out_dtype not in self.out_dtypes:
            return Support(False, f"output dtype {p.out_dtype} not in {[str(d) for d in self.out_dtypes]}")
        return YES


def _arch(a: tuple[int, int]) -> str:
    return f"{a[0]}.{a[1]}"


# wgmma and the libraries built on it (cuBLAS blockwise, DeepGEMM's SM90 kernels) are Hopper's: sm_90 only.
HOPPER_ONLY = {"device_types": ("cuda",), "min_arch": (9, 0), "max_arch": (9, 0)}


def add_bias(y: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y + bias`` in ``y``'s dtype, for kernels without a bias epilogue (one extra elementwise pass), written
    into ``out`` when given (``y`` itself may be ``out``: then the bias is added in place)."""
    if out is None:
        return y if bias is None else y + bias.to(y.dtype)
    if bias is None:
        return y if y is out else out.copy_(y)
    return torch.add(y, bias.to(y.dtype), out=out)


def unit_stride_rows(x_fp8: torch.Tensor, w_fp8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(x_fp8, w_fp8, M, N, K) with both operands' K dimension made unit-stride (copied only when it is not)."""
    x_fp8 = x_fp8 if x_fp8.stride(1) == 1 else x_fp8.contiguous()
    w_fp8 = w_fp8 if w_fp8.stride(1) == 1 else w_fp8.contiguous()
    return x_fp8, w_fp8, x_fp8.shape[0], w_fp8.shape[0], x_fp8.shape[1]


@dataclass
class Backend:
    """Base class: subclasses set ``name``/``limits`` and implement ``run`` (and ``probe`` when optional).

    ``external`` marks a backend that wraps another library (cuBLAS, DeepGEMM): benchmarks count it as a peer.
    ``scale_layout`` is the activation-scale layout the backend reads best (``format.SCALE_LAYOUTS``).
    ``capturable``: its ``run`` may be recorded into a CUDA graph (no host synchronization, no allocation
    outside torch's allocator, nothing allocated in one call and kept for the next); eager decode calls replay
    such graphs (``eager_graphs.EagerGraphs``).
    ``bias_epilogue``: the bias is added inside the kernel before the one rounding to the output dtype; False for
    a backend that adds it in a second pass (``add_bias``), which rounds the output twice.
    """

    name: str
    limits: Limits = field(default_factory=Limits)
    scale_layout: str = "row"
    external: bool = False
    capturable: bool = True
    bias_epilogue: bool = True
    _availability: Support | None = field(default=None, repr=False)

    def availability(self) -> Support:
        """Whether this backend can run here at all, with the reason when not; cached, since ``probe`` may
        import an optional package."""
        if self._availability is None:
            try:
                self._availability = self.probe()
            except Exception as e:  # noqa: BLE001 - an optional peer may fail to import in any way
                self._availability = Support(False, f"import failed: {type(e).__name__}: {e}")
        return self._availability

    def probe(self) -> Support:
        """Look for what the backend needs (a package, a device); overridden by optional backends."""
        return YES

    def supports(self, p: Problem) -> Support:
        available = self.availability()
        return self.limits.allows(p) if available else available

    def run(self, x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor,
            weight_scale_inv: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """y[M, N] for 2-D x_fp8 (M, K) and x_scale (M, Kb) in any stride layout; M >= 1. ``out``: a contiguous
        (M, N) tensor of ``out_dtype`` to write y into (returned), for callers whose output must live at a fixed
        address (``eager_graphs``)."""
        raise NotImplementedError

    def plan(self, w_fp8: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype, m: int) -> GemmPlan:
        """This backend's GEMM for a weight like ``w_fp8`` (and its scales and bias) at M=``m`` rows.

        The tensors are read for their metadata only (shapes, strides, alignment): the plan holds none of them
        and takes them on every call. A backend whose per-call host work can be decided once (configs, grids)
        overrides this.
        """
        return RunPlan(self, out_dtype)


class GemmPlan:
    """One backend's GEMM at a fixed M for one weight layout: ``plan(x_fp8, x_scale, w, w_scale, bias)`` -> y.

    A plan holds no tensor: plans are kept per weight for as long as the weight lives (``ops.PlanRegistry``),
    and must neither keep it alive nor keep memory allocated past a call -- inside a CUDA graph capture (a
    caller's, or torch.compile's cudagraph trees) such memory would outlive the capture.

    ``counters``: how many int32 counters at the start of the call's ``workspace`` must be zero when the kernel
    starts (0: the plan needs no workspace). The caller may zero them in a launch it makes anyway (the activation
    quantizer of ``linear``) and pass the workspace; without one, the plan makes and zeroes its own.

    ``rows``: when set, the GEMM reads activations padded to that many rows (cuBLAS: M a multiple of 4), and the
    quantizer of ``linear`` writes them so (padding rows: values 0); a plan also accepts unpadded ones.
    """

    counters: int = 0
    rows: int | None = None  # the activation rows the GEMM wants, when more than M (the quantizer pads)

    def workspace(self, device: torch.device) -> torch.Tensor | None:
        """An uninitialised workspace for one call (None when the plan needs none)."""
        return None

    def __call__(self, x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor,
                 weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 work: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """y (M, N); written into ``out`` (contiguous, the plan's dtype) when given, as ``Backend.run``."""
        raise NotImplementedError


class RunPlan(GemmPlan):
    """The default plan: ``Backend.run`` with the output dtype bound."""

    def __init__(self, backend: Backend, out_dtype: torch.dtype) -> None:
        self.backend, self.out_dtype = backend, out_dtype
        # A backend whose run() predates ``out`` still serves calls that give one: its result is copied in.
        self.takes_out = "out" in inspect.signature(backend.run).parameters

    def __call__(self, x_fp8, x_scale, w_fp8, weight_scale_inv, bias, work=None, out=None) -> torch.Tensor:
        if out is None:
            return self.backend.run(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, self.out_dtype)
        if not self.takes_out:
            return out.copy_(self.backend.run(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, self.out_dtype))
        return self.backend.run(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, self.out_dtype, out=out)
