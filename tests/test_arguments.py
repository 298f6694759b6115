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


@pytest.mark.parametrize("make,error,message", [
    (lambda: blockfp8.Fp8GatedMLP(0, 0), ValueError, "hidden must be >= 1, got 0"),
    (lambda: blockfp8.Fp8GatedMLP(128, -1), ValueError, "intermediate must be >= 1, got -1"),
    (lambda: blockfp8.Fp8RMSNorm(-1), ValueError, "dim must be >= 1, got -1"),
    (lambda: blockfp8.Fp8RMSNorm(64, device="foo"), ValueError, "device 'foo' is not a device"),
    (lambda: blockfp8.quantize_activation(torch.zeros(5, 0)), ValueError, r"K >= 1 .* shape \(5, 0\)"),
    (lambda: blockfp8.dequantize_weight(*blockfp8.quantize_weight(torch.ones(128, 128)), dtype="float32"),
     TypeError, "dtype must be a torch.dtype"),
    (lambda: blockfp8.dequantize_activation(*blockfp8.quantize_activation(torch.ones(2, 128)), dtype=torch.int8),
     TypeError, "dtype must be bfloat16, float16 or float32, got int8"),
    (lambda: blockfp8.load_fp8_model(None, "folder"), TypeError, "model must be an nn.Module, got NoneType"),
    (lambda: blockfp8.load_fp8_model(torch.nn.Linear(2, 2), None), TypeError, "checkpoint_dir must be a folder"),
])
def test_modules_and_helpers_refuse_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_fuse_producers_refuses_a_non_module():
    pytest.importorskip("transformers")
    with pytest.raises(TypeError, match="model must be a transformers model"):
        blockfp8.hf.fuse_producers(None)


def test_save_fp8_checkpoint_refuses_an_empty_state_dict(tmp_path):
    with pytest.raises(ValueError, match="holds no tensor"):
        blockfp8.save_fp8_checkpoint({}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rel_error_refuses_what_it_would_compare_silently_wrong():
    with pytest.raises(ValueError, match=r"one shape, got \(2, 3\) and \(3,\)"):
        blockfp8.rel_error(torch.ones(2, 3), torch.ones(3))
    with pytest.raises(TypeError, match="out must be a torch.Tensor, got list"):
        blockfp8.rel_error([1.0], torch.ones(1))
