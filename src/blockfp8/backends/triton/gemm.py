"""blockfp8's own Triton block-FP8 GEMM: correct for every M, N, K.

y[M, N] = sum over 128-wide K groups g of (A[:, g] @ W[:, g].T) * a_scale[:, g] * w_scale[n // 128, g]

Each K group is one fresh ``tl.dot`` whose fp32 result is scaled and added to an fp32 accumulator -- the
DeepSeek/DeepGEMM numerics, which keep the tensor cores' limited-precision FP8 accumulation to 128 terms
and so stay within tolerance even at K = 18432. Tails in M, N and K are masked (a partial last K group
uses that group's scale; N tails read the partial block's scale).

Two launch shapes, picked per (M, N, K) from a tuned table or a heuristic (``configs.py``):
* decode (small M): ``SWAP_AB`` puts the weight rows in the MMA's wide M slot and the few tokens in its
  narrow N slot, and ``SPLIT_K`` splits the K groups over extra programs so all SMs stream weights.
  The split-K reduction is done in the same launch: each program stores its fp32 partial tile, and the last
  one to arrive at a per-tile counter sums the partials in a fixed order (deterministic output) and writes the
  output. Counters and partials live in a workspace allocated per launch (``TritonGemmPlan.workspace``), so no
  two launches -- on other streams, in other threads or CUDA graphs -- ever share one. The counters must start
  at zero: ``linear`` has its activation quantizer zero them in the launch it makes anyway (no extra kernel,
  in eager calls or inside a CUDA graph); a plain ``gemm`` call zeroes them with one small fill.
* prefill (large M): 64x128 or 128x128 tiles in grouped launch order.
Tiles are read through TMA tensor descriptors where the operands allow it (sm_90+, 16-byte aligned rows;
``TritonConfig.tma``): the copy engine's zero fill past M, N and K replaces the masks, and its deep pipeline
measured up to 1.5x faster than per-thread loads (docs/performance.md). Elsewhere, pointer loads with masks.

On sm_90+ with PDL on (``launch.PDL``: by default on the Triton releases it was verified on), every launch is a
programmatic dependent launch: its programs start while the kernel before them -- the activation's producer, or the
previous GEMM -- is still running, and wait for that kernel to finish before they read anything: the decode GEMM's
launch and ramp-up overlap the producer instead of following it. Before the wait they may also bring their first
weight tiles into L2 (``PREFETCH_BYTES``; the weight never comes from that kernel in a model, and a prefetch
consumes no value in any case); measured on an H200 that prefetch cost more than it saved, so its budget is 0
(docs/performance.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ...device import cuda_identity
from ...format import cdiv
from ..base import GemmPlan
from .configs import TritonConfig, get_config
from .launch import INTERPRET, FastLaunch, pdl_ok


@triton.jit
def _round_bf16(x):
    """fp32 values rounded to the nearest bf16 (ties to even), still as fp32: the interpreter's fp32 -> bf16
    cast truncates, so rounding first makes CPU tests see the GPU's output rounding."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)


