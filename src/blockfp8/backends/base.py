"""The interface every GEMM backend implements, and its limits expressed as data.

A backend module defines one ``Backend`` subclass instance named ``BACKEND``. The dispatcher asks
``supports(problem)`` and gets a ``Support`` that is falsy with a human-readable reason when the backend
cannot run the problem; limits live in a ``Limits`` record, checked by one function, so ``blockfp8 check``
can test exactly what each backend claims.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch


@dataclass(frozen=True)
class Problem:
    """What the dispatcher knows about one GEMM call: y[M, N] = x[M, K] @ w[N, K].T."""

    m: int
    n: int
    k: int
    device_type: str = "cpu"
    arch: tuple[int, int] | None = None  # CUDA compute capability, None off CUDA
    out_dtype: torch.dtype = torch.bfloat16
    ue8m0: bool = False  # all scales are powers of two
    block: tuple[int, int] = (128, 128)
    group: int = 128
    device_name: str = ""  # keys the measured tables ("NVIDIA H100 80GB HBM3"); device_type when empty

    @staticmethod
    def of(m: int, n: int, k: int, device: torch.device | str, out_dtype: torch.dtype = torch.bfloat16,
           ue8m0: bool = False) -> Problem:
        device = torch.device(device)
        if device.type == "cuda":
            arch, name, _ = cuda_identity(device.index)
        else:
            arch, name = None, device.type
        return Problem(m, n, k, device.type, arch, out_dtype, ue8m0, device_name=name)


@cache
def cuda_identity(index: int | None) -> tuple[tuple[int, int], str, int]:
    """(compute capability, device name, SM count) of a CUDA device, read once."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.name, props.multi_processor_count


@dataclass(frozen=True)
class Support:
    """Truthy when supported; otherwise ``reason`` says why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


YES = Support(True)


@dataclass(frozen=True)
class Limits:
    """Declared limits of a backend. Every field is checked by ``check``; nothing else refuses a problem."""

    device_types: tuple[str, ...] = ("cpu", "cuda")
    min_arch: tuple[int, int] | None = None  # inclusive, CUDA only
    max_arch: tuple[int, int] | None = None  # inclusive, CUDA only
    n_multiple: int = 1
    k_multiple: int = 1
    m_multiple: int = 1  # a backend that pads M itself declares 1
    out_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
    blocks: tuple[tuple[int, int], ...] = ((128, 128),)
    groups: tuple[int, ...] = (128,)
    evidence: str = ""  # where the numbers come from (a measured probe, a doc)

    def check(self, p: Problem) -> Support:
        if p.device_type not in self.device_types:
            return Support(False, f"runs on {'/'.join(self.device_types)}, not {p.device_type}")
        if p.device_type == "cuda" and p.arch is not None:
            if self.min_arch and p.arch < self.min_arch:
                return Support(False, f"needs compute capability >= {_arch(self.min_arch)}, device is {_arch(p.arch)}")
            if self.max_arch and p.arch > self.max_arch:
                return Support(False, f"needs compute capability <= {_arch(self.max_arch)}, device is {_arch(p.arch)}")
        for dim, mult in (("N", self.n_multiple), ("K", self.k_multiple), ("M", self.m_multiple)):
            value = getattr(p, dim.lower())
            if value % mult:
                return Support(False, f"needs {dim} % {mult} == 0, got {dim}={value}")
        if p.out_dtype not in self.out_dtypes:
            return Support(False, f"output dtype {p.out_dtype} not in {[str(d) for d in self.out_dtypes]}")
        if p.block not in self.blocks:
            return Support(False, f"weight block {p.block} not supported (supports {list(self.blocks)})")
        if p.group not in self.groups:
            return Support(False, f"activation group {p.group} not supported (supports {list(self.groups)})")
        return YES


def _arch(a: tuple[int, int]) -> str:
    return f"{a[0]}.{a[1]}"


@dataclass
class Backend:
    """Base class: subclasses set ``name``/``limits`` and implement ``_available`` and ``run``."""

    name: str
    limits: Limits = field(default_factory=Limits)
    # Activation-scale layout the backend reads best: "row" (M, Kb) contiguous, or "col" (M, Kb) with
    # strides (1, align(M, 4)) -- the TMA-aligned column-major layout DeepGEMM and cuBLAS read.
    scale_layout: str = "row"
    _avail: tuple[bool, str] | None = field(default=None, repr=False)

    def availability(self) -> tuple[bool, str]:
        """(available, reason if not); cached, since it may import an optional package."""
        if self._avail is None:
            try:
                self._avail = self._available()
            except Exception as e:  # noqa: BLE001 - an optional peer may fail to import in any way
                self._avail = (False, f"import failed: {type(e).__name__}: {e}")
        return self._avail

    def is_available(self) -> bool:
        return self.availability()[0]

    def supports(self, p: Problem) -> Support:
        ok, why = self.availability()
        if not ok:
            return Support(False, why)
        return self.limits.check(p)

    def _available(self) -> tuple[bool, str]:
        return True, ""

    def run(self, x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor,
            weight_scale_inv: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """y[M, N] for 2-D x_fp8 (M, K) and x_scale (M, Kb) in any stride layout; M >= 1."""
        raise NotImplementedError

    def run_linear(self, x: torch.Tensor, w_fp8: torch.Tensor, weight_scale_inv: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """y[M, N] for float x (M, K): quantize per 1x128 group straight into the scale layout this backend
        reads (fused Triton quantizer on CUDA, the torch quantizer elsewhere), then ``run``. A backend that
        fuses quantization into its GEMM may override this, keeping the result bit-identical."""
        from ..act_quant import quantize_activation_fused
        from ..quant import quantize_activation

        if x.is_cuda:
            xq, xs = quantize_activation_fused(x, layout=self.scale_layout)
        else:
            xq, xs = quantize_activation(x)
        return self.run(xq, xs, w_fp8, weight_scale_inv, bias, out_dtype)
