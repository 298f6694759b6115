"""blockfp8's Hopper block-FP8 GEMM written in Gluon (Triton's explicit-layout dialect): wgmma + TMA, sm_90 only.

y[M, N] = sum over 128-wide K groups g of (A[:, g] @ W[:, g].T) * a_scale[:, g] * w_scale[n // 128, g]

Why a second kernel: in the ``tl.dot`` kernel every K group's MMA must finish before its scales apply, and the
compiler waits for it right after issue, so the tensor cores idle during every promotion (docs/performance.md).
Here each group's wgmma is issued asynchronously into a fresh fp32 tile, and the previous group's tile is
scaled into the accumulator while it runs (``warpgroup_mma_wait(1)``): promotion overlaps the next MMA, as in
DeepGEMM, without warp specialization. TMA loads run ``STAGES`` groups ahead through an mbarrier ring.

Tails: TMA zero fill past M, N and K (a partial last K group uses its own scale); stores are masked. Needs
K % 16 == 0 (16-byte fp8 rows for TMA). Gluon has no CPU interpreter, so this backend runs on CUDA only and
its tests run on the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import cache, lru_cache

import torch
import triton

from .. import tables
from ..device import DeviceId, device_id
from ..format import is_decode
from .base import HOPPER_ONLY, YES, Backend, Limits, Support, unit_stride_rows
from .triton.launch import triton_release

try:  # Gluon ships with triton >= 3.5; an older triton leaves this backend unavailable.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Triton 3.6 names the TMA tile load async_copy_global_to_shared; later releases call it async_load (same
    # arguments) and make the old name raise.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # A CTA-wide barrier: thread_barrier in 3.6, barrier later.
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _IMPORT_ERROR = ""
except ImportError as e:  # pragma: no cover - depends on the installed triton
    _IMPORT_ERROR = f"triton.experimental.gluon unavailable: {e}"


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


if not _IMPORT_ERROR:

    @gluon.constexpr_function
    def _instr_n(block_n):
        # wgmma's N: the largest multiple of 8 up to 256 that divides the tile's N.
        n = 256
        while block_n % n:
            n -= 8
        return n

    @gluon.jit
    def _load_group(a_desc, w_desc, bar, a_buf, w_buf, off_m, off_n, k, pred):
        """TMA-load one K group of A and W into a slot; ``bar`` completes when both tiles have landed."""
        mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
        _tma_load(a_desc, [off_m, k], bar, a_buf, pred=pred)
        _tma_load(w_desc, [off_n, k], bar, w_buf, pred=pred)

    @gluon.jit
    def _promote(acc, part, sa, sw, SCALAR_WS: gl.constexpr):
        """acc += part * a_scale[row] * w_scale (one scalar per tile, or one per column)."""
        if SCALAR_WS:
            return acc + part * gl.expand_dims(sa * sw, 1)
        else:
            return acc + part * gl.expand_dims(sa, 1) * gl.expand_dims(sw, 0)

    @gluon.jit
    def _issue(g, c_regs, acc, a_bufs, w_bufs, ready, STAGES: gl.constexpr):
        """Wait for group g's tiles and issue its wgmma (fresh fp32 result in ``c_regs``'s registers)."""
        s = g % STAGES
        mbarrier.wait(ready.index(s), (g // STAGES) & 1)
        # A no-op wait that takes acc as an operand: the promotion before it must finish before this wgmma
        # may reuse a promoted tile's registers. In an earlier form of the loop the compiler otherwise sank
        # promotions below the issue, copied the tile and ptxas serialized every wgmma; with the current loop
        # ptxas reports no serialization without it either, but the GPU measurements were made with it.
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        issued = warpgroup_mma(a_bufs.index(s), w_bufs.index(s).permute((1, 0)), c_regs, use_acc=False,
                               is_async=True)
        return issued, acc

    @gluon.jit
    def _tile_coords(tile, grid_m, grid_n, GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """Grouped order: GROUP_M row-tiles share each weight column-tile while it is in L2."""
        width = GROUP_M * grid_n
        first_m = (tile // width) * GROUP_M
        group_rows = gl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % width) % group_rows
        pid_n = (tile % width) // group_rows
        return pid_m * BLOCK_M, pid_n * BLOCK_N

    @gluon.jit
    def _refill(g, a_desc, w_desc, a_bufs, w_bufs, ready, off_m, off_n, num_padded, STAGES: gl.constexpr):
        """Group g's wgmma has finished in every warpgroup: load group g + STAGES into its slot."""
        _cta_barrier()
        s = g % STAGES
        nxt = g + STAGES
        _load_group(a_desc, w_desc, ready.index(s), a_bufs.index(s), w_bufs.index(s), off_m, off_n,
                    nxt * a_desc.block_type.shape[1], nxt < num_padded)

    @gluon.jit
    def _scales(g, as_rows, ws_ptrs, stride_ask, stride_wsk, num_groups):
        """Activation (per row) and weight scales of group g; padding groups (all zeros) reuse the last."""
        g = gl.minimum(g, num_groups - 1)
        return gl.load(as_rows + g * stride_ask), gl.load(ws_ptrs + g * stride_wsk)

    @gluon.jit
    def _fp8_block_gemm_wgmma_kernel(
        a_desc, w_desc, c_ptr, as_ptr, ws_ptr, bias_ptr,
        M, N, K,
        stride_asm, stride_ask, stride_wsn, stride_wsk, stride_cm,
        HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        # One weight-scale block (128 rows of W) covers the whole tile: the weight scale is one scalar.
        SCALAR_WS: gl.constexpr = 128 % BLOCK_N == 0

        grid_m = gl.cdiv(M, BLOCK_M)
        grid_n = gl.cdiv(N, BLOCK_N)
        off_m, off_n = _tile_coords(gl.program_id(0), grid_m, grid_n, GROUP_M, BLOCK_M, BLOCK_N)

        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, _instr_n(BLOCK_N), 32])
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
        # Rows past M wrap onto valid ones (their results are never stored), so scale loads need no mask.
        as_rows = as_ptr + (offs_m % M) * stride_asm
        if SCALAR_WS:
            ws_ptrs = ws_ptr + (off_n // 128) * stride_wsn
        else:
            ws_ptrs = ws_ptr + ((offs_n % N) // 128) * stride_wsn

        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)

        num_groups = gl.cdiv(K, BLOCK_K)
        # The group count is padded to a multiple of UNROLL with groups past K: TMA fills them with zeros, so
        # they add nothing, and the loop needs no conditional tail.
        num_padded = gl.cdiv(num_groups, UNROLL) * UNROLL
        for i in gl.static_range(STAGES):
            _load_group(a_desc, w_desc, ready.index(i), a_bufs.index(i), w_bufs.index(i), off_m, off_n,
                        i * BLOCK_K, i < num_padded)

        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        # Each group's wgmma writes a fresh fp32 tile; the previous group's tile is scaled into acc while it
        # runs. ptxas serializes all wgmmas if one is still in flight across a loop back edge, so a trip runs
        # UNROLL groups in straight-line code and ends with the last one finished: that tile ("carried") is
        # promoted in the next trip, behind its first wgmma. Group -1 is a tile of zeros.
        carried = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        # Scales are loaded two groups before their promotion (sa/sw: the group promoted next, sa_n/sw_n: the
        # one after): an L2 round trip is longer than one group's wgmma (measured stalls without it).
        sa, sw = _scales(0, as_rows, ws_ptrs, stride_ask, stride_wsk, num_groups)  # for the zero tile
        sa_n, sw_n = _scales(0, as_rows, ws_ptrs, stride_ask, stride_wsk, num_groups)
        for trip in range(0, num_padded, UNROLL):
            t, acc = _issue(trip, gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout), acc, a_bufs, w_bufs,
                            ready, STAGES)
            sa_f, sw_f = _scales(trip + 1, as_rows, ws_ptrs, stride_ask, stride_wsk, num_groups)
            acc = _promote(acc, carried, sa, sw, SCALAR_WS)
            sa, sw, sa_n, sw_n = sa_n, sw_n, sa_f, sw_f
            spare = carried
            for j in gl.static_range(1, UNROLL):
                t_next, acc = _issue(trip + j, spare, acc, a_bufs, w_bufs, ready, STAGES)
                sa_f, sw_f = _scales(trip + j + 1, as_rows, ws_ptrs, stride_ask, stride_wsk, num_groups)
                done = warpgroup_mma_wait(num_outstanding=1, deps=(t,))
                _refill(trip + j - 1, a_desc, w_desc, a_bufs, w_bufs, ready, off_m, off_n, num_padded, STAGES)
                acc = _promote(acc, done, sa, sw, SCALAR_WS)
                sa, sw, sa_n, sw_n = sa_n, sw_n, sa_f, sw_f
                spare = done
                t = t_next
            carried = warpgroup_mma_wait(num_outstanding=0, deps=(t,))
            _refill(trip + UNROLL - 1, a_desc, w_desc, a_bufs, w_bufs, ready, off_m, off_n, num_padded, STAGES)
        acc = _promote(acc, carried, sa, sw, SCALAR_WS)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))

        if HAS_BIAS:
            bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
            acc += gl.expand_dims(bias, 0)
        c_offs = gl.expand_dims(offs_m, 1) * stride_cm + gl.expand_dims(offs_n, 0)
        c_mask = gl.expand_dims(offs_m < M, 1) & gl.expand_dims(offs_n < N, 0)
        gl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@cache
