"""blockfp8: block-scaled FP8 linear layers (128x128 weight blocks, 1x128 activation groups) for PyTorch."""

from . import hf
from .checkpoint import convert_checkpoint, load_fp8_model, save_fp8_checkpoint
from .dispatch import explain
from .hf import from_pretrained
from .nn import ConversionReport, Fp8BlockLinear, convert_model
from .ops import gemm, linear
from .quant import (
    dequantize_activation,
    dequantize_weight,
    quantize_activation,
    quantize_weight,
)
from .reference import reference_gemm, rel_error

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "Fp8BlockLinear",
    "convert_checkpoint",
    "convert_model",
    "dequantize_activation",
    "dequantize_weight",
    "explain",
    "from_pretrained",
    "gemm",
    "hf",
    "linear",
    "load_fp8_model",
    "quantize_activation",
    "quantize_weight",
    "reference_gemm",
    "rel_error",
    "save_fp8_checkpoint",
]

# Fused quantizing producers and the modules built on them (docs/fused.md).
from .fused import rms_norm_quant, silu_mul_quant  # noqa: E402
from .modules import Fp8GatedMLP, Fp8RMSNorm  # noqa: E402
from .quant import QuantizedActivation  # noqa: E402

__all__ += ["Fp8GatedMLP", "Fp8RMSNorm", "QuantizedActivation", "rms_norm_quant", "silu_mul_quant"]
