"""The persistent, warp-specialized Gluon kernel: one program per SM walks its share of the output tiles while a
loader warp keeps the shared-memory ring full.

Why (docs/performance.md, the Nsight profile of the one-tile kernel in ``kernels.py``): there the math warps
refill each slot themselves, so every K group ends in CTA-wide barriers, and the tensor pipe is busy 45-59% of
the time against DeepGEMM's 76-90%; each tile also starts with an empty pipeline. Here, as in DeepGEMM's SM90
kernels:
- a loader partition (one warp, 40 registers) issues the TMA loads of every group of every tile of the program,
  each once its slot's ``empty`` barrier says all math warp groups are done with it; the next tile's first groups
  load during this tile's last wgmmas and its epilogue;
- each math warp group (64 rows of the tile) is a partition of its own running the one-tile kernel's K loop
  (``kernels._tile_k_loop``: async wgmma per group, the previous group's promotion overlapped with it) and
  releases a slot with one mbarrier arrive, which synchronizes only its own four warps, never the other group;
- all partitions walk the same tiles in the same grouped order, and the ring's slots and phases count on across
  tiles (the program's g-th group overall uses slot g % STAGES).

Each warp group issues the same wgmma instructions and promotions, in the same group order, as the matching warp
group of the one-tile kernel, so both kernels give the same bits (a GPU test holds them to it). Launched with a
``maxnreg`` that fits all warps in the register file; the loader gives its registers back to the math warps.
"""

from __future__ import annotations

from .kernels import _IMPORT_ERROR

