"""When backends/triton/launch.py relaunches a compiled kernel directly and when it takes Triton's own launch
path: the fast relaunch only on Triton releases it was verified on (or when forced), never under the
interpreter; otherwise every launch goes through ``kernel[grid](...)``. Programmatic dependent launch: on by
default on the Triton releases it was verified on, BLOCKFP8_PDL=1 / 0 forces it on / off, never under the
interpreter. The hardware fp8 conversion in the quantizers: off until a GPU suite verifies it, BLOCKFP8_HW_FP8_CAST=1
turns it on, never under the interpreter. CPU: Triton and the kernel are stubs."""

from __future__ import annotations

import contextlib

import pytest

from blockfp8.backends.triton import launch


def _triton_and_setting(monkeypatch, version: str, env: str, setting: str | None, interpret: bool) -> None:
    monkeypatch.setattr(launch.triton, "__version__", version)
    monkeypatch.setattr(launch, "INTERPRET", interpret)
    if setting is None:
        monkeypatch.delenv(env, raising=False)
    else:
        monkeypatch.setenv(env, setting)


@pytest.mark.parametrize("version,setting,interpret,want", [
    ("3.6.0", None, False, True),  # the verified release
    ("3.6.1", None, False, True),
    ("3.9.0", None, False, True),
    ("3.10.0", None, False, False),  # newer: Triton's own launch path until verified
    ("3.5.1", None, False, False),
    ("3.10.0", "1", False, True),  # forced on
    ("3.6.0", "0", False, False),  # forced off
    ("3.6.0", "1", True, False),  # never in the interpreter
])
def test_fast_relaunch_only_where_verified(monkeypatch, version, setting, interpret, want):
    _triton_and_setting(monkeypatch, version, launch.ENV_FAST_LAUNCH, setting, interpret)
    assert launch._fast_launch_enabled() is want
    assert launch.VERIFIED_TRITON == ((3, 6), (3, 9))


@pytest.mark.parametrize("version,setting,interpret,want", [
    ("3.6.0", None, False, True),  # on by default on the verified release
    ("3.6.2", None, False, True),
    ("3.9.0", None, False, False),  # not verified: off unless asked
    ("3.9.0", "1", False, True),  # asked
    ("3.6.0", "0", False, False),  # turned off
    ("3.6.0", None, True, False),  # never in the interpreter
    ("3.6.0", "1", True, False),
])
def test_pdl_is_on_by_default_where_verified_off_when_asked_and_never_interpreted(monkeypatch, version, setting,
                                                                                  interpret, want):
    _triton_and_setting(monkeypatch, version, launch.ENV_PDL, setting, interpret)
    assert launch._pdl_enabled() is want
    assert launch.ENV_PDL == "BLOCKFP8_PDL" and launch.PDL_VERIFIED_TRITON == ((3, 6),)


@pytest.mark.parametrize("version,setting,interpret,want", [
    ("3.6.0", None, False, False),  # no GPU suite has run with it yet: off by default everywhere
    ("3.9.0", None, False, False),
    ("3.6.0", "1", False, True),  # asked
    ("3.9.0", "0", False, False),
    ("3.6.0", "1", True, False),  # never in the interpreter, whose cast truncates
])
def test_hardware_fp8_cast_is_off_until_verified_and_never_interpreted(monkeypatch, version, setting, interpret,
                                                                        want):
    _triton_and_setting(monkeypatch, version, launch.ENV_HW_FP8_CAST, setting, interpret)
    assert launch._hw_fp8_cast_enabled() is want
    assert launch.ENV_HW_FP8_CAST == "BLOCKFP8_HW_FP8_CAST" and launch.HW_FP8_CAST_VERIFIED_TRITON == ()


class _Kernel:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "f", "meta"

    def run(self, *args):
        self.log.append(("direct", args[9:]))


