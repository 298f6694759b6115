"""The one record of where a measurement was made: device, versions, and which backends can run here."""

from __future__ import annotations

import importlib
import os
import platform
import shlex
import sys
from datetime import datetime, timezone

import torch

from ..backends import backend_names, get_backend
from ..backends.triton import launch
from ..device import as_device, cuda_identity, device_key
from ..tuning_cache import dist_version, driver_version


def _module_version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown version")
    except Exception:  # noqa: BLE001 - an optional package may fail to import in any way
        return None


def environment(device: torch.device | str | None = None) -> dict:
    """Device, date, command line, library versions and every backend's availability (with the reason)."""
    from .. import __version__

    device = as_device(device)
    env = {
        "device": device_key(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["blockfp8", *sys.argv[1:]] if sys.argv[0].endswith("blockfp8") else sys.argv),
        "python": platform.python_version(),
        "blockfp8": __version__,
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        # How blockfp8's Triton kernels launch here: straight to the compiled kernel, and with programmatic
        # dependent launch (both change timings, never results).
        "triton_fast_launch": launch.FAST_LAUNCH,
        "triton_pdl": launch.pdl_ok(device),
        "deep_gemm": dist_version("deep_gemm", "deep-gemm", "deepinfer-gemm"),
        "torchao": dist_version("torchao"),
        "cuda": torch.version.cuda,
        "driver": None,
        "backends": {},
    }
    for name in backend_names():
        verdict = get_backend(name).availability()
        env["backends"][name] = {"available": verdict.ok, "reason": verdict.reason}
    if device.type == "cuda":
        ident = cuda_identity(device.index)
        env["driver"] = driver_version()
        env["deep_gemm"] = env["deep_gemm"] or _module_version("deep_gemm")
        env["sms"] = ident.sms
        env["capability"] = f"{ident.arch[0]}.{ident.arch[1]}"
    return env


def environment_line(env: dict) -> str:
    """One line: device, versions, available backends (unavailable ones marked with a minus sign)."""
    marks = " ".join(f"{b}{'+' if v['available'] else '-'}" for b, v in env["backends"].items())
    interp = " (Triton interpreter)" if env["triton_interpreter"] else " (PDL)" if env.get("triton_pdl") else ""
    cuda = f" cuda {env['cuda']}" if env["cuda"] else ""
    return f"{env['device']} | torch {env['torch']}{cuda} | triton {env['triton']}{interp} | backends: {marks}"
