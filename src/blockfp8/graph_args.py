"""Pointing a kernel inside an instantiated CUDA graph at another tensor, through the CUDA driver.

A CUDA graph replays its kernels with the arguments they were captured with. An eager linear's graph
(eager_graphs.py) reads the caller's activation, and in most decode loops that activation lives at a new address
at every call (transformers' generate() with a growing cache allocates anew each step). Copying it into a buffer
the graph reads is one more launch per call (``cudaMemcpyAsync``: about 7 us of host time measured inside
generate() on an H100 host, docs/performance.md). The driver can instead change one argument of the kernel node
that reads it (``cuGraphExecKernelNodeSetParams``): nothing is enqueued, and only later launches of the graph
see the change, so replays already queued keep the address they were launched with.

``PointerArg.find`` locates the argument by its value: the one pointer-sized argument, over every kernel node of
the graph whose arguments the driver shows, that holds the captured tensor's address. Finding it says only that
one such kernel was given the address as a plain argument, not that no other node reads the tensor: the caller
proves the rebinding on other data, against a direct launch, before relying on it (eager_graphs.py).
Without the driver library or the entry points used here (``cuFuncGetParamInfo`` came with CUDA 12.4), or with
a torch whose ``CUDAGraph`` cannot keep its graph, ``find`` returns None and callers keep copying.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from ctypes import POINTER, byref, c_int, c_size_t, c_uint, c_uint64, c_void_p
from functools import cache

import torch

_KERNEL_NODE = 0  # CU_GRAPH_NODE_TYPE_KERNEL
_OUT_OF_RANGE = 1  # CUDA_ERROR_INVALID_VALUE: what cuFuncGetParamInfo returns past the last argument


class KernelNodeParams(ctypes.Structure):
    """``CUDA_KERNEL_NODE_PARAMS_v2`` of cuda.h, field for field."""

    _fields_ = [("func", c_void_p), ("grid", c_uint * 3), ("block", c_uint * 3), ("shared_mem_bytes", c_uint),
                ("kernel_params", POINTER(c_void_p)), ("extra", POINTER(c_void_p)), ("kern", c_void_p),
                ("ctx", c_void_p)]


@cache
def driver() -> dict[str, object] | None:
    """The driver entry points used here, or None where the library or one of them is missing."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fns = {name: getattr(lib, symbol) for name, symbol in (
            ("get_nodes", "cuGraphGetNodes"), ("node_type", "cuGraphNodeGetType"),
            ("get_params", "cuGraphKernelNodeGetParams_v2"), ("set_params", "cuGraphExecKernelNodeSetParams_v2"),
            ("param_info", "cuFuncGetParamInfo"), ("launch", "cuGraphLaunch"))}
    except (OSError, AttributeError):
        return None
    for fn in fns.values():
        fn.restype = c_int
    return fns


def keeps_graphs() -> bool:
    """Whether this torch's ``CUDAGraph`` can keep its captured graph (``keep_graph=True``), whose nodes
    ``find`` reads and the instantiated graph is updated through."""
    return hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph_exec") and driver() is not None


def _param_sizes(drv: dict, func: int) -> list[int] | None:
    """The byte size of each argument of kernel ``func``, or None when the driver cannot tell."""
    sizes = []
    offset, size = c_size_t(), c_size_t()
    while True:
        status = drv["param_info"](c_void_p(func), c_size_t(len(sizes)), byref(offset), byref(size))
        if status == _OUT_OF_RANGE:
            return sizes
        if status != 0:
            return None
        sizes.append(size.value)


def _kernel_nodes(drv: dict, graph: int) -> list[tuple[int, KernelNodeParams, list[int]]] | None:
    """(node, its parameters, its arguments' sizes) for every kernel node of ``graph`` whose arguments the driver
    shows (a library's kernel may come without: cuBLAS's, on an H100), or None if the graph cannot be read."""
    count = c_size_t(0)
    if drv["get_nodes"](c_void_p(graph), None, byref(count)) != 0:
        return None
    nodes = (c_void_p * count.value)()
    if count.value and drv["get_nodes"](c_void_p(graph), nodes, byref(count)) != 0:
        return None
    found = []
    for node in nodes:
        kind = c_int(-1)
        if drv["node_type"](c_void_p(node), byref(kind)) != 0:
            return None
        params = KernelNodeParams()
        if kind.value != _KERNEL_NODE or drv["get_params"](c_void_p(node), byref(params)) != 0 or not params.func:
            continue
        sizes = _param_sizes(drv, params.func)
        if sizes is not None and (params.kernel_params or not sizes):
            found.append((node, params, sizes))
    return found


