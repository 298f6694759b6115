"""blockfp8's Hopper block-FP8 GEMMs written in Gluon (Triton's explicit-layout dialect): wgmma + TMA, sm_90
only. The kernels live in ``kernels.py`` (one tile per program) and ``persistent.py`` (warp-specialized,
persistent); this module picks their launch configs and is the ``gluon`` backend."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import triton

from ... import tables
from ...device import DeviceId, device_id, on_device_of
from ...format import is_decode
from ..base import HOPPER_ONLY, YES, Backend, Limits, Support, unit_stride_rows
from ..triton.launch import triton_release
from .kernels import _IMPORT_ERROR

if not _IMPORT_ERROR:
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .kernels import _fp8_block_gemm_wgmma_kernel, _promote, _tile_layout  # noqa: F401 (_promote: its test)
    from .persistent import _fp8_block_gemm_persistent_kernel

# Gluon is experimental and its API moves between Triton releases (3.9 renamed the TMA load and the barrier).
# The kernel runs only on the Triton versions its GPU tests and `blockfp8 check` passed on, unless the user opts
# in to try another one (then run `blockfp8 check --backends gluon` on that GPU first).
VERIFIED_TRITON = ((3, 6),)
ENV_UNVERIFIED = "BLOCKFP8_GLUON_ANY_TRITON"


@dataclass(frozen=True)
class GluonConfig:
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8  # one warpgroup per 64 rows of the tile
    stages: int = 4
    group_m: int = 8
    unroll: int = 2  # K groups per loop trip (see the kernel); 2 measured fastest (gluon_probe results)
    # The persistent, warp-specialized kernel (persistent.py): one program per SM, a loader warp, one math warp
    # group per 64 rows of the tile (num_warps is then implied by block_m). Not yet timed on a GPU, so neither
    # pick_config nor likely_configs offers it; a caller or a tuned row names it.
    persistent: bool = False

    def __post_init__(self) -> None:
        # Both kernels issue a group's wgmma before releasing the previous group's slot: with one slot the loop
        # would wait for a load that waits for it, and the GPU would hang rather than fail.
        if self.stages < 2:
            raise ValueError(f"GluonConfig.stages must be >= 2 (the K loop holds two groups' slots), got {self.stages}")


def pick_config(m: int, n: int, k: int) -> GluonConfig:
    """Tile by M: a 64-row tile (one warpgroup) while M is small, else 128 x 128 (two warpgroups)."""
    if is_decode(m):
        return GluonConfig(block_m=64, num_warps=4)
    return GluonConfig()


def likely_configs(m: int, n: int, k: int) -> list[GluonConfig]:
    """``pick_config`` and the variants ``blockfp8 tune`` times next: decode with narrower tiles (more CTAs on
    few-tile shapes) and a deeper pipeline; prefill with one warpgroup per tile, a shallower and a deeper
    pipeline. Wider tiles are left out: three fp32 128 x 256 tiles in flight do not fit the registers."""
    base = pick_config(m, n, k)
    if is_decode(m):
        variants = [replace(base, block_n=64, stages=6), replace(base, stages=6)]
    else:
        variants = [replace(base, block_m=64, num_warps=4), replace(base, stages=3), replace(base, stages=5)]
    return list(dict.fromkeys([base, *variants]))


@lru_cache(maxsize=4096)
def _launch_config(generation: int, device: DeviceId, m: int, n: int, k: int) -> GluonConfig:
    # ``generation`` changes whenever a table may have changed (tuning wrote the cache): a new key, a new lookup.
    found = tables.tuned_config("gluon", device, n, k, m)
    return GluonConfig(**found) if found else pick_config(m, n, k)


def launch_config(m: int, n: int, k: int, device: torch.device) -> GluonConfig:
    """The config tuned for this device and shape (``blockfp8 tune``), else ``pick_config``."""
    return _launch_config(tables.generation(), device_id(device), m, n, k)


# Registers per thread at launch for the persistent kernel with 1 or 2 math warp groups: its warps (the math
# groups plus the loader's, which takes a whole warp group) x 32 x this must fit the SM's 64K registers; the
# partitions then move them to the math warps (setmaxnreg). The compile test checks both build without spills.
_PERSISTENT_MAXNREG = {1: 240, 2: 168}


def gluon_gemm(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
               config: GluonConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch a wgmma kernel (``config.persistent``: the persistent one) on 2-D operands (inputs already
    validated by the caller; K % 16 == 0), writing into ``out`` (contiguous (M, N) of ``out_dtype``) when given."""
    x_fp8, w_fp8, m, n, k = unit_stride_rows(x_fp8, w_fp8)
    cfg = config or launch_config(m, n, k, x_fp8.device)
    w_desc = TensorDescriptor.from_tensor(w_fp8, [cfg.block_n, 128], _tile_layout(cfg.block_n))
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=x_fp8.device)
    args = (out, x_scale, weight_scale_inv, bias if bias is not None else out, m, n, k,
            x_scale.stride(0), x_scale.stride(1), weight_scale_inv.stride(0), weight_scale_inv.stride(1), out.stride(0))
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if cfg.persistent:
        groups = cfg.block_m // 64  # math warp groups, each its own 64-row activation tile
        a_desc = TensorDescriptor.from_tensor(x_fp8, [64, 128], _tile_layout(64))
        with on_device_of(x_fp8):  # Triton launches on the current device
            _fp8_block_gemm_persistent_kernel[(min(tiles, device_id(x_fp8.device).sms or tiles),)](
                a_desc, w_desc, *args, HAS_BIAS=bias is not None, GROUP_M=cfg.group_m, STAGES=cfg.stages,
                UNROLL=cfg.unroll, MATH_WGS=groups, num_warps=4, maxnreg=_PERSISTENT_MAXNREG[groups])
        return out
    a_desc = TensorDescriptor.from_tensor(x_fp8, [cfg.block_m, 128], _tile_layout(cfg.block_m))
    with on_device_of(x_fp8):
        _fp8_block_gemm_wgmma_kernel[(tiles,)](
            a_desc, w_desc, *args, HAS_BIAS=bias is not None, GROUP_M=cfg.group_m, STAGES=cfg.stages,
            UNROLL=cfg.unroll, num_warps=cfg.num_warps)
    return out


