"""Read and write block-FP8 checkpoints in the Hugging Face / DeepSeek format with safetensors.

Format: every quantized linear layer ``<prefix>`` stores ``<prefix>.weight`` (float8_e4m3fn, (N, K)) and
``<prefix>.weight_scale_inv`` (fp32, (ceil(N/128), ceil(K/128)), multiplies on dequantization); every other
tensor is stored as it is. ``config.json`` carries ``quantization_config`` (``quant_method: "fp8"``,
``weight_block_size: [128, 128]``, ...). Tensors live in ``model.safetensors``, or, past the shard size, in
``model-0000i-of-0000N.safetensors`` files listed by ``model.safetensors.index.json``.

Everything here streams: reading yields one tensor at a time, writing holds at most one shard in memory,
and output goes to a temporary folder that is renamed into place only once complete.
"""

from .converting import DEFAULT_SKIP, ConvertSummary, convert_checkpoint, skip_reason
from .files import (
    CONFIG_NAME,
    INDEX_NAME,
    SCALE_SUFFIX,
    SINGLE_NAME,
    WEIGHT_SUFFIX,
    Fp8QuantConfig,
    TensorInfo,
    check_fp8_tensors,
    iter_checkpoint,
    prefix_of,
    read_quantization_config,
    read_tensor_infos,
    weight_map,
)
from .loading import LoadReport, load_fp8_model
from .writing import DEFAULT_MAX_SHARD_BYTES, check_output_dir, parse_size, save_fp8_checkpoint

__all__ = [
    "CONFIG_NAME", "DEFAULT_MAX_SHARD_BYTES", "DEFAULT_SKIP", "INDEX_NAME", "SCALE_SUFFIX", "SINGLE_NAME",
    "WEIGHT_SUFFIX", "ConvertSummary", "Fp8QuantConfig", "LoadReport", "TensorInfo", "check_fp8_tensors",
    "check_output_dir", "convert_checkpoint", "iter_checkpoint", "load_fp8_model", "parse_size", "prefix_of",
    "read_quantization_config", "read_tensor_infos", "save_fp8_checkpoint", "skip_reason", "weight_map",
]
