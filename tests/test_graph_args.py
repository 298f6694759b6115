"""graph_args: the driver's kernel-node parameters as ctypes lays them out (CPU), and a captured kernel pointed
at another tensor (GPU): later replays read the new tensor, replays already queued keep the old one."""

from __future__ import annotations

import ctypes

import pytest
import torch

from blockfp8 import graph_args
from blockfp8.timer import capture_graph


def test_kernel_node_params_match_cuda_h():
    """CUDA_KERNEL_NODE_PARAMS_v2 on 64-bit: func, grid[3], block[3], sharedMemBytes, then the pointers."""
    p = graph_args.KernelNodeParams
    assert [(name, getattr(p, name).offset) for name, _ in p._fields_] == [
        ("func", 0), ("grid", 8), ("block", 20), ("shared_mem_bytes", 32), ("kernel_params", 40), ("extra", 48),
        ("kern", 56), ("ctx", 64)]
    assert ctypes.sizeof(p) == 72


def _scaled_copy_graph(src: torch.Tensor, dst: torch.Tensor) -> torch.cuda.CUDAGraph:
    from blockfp8.backends.triton.act_quant import quantize_activation_fused

    def body():
        q, s = quantize_activation_fused(src)
        dst.copy_(q.float() * s.repeat_interleave(128, -1)[..., :src.shape[-1]])

    graph, _ = capture_graph(body, warmup=1, keep_graph=True)
    return graph


@pytest.mark.gpu
def test_the_driver_offers_rebinding():
    assert graph_args.keeps_graphs(), "libcuda's cuGraphExecKernelNodeSetParams_v2 / cuFuncGetParamInfo missing"


@pytest.mark.gpu
def test_a_rebound_graph_reads_the_new_tensor_and_queued_replays_the_old():
    a = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16) * 3
    out = torch.empty(2, 256, device="cuda")
    graph = _scaled_copy_graph(a, out)
    arg = graph_args.PointerArg.find(graph, a.data_ptr())
    assert arg is not None and arg.address == a.data_ptr()
    want_a, want_b = (t.float() for t in (a, b))  # within e4m3 rounding of the inputs
    torch.cuda._sleep(50_000_000)  # the GPU is busy: both replays below are queued before either runs
    graph.replay()
    got_a = out.clone()
    assert arg.point_at(b.data_ptr())
    graph.replay()
    got_b = out.clone()
    torch.cuda.synchronize()
    for got, want in ((got_a, want_a), (got_b, want_b)):
        assert float((got - want).norm() / want.norm()) < 0.05
    assert not torch.equal(got_a, got_b)


@pytest.mark.gpu
def test_an_address_held_by_no_kernel_is_not_found():
    a = torch.randn(1, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, 128, device="cuda")
    graph = _scaled_copy_graph(a, out)
    assert graph_args.PointerArg.find(graph, a.data_ptr() + 256) is None


@pytest.mark.gpu
def test_the_driver_launch_replays_the_graph_on_the_stream_it_is_given():
    a = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(2, 256, device="cuda")
    graph = _scaled_copy_graph(a, out)
    side = torch.cuda.Stream()
    launch = graph_args.launcher(graph, side.cuda_stream)
    assert launch is not None
    out.zero_()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)
    launch()  # called outside the side stream's context: it must still run there, after the sleep
    assert not side.query()
    side.synchronize()
    assert float((out - a.float()).norm() / a.float().norm()) < 0.05
