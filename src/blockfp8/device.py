"""Which device a tensor is on, in the terms the dispatcher and the measured tables use. A leaf.

``device_key`` is the one name the tables are keyed by ("NVIDIA H100 80GB HBM3", or the device type off CUDA);
``DeviceId`` adds what the tuning cache and the family lookups need (compute capability, SM count);
``cuda_identity`` reads a CUDA device's properties once per process (``get_device_properties`` costs tens of
microseconds, too much to pay per call).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class CudaIdentity:
    arch: tuple[int, int]  # compute capability
    name: str
    sms: int
    l2_bytes: int


@cache
def cuda_identity(index: int | None = None) -> CudaIdentity:
    """Compute capability, name, SM count and L2 size of a CUDA device (the current one for None), read once."""
    if index is None:
        index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return CudaIdentity((props.major, props.minor), props.name, props.multi_processor_count,
                        int(getattr(props, "L2_cache_size", 0) or 0))


@dataclass(frozen=True)
class DeviceId:
    """A device as the measured tables and the tuning cache know it: its name, compute capability (None off
    CUDA) and SM count (0 when unknown)."""

    name: str
    arch: tuple[int, int] | None = None
    sms: int = 0

    @property
    def family(self) -> tuple[tuple[int, int], int] | None:
        """(compute capability, SM count): devices of one family run the same kernels on the same number of
        SMs, so a ranking or launch config measured on one is the best guess for the other (H100 SXM and H200:
        9.0 and 132 SMs; they differ in memory bandwidth only). None when either is unknown."""
        return (self.arch, self.sms) if self.arch is not None and self.sms > 0 else None


def as_device(device: torch.device | str | int | None) -> torch.device:
    """A ``torch.device`` with an index on CUDA; None means the current CUDA device, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_key(device: torch.device | str | int | None = None) -> str:
    """The name measured tables are keyed by: the CUDA device name, or the device type elsewhere."""
    device = as_device(device)
    return cuda_identity(device.index).name if device.type == "cuda" else device.type


@cache
def _cuda_device_id(index: int) -> DeviceId:
    ident = cuda_identity(index)
    return DeviceId(ident.name, ident.arch, ident.sms)


def device_id(device: torch.device | str | int | None = None) -> DeviceId:
    """The ``DeviceId`` of a device (the current CUDA device for None when there is one); cached per device."""
    device = as_device(device)
    return _cuda_device_id(device.index) if device.type == "cuda" else DeviceId(device.type)


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)
# The current CUDA device's index without torch.cuda.current_device()'s Python around it (-1 without CUDA).
current_device_index = getattr(torch._C, "_cuda_getDevice", lambda: -1)


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s CUDA device current for a kernel launch when another one is: kernels launch on the current
    device (Triton's and DeepGEMM's launchers use its context and stream), so a tensor on another GPU (a model
    placed on cuda:1, or split over several GPUs) needs its own made current. Nothing when it already is."""
    index = t.device.index
    if index is None or index == current_device_index():
        return contextlib.nullcontext()
    return torch.cuda.device(index)


def current_raw_stream(index: int | None = None) -> int:
    """The current CUDA stream of device ``index`` as a raw handle (what kernel launchers take). Much cheaper
    than ``torch.cuda.current_stream()``, which builds a Python Stream object per call (~8 us measured on an
    H200, benchmarks/host_overhead.py)."""
    if index is None:
        index = torch.cuda.current_device()
    return _RAW_STREAM(index) if _RAW_STREAM is not None else torch.cuda.current_stream(index).cuda_stream
