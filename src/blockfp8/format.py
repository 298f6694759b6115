"""The block-FP8 format: constants, scale-shape rules and the checkpoint config record. A leaf: imports nothing
from the package.

DeepSeek-V3 / Hugging Face convention: weights are ``float8_e4m3fn`` (N, K) with one fp32 ``weight_scale_inv``
per 128x128 block, shape (ceil(N/128), ceil(K/128)); activations carry one fp32 scale per token per 1x128
group, shape (..., ceil(K/128)). Scales *multiply* on dequantization, and tail blocks are partial: nothing is
padded in the stored tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
# The largest finite float8_e4m3fn value (S.1111.110 = 1.75 * 2^8): the quantizers map each group's amax here.
FP8_MAX = 448.0
# Groups with a smaller amax share this floor, so all-zero groups get a finite scale and quantize to zeros.
AMAX_FLOOR = 1e-10
# float8_e4m3fn has no Inf; its only NaN encodings are S.1111.111 (bytes 0x7F and 0xFF): byte & mask == mask.
FP8_NAN_BITS = 0x7F
# The largest weight scale accepted where weights enter the project (a power of two, so it is exact in fp32 and
# the largest UE8M0 scale too). A block's largest dequantized weight is then 448 * 2^56 < 2^65, and no
# kernel's arithmetic -- an fp8 group dot product (at most 128 * 448^2 < 2^25) times the activation scale
# (amax / 448) times the weight scale -- reaches fp32's 2^128 for activations below 2^56 (about 7.2e16) in
# magnitude. Real checkpoints hold |w| < 1e4 (scales < 25); a larger scale is a corrupt or mis-scaled tensor.
MAX_WEIGHT_SCALE = 2.0**56
BLOCK = 128  # weight block edge and activation group width: one K block column is one activation group
DEFAULT_BLOCK = (BLOCK, BLOCK)
DEFAULT_GROUP = BLOCK
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # activations, float weights, bias, outputs

# Decode (M up to this many rows) streams weights and is latency-bound; above it the MMA pipelines lead. The
# dispatcher's static order, the Triton launch heuristics and the Gluon tile choice switch at this M.
DECODE_MAX_M = 64

# Activation-scale layouts: "row" is (M, Kb) contiguous; "col" is (M, Kb) with strides (1, align(M, 4)) --
# column-major with the M stride padded to 16 bytes, the TMA-aligned layout DeepGEMM and cuBLAS blockwise read
# without a transpose of their own.
SCALE_LAYOUTS = ("row", "col")


@dataclass(frozen=True)
class Fp8QuantConfig:
    """The ``quantization_config`` of a block-FP8 checkpoint (Hugging Face ``FineGrainedFP8Config`` fields), as
    checkpoints and the configs of converted transformers models carry it."""

    block_size: tuple[int, int] = DEFAULT_BLOCK
    activation_scheme: str = "dynamic"
    fmt: str = "e4m3"
    modules_to_not_convert: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"quant_method": "fp8", "fmt": self.fmt, "activation_scheme": self.activation_scheme,
                "weight_block_size": list(self.block_size),
                "modules_to_not_convert": list(self.modules_to_not_convert)}


def cdiv(a: int, b: int) -> int:
    """Ceil division for non-negative ints."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1). ``triton.next_power_of_2`` took 2 us a call on a 2-core
    CPU, which eager launches would pay on every call."""
    return 1 << max(0, x - 1).bit_length()


def is_decode(m: int) -> bool:
    """Whether a GEMM with ``m`` rows is a decode-sized (weight-streaming) problem."""
    return m <= DECODE_MAX_M


def weight_scale_shape(n: int, k: int, block_size: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for an (n, k) weight: (ceil(n/bn), ceil(k/bk))."""
    return cdiv(n, block_size[0]), cdiv(k, block_size[1])


def activation_scale_shape(shape: tuple[int, ...] | torch.Size, group_size: int = DEFAULT_GROUP) -> tuple[int, ...]:
    """Shape of the activation scales for an activation of ``shape`` [..., K]."""
    return (*shape[:-1], cdiv(shape[-1], group_size))


def empty_scales(m: int, kb: int, layout: str, device: torch.device | str) -> torch.Tensor:
    """An uninitialized (m, kb) fp32 activation-scale tensor in ``layout`` ("row" or "col")."""
    if layout == "row":
        return torch.empty(m, kb, dtype=torch.float32, device=device)
    if layout == "col":
        m_pad = cdiv(max(m, 1), 4) * 4
        return torch.empty(kb, m_pad, dtype=torch.float32, device=device).t()[:m]
    raise ValueError(f"layout must be one of {SCALE_LAYOUTS}, got {layout!r}")


def dtype_name(dtype: object) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (any other object: its str)."""
    return str(dtype).replace("torch.", "")
