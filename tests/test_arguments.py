"""Plain bad arguments to constructors and lookups raise a TypeError or ValueError naming the argument, before
any work: sizes (``validate.check_size``), devices (``validate.check_device``) and dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import blockfp8
from blockfp8 import Fp8BlockLinear
from blockfp8.validate import check_device, check_size

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("args,kwargs,error,message", [
    ((-1, 200), {}, ValueError, "in_features must be >= 1, got -1"),
    ((0, 200), {}, ValueError, "in_features must be >= 1, got 0"),
    ((300, 0), {}, ValueError, "out_features must be >= 1, got 0"),
    ((True, 200), {}, TypeError, "in_features must be an int, got bool"),
    ((300.0, 200), {}, TypeError, "in_features must be an int, got float"),
    ((300, 200), {"device": "foo"}, ValueError, "device 'foo' is not a device"),
    ((300, 200), {"bias_dtype": torch.int32}, TypeError, "bias_dtype must be bfloat16, float16 or float32"),
])
def test_fp8_block_linear_refuses_bad_arguments(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        Fp8BlockLinear(*args, **kwargs)


def test_fp8_block_linear_takes_numpy_sizes():
    layer = Fp8BlockLinear(np.int64(300), np.int64(200))
    assert (layer.in_features, layer.out_features) == (300, 200) and layer.weight.shape == (200, 300)


@pytest.mark.parametrize("args,kwargs,error,message", [
    ((-1, 128, 128), {}, ValueError, "m must be >= 1, got -1"),
    ((1, 0, 128), {}, ValueError, "n must be >= 1, got 0"),
    ((1.5, 128, 128), {}, TypeError, "m must be an int, got float"),
    ((1, 128, 128), {"backend": "nope"}, ValueError, "backend='nope' is not a backend"),
    ((1, 128, 128), {"device": "foo"}, ValueError, "device 'foo' is not a device"),
])
def test_explain_refuses_bad_arguments(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        blockfp8.explain(*args, **kwargs)


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_named():
    with pytest.raises(ValueError, match="device 'cuda': no CUDA device is available"):
        check_device("cuda")
    with pytest.raises(ValueError, match="device 'cuda:0': no CUDA device"):
        Fp8BlockLinear(256, 256, device="cuda:0")


def test_check_device_and_size_pass_good_values():
    assert check_device(None) is None and check_device("cpu") == torch.device("cpu")
    assert check_size(np.int32(3), "n") == 3 and check_size(torch.tensor(4), "n") == 4
    with pytest.raises(TypeError, match="device must be a torch.device"):
        check_device(1.0)