def _tile_layout(rows: int):
    """Shared-memory layout of a (rows, 128) fp8 tile: computing it costs ~7 us of host time, so once per size."""
    return gl.NVMMASharedLayout.get_default_for([rows, 128], gl.float8e4nv)


def gluon_gemm(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
               config: GluonConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the wgmma kernel on 2-D operands (inputs already validated by the caller; K % 16 == 0), writing
    into ``out`` (contiguous (M, N) of ``out_dtype``) when given."""
    x_fp8, w_fp8, m, n, k = unit_stride_rows(x_fp8, w_fp8)
    cfg = config or launch_config(m, n, k, x_fp8.device)
    a_desc = TensorDescriptor.from_tensor(x_fp8, [cfg.block_m, 128], _tile_layout(cfg.block_m))
    w_desc = TensorDescriptor.from_tensor(w_fp8, [cfg.block_n, 128], _tile_layout(cfg.block_n))
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=x_fp8.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _fp8_block_gemm_wgmma_kernel[grid](
        a_desc, w_desc, out, x_scale, weight_scale_inv, bias if bias is not None else out,
        m, n, k,
        x_scale.stride(0), x_scale.stride(1), weight_scale_inv.stride(0), weight_scale_inv.stride(1),
        out.stride(0),
        HAS_BIAS=bias is not None, GROUP_M=cfg.group_m, STAGES=cfg.stages, UNROLL=cfg.unroll,
        num_warps=cfg.num_warps,
    )
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
