"""Which device a tensor is on, in the terms the dispatcher and the measured tables use. A leaf.

``device_key`` is the one name the tables are keyed by ("NVIDIA H100 80GB HBM3", or the device type off CUDA);
``cuda_identity`` reads a CUDA device's properties once per process (``get_device_properties`` costs tens of
microseconds, too much to pay per call).
"""

from __future__ import annotations

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


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_raw_stream(index: int | None = None) -> int:
    """The current CUDA stream of device ``index`` as a raw handle (what kernel launchers take). Much cheaper
    than ``torch.cuda.current_stream()``, which builds a Python Stream object per call (~8 us measured on an
    H200, benchmarks/host_overhead.py)."""
    if index is None:
        index = torch.cuda.current_device()
    return _RAW_STREAM(index) if _RAW_STREAM is not None else torch.cuda.current_stream(index).cuda_stream