class _Jit:
    """Stands in for a @triton.jit function: ``fn[grid](*args, **constexprs)`` launches and returns the
    compiled kernel, as Triton's own path does."""

    arg_names = ["a", "b", "C"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.log.append(("triton", args))
            return _Kernel(self.log)
        return launch_


class _Arg:
    """Stands in for a tensor on CUDA device ``index``."""

    def __init__(self, index: int = 0):
        self.device = type("device", (), {"index": index})()


class _Devices:
    """Stands in for the current CUDA device (0 to begin with) and for making another one current."""

    def __init__(self, monkeypatch):
        self.current, self.entered = 0, []
        monkeypatch.setattr(launch, "current_device_index", lambda: self.current)
        monkeypatch.setattr(launch, "current_raw_stream", lambda index: 100 + index)
        monkeypatch.setattr(launch, "device_scope", self.scope)

    @contextlib.contextmanager
    def scope(self, index):
        before, self.current = self.current, index
        self.entered.append(index)
        try:
            yield
        finally:
            self.current = before


@pytest.mark.parametrize("fast", [False, True])
def test_launches_take_triton_s_path_unless_fast(monkeypatch, fast):
    monkeypatch.setattr(launch, "FAST_LAUNCH", fast)
    _Devices(monkeypatch)
    jit = _Jit()
    kernel = launch.FastLaunch(jit)
    args = (_Arg(), 7)
    for _ in range(3):
        kernel("key", (1,), args, {"C": 4})
    kinds = [kind for kind, _ in jit.log]
    # The first launch of a key always takes Triton's path (it compiles); later ones relaunch directly when fast.
    assert kinds == (["triton", "direct", "direct"] if fast else ["triton"] * 3)
    if fast:
        assert jit.log[1][1] == (*args, 4)  # the constexpr passed positionally, after the runtime arguments
    else:
        assert kernel._compiled == {}


class _JitOnDevice(_Jit):
    """A @triton.jit stand-in that records the device current at each launch."""

    def __init__(self, devices):
        super().__init__()
        self.devices = devices

    def __getitem__(self, grid):
        launch_ = super().__getitem__(grid)

        def on_device(*args, **kwargs):
            kernel = launch_(*args, **kwargs)
            self.log[-1] = ("triton", self.devices.current)
            kernel.run = lambda *a: self.log.append(("direct", self.devices.current, a[3]))  # a[3]: the stream
            return kernel
        return on_device


def test_a_launch_on_another_gpu_makes_that_gpu_current_and_keeps_its_own_kernels(monkeypatch):
    """Kernels launch on the current device: a call whose tensors live on cuda:1 while cuda:0 is current must
    compile, load and launch on cuda:1 (as a model placed on cuda:1, or split over GPUs, calls it), and cuda:0's
    compiled kernel must never be relaunched for it."""
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)
    devices = _Devices(monkeypatch)
    jit = _JitOnDevice(devices)
    kernel = launch.FastLaunch(jit)
    for index in (0, 1, 1, 0):
        kernel("key", (1,), (_Arg(index), 7), {"C": 4})
    assert jit.log == [("triton", 0), ("triton", 1), ("direct", 1, 101), ("direct", 0, 100)]
    assert devices.entered == [1, 1] and devices.current == 0
    assert sorted(kernel._compiled) == [(0, "key"), (1, "key")]


def _each_kernel_launch(monkeypatch, look) -> dict:
    """{kernel name: look(kernel, args, constexprs, options)} for one launch of each kernel blockfp8 launches
    through FastLaunch (run in the interpreter)."""
    import torch

    from blockfp8.backends.triton import act_quant, producers
    from blockfp8.backends.triton.gemm import TritonGemmPlan
    from blockfp8.testing.operands import random_activation, random_fp8_weight

    seen = {}
    original = launch.FastLaunch.__call__

    def record(self, key, grid, args, constexprs, **options):
        seen[self.fn.__name__] = look(self.fn, args, constexprs, options)
        return original(self, key, grid, args, constexprs, **options)

    monkeypatch.setattr(launch.FastLaunch, "__call__", record)
    x = random_activation(2, 256)
    producers.rms_norm_quant_triton(x, torch.ones(256, dtype=torch.bfloat16), 1e-6, x.clone())
    producers.silu_mul_quant_triton(x)
    xq, xs = act_quant.quantize_activation_fused(x)
    wq, ws = random_fp8_weight(128, 256)
    TritonGemmPlan(wq, ws, None, torch.bfloat16, 2)(xq, xs, wq, ws, None)
    return seen


@pytest.mark.skipif(not launch.INTERPRET, reason="runs the kernels in the interpreter on the CPU")
def test_every_fast_launched_kernel_can_relaunch(monkeypatch):
    """A kernel relaunches directly only when its caller passes the constexprs in declaration order after every
    runtime argument (FastLaunch then keeps it): checked for each kernel blockfp8 launches through FastLaunch, since
    on a GPU a wrong order does not fail, it only stays on Triton's slow path."""
    seen = _each_kernel_launch(monkeypatch, lambda fn, args, constexprs, options:
                               list(constexprs) == fn.arg_names[len(args):])
    assert seen == {"_rms_norm_quant_kernel": True, "_silu_mul_quant_kernel": True, "_act_quant_kernel": True,
                    "_fp8_block_gemm_kernel": True}


@pytest.mark.skipif(not launch.INTERPRET, reason="runs the kernels in the interpreter on the CPU")
def test_every_kernel_pins_its_fma_contraction(monkeypatch):
    """Each launch names enable_fp_fusion instead of taking Triton's default, which Triton 3.10 turns off: the
    quantizers without contraction (bit for bit with torch's separately rounded steps), the GEMM with it (its
    promotion's multiply-adds, as every measurement of it was taken)."""
    seen = _each_kernel_launch(monkeypatch, lambda fn, args, constexprs, options: options.get("enable_fp_fusion"))
    assert seen == {"_rms_norm_quant_kernel": False, "_silu_mul_quant_kernel": False, "_act_quant_kernel": False,
                    "_fp8_block_gemm_kernel": True}


def test_on_device_of_makes_another_gpu_current_and_leaves_the_current_one_alone(monkeypatch):
    import torch

    from blockfp8 import device

    monkeypatch.setattr(device, "current_device_index", lambda: 0)
    assert isinstance(device.on_device_of(torch.zeros(1)), contextlib.nullcontext)  # a CPU tensor
    assert isinstance(device.on_device_of(_Arg(0)), contextlib.nullcontext)
    scope = device.on_device_of(_Arg(1))
    assert isinstance(scope, torch.cuda.device) and scope.idx == 1
