"""How blockfp8 launches its Triton kernels: the interpreter switch and its lock, and the fast relaunch of a
kernel already compiled.

``TRITON_INTERPRET=1`` (read once, when this module is imported) runs kernels on the CPU in Triton's interpreter.
The interpreter keeps process-wide state (it patches ``triton.language`` and holds the current grid), so two
threads running kernels in it at once corrupt each other: interpreted launches are serialized here. Compiled
launches on a GPU need no lock (they only enqueue work on a stream).

``FastLaunch``: ``kernel[grid](*args)`` spends most of its host time before the launch itself -- binding and
specializing every argument, hashing the cache key, building launch metadata (measured on an H200 with Triton
3.6: 34-40 us per call for the GEMM, of which the compiled kernel's own launcher takes 12-16 us;
docs/performance.md). The callers of ``FastLaunch`` know which inputs can change a launch's specialization (the
token count M, and the alignment/strides of a tensor the user handed in; everything else is fixed by the layer or
freshly allocated): they pass those as ``key``. The first launch of a key goes through Triton's normal path,
which compiles (or finds) the kernel and returns it; later launches of the key call that compiled kernel
directly. Only on Triton versions whose launcher signature was verified on a GPU (bit-identical outputs,
tests/backends/test_fast_launch.py), never under the interpreter, never while a launch hook (a profiler) is set,
and ``BLOCKFP8_FAST_LAUNCH=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Hashable, Sequence

import torch
import triton

from ...device import cuda_identity, current_device_index, current_raw_stream

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ENV_FAST_LAUNCH = "BLOCKFP8_FAST_LAUNCH"
# Triton releases whose CompiledKernel.run signature the fast path was verified against on a GPU (3.9: an H100,
# tests/backends/test_fast_launch.py forced on, bit-identical; docs/performance.md).
VERIFIED_TRITON = ((3, 6), (3, 9))

_INTERPRETER_LOCK = threading.Lock()
# Makes a CUDA device current for a block (a name of its own so that the CPU tests can stand in for it).
device_scope = torch.cuda.device


def launch_guard() -> contextlib.AbstractContextManager:
    """Hold this around a kernel launch: the interpreter's lock under TRITON_INTERPRET, nothing otherwise."""
    return _INTERPRETER_LOCK if INTERPRET else contextlib.nullcontext()


