"""The one generator of random GEMM operands, shared by the tests, ``check``, ``bench``, ``tune`` and the demos.

Weights have a different magnitude in every 128x128 block (``spread``: the log-std of the per-block factor),
so a scale applied to the wrong block or group gives a large error instead of hiding inside the tolerance;
activations have a magnitude per token. Everything is drawn from a seeded generator on the target device, so
one seed gives the same operands on every run on one device type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..device import as_device
from ..format import BLOCK, cdiv, empty_scales
from ..quant import dequantize_activation, expand_block_scales, quantize_activation, quantize_weight
from ..reference import reference_gemm
from ..timer import COLD_FACTOR, rotated_copies

BF16 = torch.bfloat16


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def random_weight(n: int, k: int, *, spread: float = 2.0, seed: int = 0, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A float (N, K) weight ~N(0, 1) times a per-128x128-block factor exp(spread * N(0, 1))."""
    device = torch.device(device)
    g = _gen(device, seed)
    w = torch.randn(n, k, generator=g, device=device, dtype=dtype)
    if spread:
        factor = torch.exp(spread * torch.randn(cdiv(n, BLOCK), cdiv(k, BLOCK), generator=g, device=device))
        w.mul_(expand_block_scales(factor, (n, k), (BLOCK, BLOCK)).to(dtype))
    return w


def random_activation(m: int | tuple[int, ...], k: int, *, seed: int = 1, device: torch.device | str = "cpu",
                      dtype: torch.dtype = BF16, spread: float = 1.0) -> torch.Tensor:
    """Float activations [*m, K] ~N(0, 1) times a per-token factor exp(spread * N(0, 1))."""
    device = torch.device(device)
    lead = (m,) if isinstance(m, int) else tuple(m)
    g = _gen(device, seed)
    x = torch.randn(*lead, k, generator=g, device=device)
    x = x * torch.exp(spread * torch.randn(*lead, 1, generator=g, device=device))
    return x.to(dtype)


def random_fp8_weight(n: int, k: int, *, spread: float = 2.0, seed: int = 0, device: torch.device | str = "cpu",
                      ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_weight`` of ``random_weight``: (w_fp8 (N, K), weight_scale_inv (Nb, Kb))."""
    return quantize_weight(random_weight(n, k, spread=spread, seed=seed, device=device), ue8m0=ue8m0)


def random_problem(m: int | tuple[int, ...], n: int, k: int, *, spread: float = 2.0, seed: int = 0,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """(x bf16, x_fp8, x_scale, w_fp8, weight_scale_inv) of one GEMM, activations quantized by the torch
    quantizer (row-major scales)."""
    wq, ws = random_fp8_weight(n, k, spread=spread, seed=seed, device=device)
    x = random_activation(m, k, seed=seed + 1, device=device)
    return (x, *quantize_activation(x), wq, ws)


def weight_copies(wq: torch.Tensor, ws: torch.Tensor, copies: int | None = None, factor: float = COLD_FACTOR
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(wq, ws)`` and clones of it: by default enough that cycling through them reads every weight from HBM
    (``timer.rotated_copies``: together more than ``factor`` x L2; one copy off CUDA)."""
    return rotated_copies((wq, ws), copies, factor)


def make_weight_copies(n: int, k: int, device: torch.device | str, copies: int | None = None,
                       seed: int = 0, factor: float = COLD_FACTOR) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A random block-FP8 weight (``spread`` 1) and copies of it for L2-cold timing (``weight_copies``)."""
    device = as_device(device)
    return weight_copies(*random_fp8_weight(n, k, spread=1.0, seed=seed, device=device), copies, factor)


@dataclass
class Operands:
    """Inputs of one (N, K, M) cell. ``weights`` holds copies with equal values (rotated for L2-cold timing);
    the activation is shared by all calls, as a layer's input sits in L2 after the op that produced it."""

    x: torch.Tensor  # (M, K) bf16: the linear's input
    x_fp8: torch.Tensor  # (M, K) quantized by blockfp8's quantizer
    x_scale: torch.Tensor  # (M, Kb) fp32 row-major
    x_scale_col: torch.Tensor  # (M, Kb) fp32 column-major, TMA-aligned (format.empty_scales "col")
    x_dequant: torch.Tensor  # (M, K) bf16 dequantized activation: the bf16 peer's input
    weights: list[tuple[torch.Tensor, torch.Tensor]]  # (w_fp8 (N, K), weight_scale_inv (Nb, Kb)) copies

    @property
    def mnk(self) -> tuple[int, int, int]:
        m, k = self.x.shape
        return m, self.weights[0][0].shape[0], k

    def scales(self, layout: str) -> torch.Tensor:
        return self.x_scale_col if layout == "col" else self.x_scale

    def reference(self) -> torch.Tensor:
        """The fp32 ground truth for the cell (reference GEMM on the first weight copy)."""
        w, s = self.weights[0]
        return reference_gemm(self.x_fp8, self.x_scale, w, s, out_dtype=torch.float32)


def make_operands(weights: list[tuple[torch.Tensor, torch.Tensor]], m: int, seed: int = 1) -> Operands:
    """Random bf16 activations for ``weights`` (``random_activation``), quantized once in both scale layouts."""
    w0 = weights[0][0]
    k, device = w0.shape[1], w0.device
    x = random_activation(m, k, seed=seed, device=device)
    xq, xs = quantize_activation(x)
    col = empty_scales(m, xs.shape[1], "col", device)
    col.copy_(xs)
    return Operands(x, xq, xs, col, dequantize_activation(xq, xs, dtype=BF16), weights)


def float64_gemm(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, weight_scale_inv: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """The block-FP8 GEMM written out independently of ``reference_gemm`` (no shared dequantization code, float64
    arithmetic, scales expanded by index rather than by block reshapes): what the reference backend is checked
    against, so that no test compares the reference with itself."""
    k, n = x_fp8.shape[-1], w_fp8.shape[0]
    cols = torch.arange(k, device=x_fp8.device) // BLOCK
    rows = torch.arange(n, device=w_fp8.device) // BLOCK
    x = x_fp8.double() * x_scale.double()[..., cols]
    w = w_fp8.double() * weight_scale_inv.double()[rows][:, cols]
    y = x @ w.T
    return y if bias is None else y + bias.double()