class PointerArg:
    """One pointer argument of one kernel node in an instantiated CUDA graph; ``point_at(address)`` makes the
    graph's later launches pass ``address`` there instead."""

    def __init__(self, graph_exec: int, node: int, params: KernelNodeParams, sizes: list[int], index: int,
                 address: int) -> None:
        # Own copies of every argument's bytes: the node's storage belongs to the driver.
        self._bytes = []
        for i, size in enumerate(sizes):
            buf = ctypes.create_string_buffer(max(size, 1))
            ctypes.memmove(buf, params.kernel_params[i], size)
            self._bytes.append(buf)
        self._value = c_uint64(address)
        pointers = (c_void_p * max(len(sizes), 1))(*(ctypes.addressof(b) for b in self._bytes))
        pointers[index] = ctypes.addressof(self._value)
        self._pointers = pointers
        self._params = KernelNodeParams(params.func, params.grid, params.block, params.shared_mem_bytes,
                                        ctypes.cast(pointers, POINTER(c_void_p)), None, params.kern, params.ctx)
        self._set = driver()["set_params"]
        self._call = (c_void_p(graph_exec), c_void_p(node), byref(self._params))
        self.address = address
        # The kernel was compiled for the captured address's alignment (Triton specializes a pointer on being
        # 16-byte aligned): an address without that alignment cannot take its place.
        self.aligned = address % 16 == 0

    @classmethod
    def find(cls, graph: torch.cuda.CUDAGraph, address: int) -> PointerArg | None:
        """The argument of ``graph`` (captured with ``keep_graph=True`` and instantiated) that holds ``address``:
        exactly one pointer-sized argument over all its kernel nodes, else None."""
        drv = driver()
        if drv is None:
            return None
        try:
            raw, raw_exec = graph.raw_cuda_graph(), graph.raw_cuda_graph_exec()
        except (AttributeError, RuntimeError):
            return None
        nodes = _kernel_nodes(drv, raw)
        if nodes is None:
            return None
        hits = [(node, params, sizes, i) for node, params, sizes in nodes for i, size in enumerate(sizes)
                if size == 8 and c_uint64.from_address(params.kernel_params[i]).value == address]
        if len(hits) != 1:
            return None
        return cls(raw_exec, *hits[0], address)

    def point_at(self, address: int) -> bool:
        """Make later launches read ``address``; False (nothing changed) when it cannot take the captured one's
        place or the driver refuses."""
        if address == self.address:
            return True
        if self.aligned and address % 16:
            return False
        self._value.value = address
        if self._set(*self._call) != 0:
            self._value.value = self.address
            return False
        self.address = address
        return True


def launcher(graph: torch.cuda.CUDAGraph, stream: int) -> Callable[[], None] | None:
    """``graph.replay()`` on the raw ``stream`` straight through the driver (``cuGraphLaunch``), or None where it
    cannot be had. For a graph that uses no random numbers and is launched on its own device, that is all torch's
    replay does besides a device guard and a driver-version query, which together cost host time
    of their own on every call (a replay took 8.9 us inside generate() on an H100 host, its ``cudaGraphLaunch``
    4.4-4.9 us; docs/performance.md)."""
    drv = driver()
    try:
        graph_exec = graph.raw_cuda_graph_exec() if drv is not None else None
    except (AttributeError, RuntimeError):
        graph_exec = None
    if not graph_exec:
        return None
    launch, args = drv["launch"], (c_void_p(graph_exec), c_void_p(stream))

    def replay() -> None:
        status = launch(*args)
        if status != 0:
            raise RuntimeError(f"cuGraphLaunch failed with CUDA error {status}")

    return replay