if not _IMPORT_ERROR:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    from .kernels import _mma_layout, _store_tile, _tile_coords, _tile_k_loop, _tile_scale_ptrs, _tma_load

    # Register budgets (setmaxnreg) of the worker partitions; the default one (math warp group 0) gets the rest of
    # the launch's maxnreg x threads. The loader holds tile coordinates and counters only.
    LOADER_REGS = gl.constexpr(40)
    MATH_REGS = gl.constexpr(232)

    @gluon.jit
    def _loader(loader_args, GROUP_M: gl.constexpr, UNROLL: gl.constexpr, MATH_WGS: gl.constexpr):
        """Load every K group of this program's tiles into the ring, each once its slot has been released: the
        weight tile and one 64-row activation tile per math warp group, all completing ``ready``."""
        a_desc, w_desc, a_bufs0, a_bufs1, w_bufs, ready, empty, M, N, K = loader_args
        BLOCK_H: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = w_bufs.type.shape[0]
        grid_m = gl.cdiv(M, BLOCK_H * MATH_WGS)
        grid_n = gl.cdiv(N, BLOCK_N)
        num_padded = gl.cdiv(gl.cdiv(K, BLOCK_K), UNROLL) * UNROLL  # as the math warps count (zero-filled pad)
        g = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            off_m, off_n = _tile_coords(tile, grid_m, grid_n, GROUP_M, BLOCK_H * MATH_WGS, BLOCK_N)
            for kg in range(num_padded):
                s = g % STAGES
                # The slot's previous group must have been released by every math warp group. On the first lap
                # there is none: a fresh barrier's phase before phase 0 counts as complete, so waiting on parity
                # 1 returns at once.
                mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, MATH_WGS * a_desc.block_type.nbytes + w_desc.block_type.nbytes)
                _tma_load(a_desc, [off_m, kg * BLOCK_K], bar, a_bufs0.index(s))
                if MATH_WGS == 2:
                    _tma_load(a_desc, [off_m + BLOCK_H, kg * BLOCK_K], bar, a_bufs1.index(s))
                _tma_load(w_desc, [off_n, kg * BLOCK_K], bar, w_bufs.index(s))
                g += 1

    @gluon.jit
    def _math(shared, a_bufs, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, UNROLL: gl.constexpr,
              MATH_WGS: gl.constexpr, HALF: gl.constexpr):
        """One math warp group: rows [64 * HALF, 64 * HALF + 64) of each of this program's tiles, accumulated
        and stored, each slot released (one arrive of this warp group) as its wgmma finishes. ``shared``: what
        every math warp group reads alike; ``a_bufs``: this group's own activation ring."""
        (a_desc, w_desc, w_bufs, ready, empty, c_ptr, as_ptr, ws_ptr, bias_ptr, M, N, K,
         stride_asm, stride_ask, stride_wsn, stride_wsk, stride_cm) = shared
        BLOCK_H: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = w_bufs.type.shape[0]
        SCALAR_WS: gl.constexpr = 128 % BLOCK_N == 0
        mma_layout: gl.constexpr = _mma_layout(4, BLOCK_N)
        grid_m = gl.cdiv(M, BLOCK_H * MATH_WGS)
        grid_n = gl.cdiv(N, BLOCK_N)
        num_groups = gl.cdiv(K, BLOCK_K)
        num_padded = gl.cdiv(num_groups, UNROLL) * UNROLL
        base = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            off_m, off_n = _tile_coords(tile, grid_m, grid_n, GROUP_M, BLOCK_H * MATH_WGS, BLOCK_N)
            off_h = off_m + HALF * BLOCK_H
            as_rows, ws_ptrs = _tile_scale_ptrs(off_h, off_n, as_ptr, ws_ptr, M, N, stride_asm, stride_wsn,
                                                mma_layout, BLOCK_H, BLOCK_N, SCALAR_WS)
            acc = _tile_k_loop(base, a_desc, w_desc, a_bufs, w_bufs, ready, empty, off_h, off_n, as_rows, ws_ptrs,
                               stride_ask, stride_wsk, num_groups, num_padded, mma_layout, SCALAR_WS, STAGES,
                               UNROLL, True)
            _store_tile(acc, c_ptr, bias_ptr, off_h, off_n, M, N, stride_cm, mma_layout, HAS_BIAS)
            base += num_padded

    @gluon.jit
    def _fp8_block_gemm_persistent_kernel(
        a_desc, w_desc, c_ptr, as_ptr, ws_ptr, bias_ptr,
        M, N, K,
        stride_asm, stride_ask, stride_wsn, stride_wsk, stride_cm,
        HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr,
        MATH_WGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """``a_desc``'s tiles are 64 rows: an output tile is MATH_WGS of them (one per math warp group, each its
        own partition, so a slot's release never waits for the other group) by ``w_desc``'s tile of columns."""
        BLOCK_H: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        a_bufs0 = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_H, BLOCK_K], a_desc.layout)
        if MATH_WGS == 2:
            a_bufs1 = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_H, BLOCK_K], a_desc.layout)
        else:
            a_bufs1 = a_bufs0
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)  # the loader's expect-tx: every tile of the group landed
            mbarrier.init(empty.index(i), count=MATH_WGS)  # one arrive per math warp group
        # Tuples carry runtime values only: a constexpr inside one reaches the partition as a plain value.
        shared = (a_desc, w_desc, w_bufs, ready, empty, c_ptr, as_ptr, ws_ptr, bias_ptr, M, N, K,
                  stride_asm, stride_ask, stride_wsn, stride_wsk, stride_cm)
        loader_args = (a_desc, w_desc, a_bufs0, a_bufs1, w_bufs, ready, empty, M, N, K)
        if MATH_WGS == 2:
            gl.warp_specialize([(_math, (shared, a_bufs0, HAS_BIAS, GROUP_M, UNROLL, MATH_WGS, 0)),
                                (_math, (shared, a_bufs1, HAS_BIAS, GROUP_M, UNROLL, MATH_WGS, 1)),
                                (_loader, (loader_args, GROUP_M, UNROLL, MATH_WGS))], [4, 1], [MATH_REGS, LOADER_REGS])
        else:
            gl.warp_specialize([(_math, (shared, a_bufs0, HAS_BIAS, GROUP_M, UNROLL, MATH_WGS, 0)),
                                (_loader, (loader_args, GROUP_M, UNROLL, MATH_WGS))], [1], [LOADER_REGS])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))
