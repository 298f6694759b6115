"""The wgmma kernel of the ``gluon`` backend (one output tile per program) and the Gluon pieces its persistent
sibling (``persistent.py``) shares: the K loop with its promotion, the grouped tile order, the scale pointers and
the epilogue.

y[M, N] = sum over 128-wide K groups g of (A[:, g] @ W[:, g].T) * a_scale[:, g] * w_scale[n // 128, g]

Why a second kernel beside the ``tl.dot`` one: there every K group's MMA must finish before its scales apply, and
the compiler waits for it right after issue, so the tensor cores idle during every promotion
(docs/performance.md). Here each group's wgmma is issued asynchronously into a fresh fp32 tile, and the previous
group's tile is scaled into the accumulator while it runs (``warpgroup_mma_wait(1)``): promotion overlaps the
next MMA, as in DeepGEMM. TMA loads run ``STAGES`` groups ahead through an mbarrier ring.

Tails: TMA zero fill past M, N and K (a partial last K group uses its own scale); stores are masked. Needs
K % 16 == 0 (16-byte fp8 rows for TMA). Gluon has no CPU interpreter, so these kernels run on CUDA only and
their numeric tests run on the GPU.
"""

from __future__ import annotations

from functools import cache

try:  # Gluon ships with triton >= 3.5; an older triton leaves this backend unavailable.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

    # Triton 3.6 names the TMA tile load async_copy_global_to_shared; later releases call it async_load (same
    # arguments) and make the old name raise.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # A CTA-wide barrier: thread_barrier in 3.6, barrier later.
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _IMPORT_ERROR = ""
except ImportError as e:  # pragma: no cover - depends on the installed triton
    _IMPORT_ERROR = f"triton.experimental.gluon unavailable: {e}"


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
    def _release(g, a_desc, w_desc, a_bufs, w_bufs, ready, empty, off_m, off_n, num_padded,
                 STAGES: gl.constexpr, WS: gl.constexpr):
        """Group g's wgmma has finished: hand its slot to the loader partition (``WS``, through ``empty``), or
        load group g + STAGES into it here (one warp group or two in lockstep, ``_refill``)."""
        if WS:
            mbarrier.arrive(empty.index(g % STAGES), count=1)
        else:
            _refill(g, a_desc, w_desc, a_bufs, w_bufs, ready, off_m, off_n, num_padded, STAGES)

    @gluon.jit
    def _tile_offsets(off_m, off_n, mma_layout: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """The rows and columns of the tile at (off_m, off_n), in the accumulator's layout."""
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
        return offs_m, offs_n

    @gluon.jit
    def _tile_scale_ptrs(off_m, off_n, as_ptr, ws_ptr, M, N, stride_asm, stride_wsn, mma_layout: gl.constexpr,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SCALAR_WS: gl.constexpr):
        """(activation-scale row pointers, weight-scale pointers) of the tile at (off_m, off_n)."""
        offs_m, offs_n = _tile_offsets(off_m, off_n, mma_layout, BLOCK_M, BLOCK_N)
        # Rows past M wrap onto valid ones (their results are never stored), so scale loads need no mask.
        as_rows = as_ptr + (offs_m % M) * stride_asm
        if SCALAR_WS:
            ws_ptrs = ws_ptr + (off_n // 128) * stride_wsn
        else:
            ws_ptrs = ws_ptr + ((offs_n % N) // 128) * stride_wsn
        return as_rows, ws_ptrs

    @gluon.jit
    def _tile_k_loop(base, a_desc, w_desc, a_bufs, w_bufs, ready, empty, off_m, off_n, as_rows, ws_ptrs,
                     stride_ask, stride_wsk, num_groups, num_padded, mma_layout: gl.constexpr,
                     SCALAR_WS: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr, WS: gl.constexpr):
        """The fp32 accumulator of one output tile over its ``num_padded`` K groups, whose slots in the ring are
        those of groups base .. base + num_padded - 1 (a persistent program's groups count on across tiles).

        Each group's wgmma writes a fresh fp32 tile; the previous group's tile is scaled into acc while it runs.
        ptxas serializes all wgmmas if one is still in flight across a loop back edge, so a trip runs UNROLL
        groups in straight-line code and ends with the last one finished: that tile ("carried") is promoted in
        the next trip, behind its first wgmma. Group -1 is a tile of zeros."""
        BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
        BLOCK_N: gl.constexpr = w_bufs.type.shape[1]
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        carried = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        # Scales are loaded two groups before their promotion (sa/sw: the group promoted next, sa_n/sw_n: the
        # one after): an L2 round trip is longer than one group's wgmma (measured stalls without it).
        sa, sw = _scales(0, as_rows, ws_ptrs, stride_ask, stride_wsk, num_groups)  # for the zero tile
        sa_n, sw_n = _scales(0, as_rows, ws_ptrs, stride_ask, stride_wsk, num_groups)
        for trip in range(0, num_padded, UNROLL):
            t, acc = _issue(base + trip, gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout), acc, a_bufs,
                            w_bufs, ready, STAGES)
            sa_f, sw_f = _scales(trip + 1, as_rows, ws_ptrs, stride_ask, stride_wsk, num_groups)
            acc = _promote(acc, carried, sa, sw, SCALAR_WS)
            sa, sw, sa_n, sw_n = sa_n, sw_n, sa_f, sw_f
            spare = carried
            for j in gl.static_range(1, UNROLL):
                t_next, acc = _issue(base + trip + j, spare, acc, a_bufs, w_bufs, ready, STAGES)
                sa_f, sw_f = _scales(trip + j + 1, as_rows, ws_ptrs, stride_ask, stride_wsk, num_groups)
                done = warpgroup_mma_wait(num_outstanding=1, deps=(t,))
                _release(base + trip + j - 1, a_desc, w_desc, a_bufs, w_bufs, ready, empty, off_m, off_n,
                         num_padded, STAGES, WS)
                acc = _promote(acc, done, sa, sw, SCALAR_WS)
                sa, sw, sa_n, sw_n = sa_n, sw_n, sa_f, sw_f
                spare = done
                t = t_next
            carried = warpgroup_mma_wait(num_outstanding=0, deps=(t,))
            _release(base + trip + UNROLL - 1, a_desc, w_desc, a_bufs, w_bufs, ready, empty, off_m, off_n,
                     num_padded, STAGES, WS)
        return _promote(acc, carried, sa, sw, SCALAR_WS)

    @gluon.jit
    def _store_tile(acc, c_ptr, bias_ptr, off_m, off_n, M, N, stride_cm, mma_layout: gl.constexpr,
                    HAS_BIAS: gl.constexpr):
        """Add the bias (fp32, before the one rounding) and store the tile's rows < M and columns < N. The
        offsets are computed here, after the K loop, rather than kept in registers across it."""
        offs_m, offs_n = _tile_offsets(off_m, off_n, mma_layout, acc.shape[0], acc.shape[1])
        if HAS_BIAS:
            bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
            acc += gl.expand_dims(bias, 0)
        c_offs = gl.expand_dims(offs_m, 1) * stride_cm + gl.expand_dims(offs_n, 0)
        c_mask = gl.expand_dims(offs_m < M, 1) & gl.expand_dims(offs_n < N, 0)
        gl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    @gluon.constexpr_function
    def _mma_layout(num_warps, block_n):
        """wgmma's register layout: one warp group per 64 rows of the tile."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                         instr_shape=[16, _instr_n(block_n), 32])

    @gluon.jit
    def _fp8_block_gemm_wgmma_kernel(
        a_desc, w_desc, c_ptr, as_ptr, ws_ptr, bias_ptr,
        M, N, K,
        stride_asm, stride_ask, stride_wsn, stride_wsk, stride_cm,
        HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """One output tile per program; its warps load each refilled slot themselves."""
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        # One weight-scale block (128 rows of W) covers the whole tile: the weight scale is one scalar.
        SCALAR_WS: gl.constexpr = 128 % BLOCK_N == 0
        mma_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)

        grid_m = gl.cdiv(M, BLOCK_M)
        grid_n = gl.cdiv(N, BLOCK_N)
        off_m, off_n = _tile_coords(gl.program_id(0), grid_m, grid_n, GROUP_M, BLOCK_M, BLOCK_N)
        as_rows, ws_ptrs = _tile_scale_ptrs(off_m, off_n, as_ptr, ws_ptr, M, N, stride_asm, stride_wsn, mma_layout,
                                            BLOCK_M, BLOCK_N, SCALAR_WS)

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

        acc = _tile_k_loop(0, a_desc, w_desc, a_bufs, w_bufs, ready, ready, off_m, off_n, as_rows, ws_ptrs,
                           stride_ask, stride_wsk, num_groups, num_padded, mma_layout, SCALAR_WS, STAGES, UNROLL,
                           False)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
        _store_tile(acc, c_ptr, bias_ptr, off_m, off_n, M, N, stride_cm, mma_layout, HAS_BIAS)


@cache
def _tile_layout(rows: int):
    """Shared-memory layout of a (rows, 128) fp8 tile: computing it costs ~7 us of host time, so once per size."""
    return gl.NVMMASharedLayout.get_default_for([rows, 128], gl.float8e4nv)