class GluonBackend(Backend):
    def probe(self) -> Support:
        if _IMPORT_ERROR:
            return Support(False, _IMPORT_ERROR)
        if not torch.cuda.is_available():
            return Support(False, "no CUDA device (Gluon kernels have no CPU interpreter)")
        if triton_release() not in VERIFIED_TRITON and os.environ.get(ENV_UNVERIFIED) != "1":
            verified = ", ".join(f"{a}.{b}" for a, b in VERIFIED_TRITON)
            return Support(False, f"verified with triton {verified} only, found {triton.__version__} "
                                  f"(set {ENV_UNVERIFIED}=1 to try it, then run blockfp8 check --backends gluon)")
        return YES

    def run(self, x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, out=None) -> torch.Tensor:
        if x_fp8.data_ptr() % 16 or w_fp8.data_ptr() % 16:
            # TMA needs 16-byte aligned bases; an offset view is copied once rather than refused.
            x_fp8, w_fp8 = x_fp8.clone(), w_fp8.clone()
        return gluon_gemm(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out_dtype, out=out)


BACKEND = GluonBackend(
    name="gluon",
    limits=Limits(
        **HOPPER_ONLY,  # Blackwell has tcgen05 instead of wgmma
        k_multiple=16,  # TMA: fp8 rows must be 16-byte multiples
        evidence="H100: tests/backends/test_gluon.py edge sweep; blockfp8 check --probe --backends gluon: 217 "
                 "correct, 0 wrong, K % 16 != 0 fails TMA's stride rule (benchmarks/results/check_gluon_h100.txt)",
    ),
    scale_layout="col",
)