def triton_release() -> tuple[int, int]:
    """The installed Triton's (major, minor): the unit the verified-release lists name."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def _verified_switch(env: str, verified: tuple[tuple[int, int], ...]) -> bool:
    """A launch switch: ``env=0`` off, ``env=1`` on, unset on only on the Triton releases in ``verified``; always
    off under the interpreter."""
    setting = os.environ.get(env)
    if INTERPRET or setting == "0":
        return False
    if setting == "1":
        return True
    return triton_release() in verified


def _fast_launch_enabled() -> bool:
    return _verified_switch(ENV_FAST_LAUNCH, VERIFIED_TRITON)


FAST_LAUNCH = _fast_launch_enabled()


ENV_PDL = "BLOCKFP8_PDL"
# Triton releases on which the whole GPU suite passed with programmatic dependent launch (3.6: an H100,
# benchmarks/results/h100_pdl). Its launch attribute and grid-dependency instructions come from Triton itself.
PDL_VERIFIED_TRITON = ((3, 6),)


def _pdl_enabled() -> bool:
    """Programmatic dependent launch (sm_90+): a GEMM launched with it starts while the kernel before it (the
    producer of its activation) still runs and waits (griddepcontrol.wait) before it reads or writes anything;
    producers let it launch as soon as all their programs have started. 3% faster per llama decode layer at M=1
    and 16 on an H100, 2-3% on an H200, bytes equal to plain launches (docs/performance.md). On by default on the
    Triton releases it was verified on, elsewhere only with BLOCKFP8_PDL=1; BLOCKFP8_PDL=0 turns it off. Never
    under the interpreter, which has no grid dependency control."""
    return _verified_switch(ENV_PDL, PDL_VERIFIED_TRITON)


PDL = _pdl_enabled()


def pdl_ok(device: torch.device) -> bool:
    """Whether kernels on ``device`` use programmatic dependent launch (``PDL`` and a CUDA device of sm_90+)."""
    return PDL and device.type == "cuda" and cuda_identity(device.index).arch >= (9, 0)


ENV_HW_FP8_CAST = "BLOCKFP8_HW_FP8_CAST"
# Triton releases on which the GPU suite passed with the hardware fp8 conversion: none yet.
HW_FP8_CAST_VERIFIED_TRITON: tuple[tuple[int, int], ...] = ()


def _hw_fp8_cast_enabled() -> bool:
    """Whether the quantizing kernels round to e4m3 with the GPU's own conversion (round to nearest even, as
    IEEE defines it) instead of emulating the rounding in fp32 bit arithmetic, which the interpreter needs (its
    cast truncates). The same bytes by definition, and a sixth to a quarter fewer instructions in programs of
    several groups (sm_90a, benchmarks/sass_count.py --hw-cast), but not yet run on a GPU: on by default only on
    the Triton releases whose GPU suite passed with it, elsewhere with BLOCKFP8_HW_FP8_CAST=1; never in the
    interpreter."""
    return _verified_switch(ENV_HW_FP8_CAST, HW_FP8_CAST_VERIFIED_TRITON)


HW_FP8_CAST = _hw_fp8_cast_enabled()


def hw_fp8_cast() -> bool:
    """``HW_FP8_CAST``, read at each launch (tests switch it)."""
    return HW_FP8_CAST


def _hooks_active() -> bool:
    """Whether a launch hook (e.g. a profiler's) is installed: then every launch takes Triton's own path."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    for name in ("launch_enter_hook", "launch_exit_hook"):
        hook = getattr(runtime, name, None)
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class FastLaunch:
    """Launches of one ``@triton.jit`` kernel, relaunching compiled kernels directly (see the module docstring).

    ``args`` are the runtime arguments in declaration order (the first a tensor on the launch's device) and
    ``constexprs`` the compile-time ones (every constexpr of the kernel, by name); ``options`` are launch options
    such as num_warps. Compiled kernels are kept per device and ``key``, which must determine the compiled kernel:
    every value of ``constexprs`` and ``options``, the dtypes, and every integer argument's and pointer's
    specialization (== 1, divisible by 16, 16-byte aligned) that can differ between calls with that key. One
    FastLaunch serves every layer, so the key must tell layers apart (their N, K, strides, alignment and
    constexprs).
    """

    def __init__(self, fn) -> None:
        self.fn = fn
        self._compiled: dict[Hashable, object] = {}

    def __call__(self, key: Hashable, grid: Sequence[int], args: tuple, constexprs: dict, **options) -> None:
        index = args[0].device.index
        if index is not None and index != current_device_index():
            # A kernel launches on the current device: Triton's path compiles and loads it there, and a loaded
            # kernel runs on its own device only. A call on another GPU makes its device current for the launch
            # (device_scope); its compiled kernels are kept apart by device. The check is device.on_device_of's,
            # inline so that the usual call (already on the current device) enters no context manager.
            with device_scope(index):
                return self(key, grid, args, constexprs, **options)
        key = (index, key)
        kernel = self._compiled.get(key) if FAST_LAUNCH else None
        if kernel is None or _hooks_active():
            with launch_guard():
                kernel = self.fn[tuple(grid)](*args, **constexprs, **options)
            # The direct launch passes constexprs positionally: only when they come in declaration order.
            if FAST_LAUNCH and kernel is not None and list(constexprs) == self.fn.arg_names[len(args):]:
                self._compiled[key] = kernel
            return
        g = tuple(grid)
        stream = current_raw_stream(index)
        # The launcher takes every parameter, constexprs included (it skips them), in declaration order.
        kernel.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream, kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *constexprs.values())