@triton.jit
def _store_tile(c_ptr, c_offs, c_mask, acc, bias_ptr, rn, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr,
                ROUND_BF16: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn).to(tl.float32)
        if SWAP_AB:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    if ROUND_BF16:
        acc = _round_bf16(acc)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _prefetch_l2(ptrs, nbytes):
    """Bring ``nbytes`` (a multiple of 16) from each 16-byte aligned address in ``ptrs`` into L2, asynchronously
    (sm_90's bulk prefetch; nothing is waited for or read)."""
    tl.inline_asm_elementwise("{ cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }", "=r,l,r",
                              [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _fp8_block_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, bias_ptr, work_ptr, a_desc, w_desc,
    M, N, K,
    stride_am, stride_asm, stride_ask, stride_wn, stride_wsn, stride_wsk, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    W_BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr,
    EVEN_K: tl.constexpr, ROUND_BF16: tl.constexpr, USE_TMA: tl.constexpr,
    PAIR_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns wrap onto valid ones instead of being masked: the loads stay unmasked
    # (vectorized) and the stores below drop them.
    rm = offs_m % M
    rn = offs_n % N

    num_groups = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_groups, SPLIT_K)
    g_start = pid_k * per_split
    g_end = min(g_start + per_split, num_groups)

    k0 = g_start * BLOCK_K
    if PDL:
        # Launched with programmatic dependent launch: the kernel before this one (the producer of x, its scales
        # and the split-K counters) may still be running. Only the weight is read before the wait, and only as an
        # L2 prefetch of this program's first PREFETCH groups, which consumes no value: a weight that kernel
        # wrote is still read correctly after the wait. A GEMM launched next the same way may start once every
        # program here has (it waits for this launch to end before it reads anything but its weight).
        tl.extra.cuda.gdc_launch_dependents()
        if PREFETCH > 0:
            nbytes = min(min(PREFETCH, g_end - g_start) * BLOCK_K, K - k0)
            if nbytes > 0:
                _prefetch_l2(w_ptr + rn.to(tl.int64) * stride_wn + k0, tl.zeros_like(rn) + nbytes)
        tl.extra.cuda.gdc_wait()
    if SWAP_AB:
        # acc is (BLOCK_N, BLOCK_M): weights (BLOCK_N, BLOCK_K) times activations (BLOCK_K, BLOCK_M).
        w_ptrs = w_ptr + rn[:, None] * stride_wn + (k0 + offs_k)[None, :]
        a_ptrs = a_ptr + rm[None, :] * stride_am + (k0 + offs_k)[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        a_ptrs = a_ptr + rm[:, None] * stride_am + (k0 + offs_k)[None, :]
        w_ptrs = w_ptr + rn[None, :] * stride_wn + (k0 + offs_k)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    as_ptrs = as_ptr + rm * stride_asm + g_start * stride_ask
    ws_ptrs = ws_ptr + (rn // W_BLOCK_N) * stride_wsn + g_start * stride_wsk
    w_block = (pid_n * BLOCK_N) // W_BLOCK_N

    if PAIR_K:
        # Two K groups per step (TMA + swap-AB decode only): both dots are issued before either is scaled,
        # halving the serial wait-then-scale steps of a latency-bound loop. A lone last group's twin lies in
        # the next split or past K (zero fill); its contribution is dropped.
        for g in range(g_start, g_end, 2):
            has2 = g + 1 < g_end
            w0 = w_desc.load([pid_n * BLOCK_N, g * BLOCK_K])
            a0 = tl.trans(a_desc.load([pid_m * BLOCK_M, g * BLOCK_K]))
            w1 = w_desc.load([pid_n * BLOCK_N, (g + 1) * BLOCK_K])
            a1 = tl.trans(a_desc.load([pid_m * BLOCK_M, (g + 1) * BLOCK_K]))
            s0 = tl.load(as_ptr + rm * stride_asm + g * stride_ask) * tl.load(
                ws_ptr + w_block * stride_wsn + g * stride_wsk)
            g1 = tl.minimum(g + 1, g_end - 1)  # a valid scale index; a lone group's twin is dropped below
            s1 = tl.load(as_ptr + rm * stride_asm + g1 * stride_ask) * tl.load(
                ws_ptr + w_block * stride_wsn + g1 * stride_wsk)
            d0 = tl.dot(w0, a0)
            d1 = tl.dot(w1, a1)
            acc += d0 * s0[None, :] + tl.where(has2, d1 * s1[None, :], 0.0)
    else:
        for g in range(g_start, g_end):
            if USE_TMA:
                # Tiles through the bulk tensor copy engine: zero fill past M, N and K replaces the masks, and
                # the pipelined copies keep more weight bytes in flight per SM than per-thread loads
                # (measured faster at decode, docs/performance.md).
                if SWAP_AB:
                    w = w_desc.load([pid_n * BLOCK_N, g * BLOCK_K])
                    a = tl.trans(a_desc.load([pid_m * BLOCK_M, g * BLOCK_K]))
                else:
                    a = a_desc.load([pid_m * BLOCK_M, g * BLOCK_K])
                    w = tl.trans(w_desc.load([pid_n * BLOCK_N, g * BLOCK_K]))
            elif EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = g * BLOCK_K + offs_k < K
                if SWAP_AB:
                    a = tl.load(a_ptrs, mask=k_ok[:, None], other=0.0)
                    w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                    w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            sa = tl.load(as_ptrs)
            if W_BLOCK_N % BLOCK_N == 0:
                # One weight block per tile: one scalar scale (out-of-range rows are never stored).
                sw = tl.load(ws_ptr + w_block * stride_wsn + g * stride_wsk) + tl.zeros((BLOCK_N,), tl.float32)
            else:
                sw = tl.load(ws_ptrs)
            if SWAP_AB:
                acc += tl.dot(w, a) * sw[:, None] * sa[None, :]
            else:
                acc += tl.dot(a, w) * sa[:, None] * sw[None, :]
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            as_ptrs += stride_ask
            ws_ptrs += stride_wsk

    if SWAP_AB:
        c_offs = offs_m[None, :] * stride_cm + offs_n[:, None]
        p_offs = offs_m[None, :] * N + offs_n[:, None]
        c_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    else:
        c_offs = offs_m[:, None] * stride_cm + offs_n[None, :]
        p_offs = offs_m[:, None] * N + offs_n[None, :]
        c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)

    if SPLIT_K > 1:
        # The workspace: one int32 counter per tile (zeroed before the launch), padded to 32 entries (128 bytes),
        # then the fp32 partial tiles of every split.
        part_ptr = (work_ptr + tl.cdiv(tl.num_programs(0), 32) * 32).to(tl.pointer_type(tl.float32), bitcast=True)
        tl.store(part_ptr + pid_k * M * N + p_offs, acc, mask=c_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(work_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # Sum every partial (this program's too) in split order, so the result does not depend on which
            # program arrived last: outputs are bit-reproducible run to run and graph replay to replay.
            acc = tl.zeros_like(acc)
            for s in range(SPLIT_K):
                # .cg: read L2, never a stale L1 line -- the partials were written by other SMs.
                acc += tl.load(part_ptr + s * M * N + p_offs, mask=c_mask, other=0.0, cache_modifier=".cg")
            _store_tile(c_ptr, c_offs, c_mask, acc, bias_ptr, rn, HAS_BIAS, SWAP_AB, ROUND_BF16)
    else:
        _store_tile(c_ptr, c_offs, c_mask, acc, bias_ptr, rn, HAS_BIAS, SWAP_AB, ROUND_BF16)


def _tma_layout_ok(stride0: int, stride1: int, ptr: int, itemsize: int) -> bool:
    """The layout a tensor descriptor needs of a 2-D operand: unit last stride, 16-byte aligned rows and base."""
    return stride1 == 1 and (stride0 * itemsize) % 16 == 0 and ptr % 16 == 0


def _tma_ok(t: torch.Tensor) -> bool:
    """Whether an fp8 operand can be read through a tensor descriptor: rows 16-byte aligned (K % 16 == 0),
    a 16-byte aligned base, and a device with the copy engine (sm_90+; the interpreter emulates it)."""
    if not _tma_layout_ok(*t.stride(), t.data_ptr(), t.element_size()):
        return False
    if t.device.type == "cuda":
        return cuda_identity(t.device.index).arch >= (9, 0)
    return INTERPRET


def tma_ok(x_fp8: torch.Tensor, w_fp8: torch.Tensor) -> bool:
    """Whether both operands can be read through tensor descriptors (``_tma_ok`` for each)."""
    return _tma_ok(x_fp8) and _tma_ok(w_fp8)


def _descriptor_template(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A tensor descriptor of ``t``'s layout with ``block`` tiles, validated once and holding no tensor: a call
    copies it with ``_descriptor_of`` (a plan keeps no tensor alive, see ``GemmPlan``)."""
    desc = TensorDescriptor.from_tensor(t, block)
    desc.base = None
    return desc


def _descriptor_of(template: TensorDescriptor, t: torch.Tensor, shape: tuple, strides: tuple) -> TensorDescriptor:
    """``template`` for tensor ``t`` of ``shape`` and ``strides``, without the dataclass's validation (3 us of
    host time per descriptor): the caller has checked what it checks (16-byte aligned base and rows, unit last
    stride, positive sizes). Every other field is the template's, whatever this Triton's descriptor has."""
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(template.__dict__)
    desc.base, desc.shape, desc.strides = t, shape, strides
    return desc


_GEMM = FastLaunch(_fp8_block_gemm_kernel)
# The promotion (acc += tile * a_scale * w_scale) compiles to fused multiply-adds, as every measurement of this
# kernel was taken. Pinned: Triton 3.9 warns that its default (on) turns off in 3.10, which would change the
# kernel's code and rounding with the Triton release.
FP_FUSION = True
# The most weight bytes one launch brings into L2 before its wait (programmatic dependent launch, sm_90+). 0: one
# llama-preset layer's four decode GEMMs on an H200 took 76.0 us with PDL and no prefetch, 79.7 / 81.2 / 88.7 us
# with 8 / 16 / 32 MB, 78.3 us without PDL (M = 1, benchmarks/results/h200_pdl): the prefetches seem to queue
# ahead of the loop's own loads instead of hiding under the producer.
PREFETCH_BYTES = 0


def prefetch_groups(n: int, k: int, block_n: int, split: int, budget: int | None = None) -> int:
    """K groups of its weight rows each program of an (N, K) GEMM prefetches into L2 before its wait: all of its
    share of K, or fewer so that the launch's programs (every N tile times ``split``) fetch at most ``budget``
    bytes (``PREFETCH_BYTES``)."""
    per_group = cdiv(n, block_n) * block_n * split * 128
    return min(cdiv(cdiv(k, 128), split), (PREFETCH_BYTES if budget is None else budget) // per_group)


def _alignment(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.dtype, t.stride(), t.data_ptr() % 16 == 0)


class TritonGemmPlan(GemmPlan):
    """The Triton GEMM of one weight layout at M rows: config, grid, compile-time arguments and the split-K
    workspace size decided once; a call allocates the output (and workspace) and launches.

    Built from the weight tensors' metadata only and holding none of them (``GemmPlan``): the weight's tensor
    descriptor is made per call, a few microseconds of host time on the paths that launch directly (graph
    replays and captures pay nothing).
    """

    def __init__(self, w_fp8: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, m: int, config: TritonConfig | None = None) -> None:
        n, k = w_fp8.shape
        cfg = config or get_config(m, n, k, w_fp8.device)
        self.out_dtype, self.m, self.n, self.k, self.cfg = out_dtype, m, n, k, cfg
        tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
        self.grid = (tiles, min(cfg.split_k, cdiv(k, 128)))
        split = self.grid[1]
        # Counters padded to 32 (the kernel finds the partials there), then split x M x N fp32 partials.
        self.counters = tiles if split > 1 else 0
        self.workspace_numel = cdiv(tiles, 32) * 32 + split * m * n if split > 1 else 0
        self.w_contiguous = w_fp8.stride(1) == 1
        w_aligned = self.w_contiguous and _tma_ok(w_fp8)
        # A strided weight is copied per call (a fresh, aligned tensor): whether that copy suits TMA is known then.
        self.w_tma = cfg.tma and (not self.w_contiguous or w_aligned)
        self.pdl = pdl_ok(w_fp8.device)
        # Groups each program prefetches before its wait: whole, aligned rows of a contiguous weight only, and at
        # most PREFETCH_BYTES for the launch.
        prefetch = prefetch_groups(n, k, cfg.block_n, split) if self.pdl and w_aligned else 0
        self.constexprs = dict(
            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=128, W_BLOCK_N=128,
            GROUP_M=cfg.group_m, SPLIT_K=split, SWAP_AB=cfg.swap_ab, EVEN_K=k % 128 == 0,
            ROUND_BF16=INTERPRET and out_dtype == torch.bfloat16)
        # What tells this plan's kernels apart from other layers' (the launch cache is shared by every layer).
        self.static_key = (n, k, out_dtype, _alignment(bias), _alignment(w_fp8), _alignment(weight_scale_inv),
                           tuple(self.constexprs.values()), cfg, self.pdl, prefetch)
        pdl = {"PDL": self.pdl, "PREFETCH": prefetch}
        self._plain_constexprs = {**self.constexprs, "USE_TMA": False, "PAIR_K": False, **pdl}
        self._tma_constexprs = {**self.constexprs, "USE_TMA": True,
                                "PAIR_K": cfg.swap_ab and cfg.pair_k and 128 % cfg.block_n == 0, **pdl}
        # Descriptor templates (layouts only, no tensor), made on the first TMA call.
        self._w_desc: TensorDescriptor | None = None
        self._x_desc: TensorDescriptor | None = None

    def workspace(self, device: torch.device) -> torch.Tensor | None:
        return torch.empty(self.workspace_numel, dtype=torch.int32, device=device) if self.counters else None

    def __call__(self, x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor,
                 weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 work: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        # Every eager call that does not replay a graph pays this host time: each stride() or data_ptr() call
        # costs a fraction of a microsecond, so each is read once.
        xs0, xs1 = x_fp8.stride()
        if xs1 != 1:
            x_fp8 = x_fp8.contiguous()
            xs0, xs1 = x_fp8.stride()
        if not self.w_contiguous:
            w_fp8 = w_fp8.contiguous()
        m, n, cfg = self.m, self.n, self.cfg
        if out is None:
            out = torch.empty(m, n, dtype=self.out_dtype, device=x_fp8.device)
        if self.counters and work is None:
            work = self.workspace(x_fp8.device)
            work[:self.counters].zero_()
        ss0, ss1 = x_scale.stride()
        x_ptr = x_fp8.data_ptr()
        # TMA: the weight's side was decided with the plan (same device as x: the input checks saw to that).
        use_tma = self.w_tma and _tma_layout_ok(xs0, xs1, x_ptr, 1) and (self.w_contiguous or _tma_ok(w_fp8))
        if use_tma:
            if self.w_contiguous:
                if self._w_desc is None:
                    self._w_desc = _descriptor_template(w_fp8, [cfg.block_n, 128])
                w_desc = _descriptor_of(self._w_desc, w_fp8, w_fp8.shape, w_fp8.stride())
            else:
                w_desc = TensorDescriptor.from_tensor(w_fp8, [cfg.block_n, 128])
            if self._x_desc is None:
                self._x_desc = _descriptor_template(x_fp8, [cfg.block_m, 128])
            a_desc = _descriptor_of(self._x_desc, x_fp8, x_fp8.shape, (xs0, xs1))
        else:
            a_desc = w_desc = None
        # What can change a launch's specialization from call to call: M is the plan's, so the activation's
        # layout and alignment (a caller of gemm() may pass any strides) and whether TMA runs.
        key = (self.static_key, m, xs0, ss0, ss1, x_ptr % 16 == 0, x_scale.data_ptr() % 16 == 0, use_tma)
        ws0, ws1 = weight_scale_inv.stride()
        args = (x_fp8, x_scale, w_fp8, weight_scale_inv, out, bias if bias is not None else out,
                work if work is not None else out, a_desc, w_desc, m, n, self.k, xs0, ss0, ss1, w_fp8.stride(0),
                ws0, ws1, out.stride(0))
        _GEMM(key, self.grid, args, self._tma_constexprs if use_tma else self._plain_constexprs,
              num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=self.pdl, enable_fp_fusion=FP_FUSION)
        return out


def triton_gemm(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, weight_scale_inv: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                config: TritonConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel on 2-D operands (inputs already validated by the caller), into ``out`` when given."""
    plan = TritonGemmPlan(w_fp8, weight_scale_inv, bias, out_dtype, x_fp8.shape[0], config)
    return plan(x_fp8, x_scale, w_fp8, weight_scale_inv, bias, out=out)
