"""Layers on a GPU other than the current one: a model placed on cuda:1, or split over GPUs (transformers'
``device_map="auto"``), calls blockfp8 while cuda:0 stays current. Every backend must launch on the tensors' own
GPU and give the reference's result there; a kernel compiled for one GPU must never be relaunched on another.
Needs two GPUs; the launch logic itself is tested on the CPU in tests/backends/test_launch_policy.py."""

from __future__ import annotations

import pytest
import torch

from blockfp8 import Fp8BlockLinear, quantize_activation, rms_norm_quant
from blockfp8.backends import get_backend
from blockfp8.quant import rms_norm
from blockfp8.reference import reference_gemm, rel_error
from blockfp8.testing.conformance import tolerance_for
from blockfp8.testing.operands import random_activation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs two CUDA devices")
BACKENDS = ["triton", "gluon", "cublas", "deepgemm", None]


def _layer(n: int, k: int, device: str, backend: str | None) -> Fp8BlockLinear:
    lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=k**-0.5)
    return Fp8BlockLinear.from_linear(lin, backend=backend).to(device)


@pytest.mark.parametrize("backend", BACKENDS, ids=[b or "dispatched" for b in BACKENDS])
def test_a_layer_on_the_second_gpu_while_the_first_is_current(backend):
    if backend is not None and not get_backend(backend).availability():
        pytest.skip(f"{backend}: {get_backend(backend).availability().reason}")
    torch.cuda.set_device(0)
    # The same shape on both GPUs, so that the kernels compiled for the first are the ones a mix-up would reuse.
    first, second = _layer(2112, 1536, "cuda:0", backend), _layer(2112, 1536, "cuda:1", backend)
    for m in (1, 16, 64, 300):
        for layer, device in ((first, "cuda:0"), (second, "cuda:1"), (second, "cuda:1"), (first, "cuda:0")):
            x = random_activation(m, 1536, seed=m, device=device)
            with torch.no_grad():
                y = layer(x)
            assert y.device == torch.device(device) and torch.cuda.current_device() == 0
            xq, xs = quantize_activation(x)
            want = reference_gemm(xq, xs, layer.weight, layer.weight_scale_inv, None, torch.bfloat16)
            assert rel_error(y, want) <= tolerance_for(want), (backend, m, device)
    torch.cuda.synchronize(1)


def test_a_fused_producer_on_the_second_gpu():
    torch.cuda.set_device(0)
    x = random_activation(16, 7168, device="cuda:1")
    w = random_activation(7168, 1, seed=2, device="cuda:1").view(7168)
    xq = rms_norm_quant(x, w, 1e-6, layout="row")
    q_ref, s_ref = quantize_activation(rms_norm(x, w, 1e-6))
    assert xq.values.device == torch.device("cuda:1")
    assert torch.equal(xq.values.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(xq.scales, s_ref)
