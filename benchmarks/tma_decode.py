"""Experimental decode GEMM with TMA (tensor-descriptor) loads, for the decode probe only.

Same math and split-K reduction as blockfp8's Triton kernel in swap-AB form, but the weight and activation
tiles arrive through the Hopper bulk tensor copy engine (host-built descriptors, zero fill past the edges)
instead of per-thread pointer loads, and the weight scale is one scalar per tile (BLOCK_N divides 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from blockfp8.backends.triton import _locks, _store_tile
from blockfp8.quant import cdiv


@triton.jit
def _tma_decode_kernel(a_desc, as_ptr, w_desc, ws_ptr, c_ptr, part_ptr, lock_ptr, M, N, K,
                       stride_asm, stride_ask, stride_wsn, stride_wsk, stride_cm,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_n = tl.cdiv(N, BLOCK_N)
    pid_n = pid % grid_n
    pid_m = pid // grid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    num_groups = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_groups, SPLIT_K)
    g_start = pid_k * per_split
    g_end = min(g_start + per_split, num_groups)
    w_block = (pid_n * BLOCK_N) // 128
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g in range(g_start, g_end):
        w = w_desc.load([pid_n * BLOCK_N, g * BLOCK_K])
        a = a_desc.load([pid_m * BLOCK_M, g * BLOCK_K])
        sa = tl.load(as_ptr + rm * stride_asm + g * stride_ask)
        sw = tl.load(ws_ptr + w_block * stride_wsn + g * stride_wsk)
        acc += tl.dot(w, tl.trans(a)) * (sa * sw)[None, :]
    c_offs = offs_m[None, :] * stride_cm + offs_n[:, None]
    p_offs = offs_m[None, :] * N + offs_n[:, None]
    c_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if SPLIT_K > 1:
        tl.store(part_ptr + pid_k * M * N + p_offs, acc, mask=c_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros_like(acc)
            for s in range(SPLIT_K):
                acc += tl.load(part_ptr + s * M * N + p_offs, mask=c_mask, other=0.0, cache_modifier=".cg")
            _store_tile(c_ptr, c_offs, c_mask, acc, c_ptr, rn, False, True, False)
            tl.atomic_xchg(lock_ptr + pid, 0)
    else:
        _store_tile(c_ptr, c_offs, c_mask, acc, c_ptr, rn, False, True, False)


def tma_decode_gemm(xq, xs, wq, ws, block_m: int, block_n: int, split_k: int, warps: int, stages: int,
                    out_dtype=torch.bfloat16) -> torch.Tensor:
    m, k = xq.shape
    n = wq.shape[0]
    assert 128 % block_n == 0 and k % 16 == 0
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    split = min(split_k, cdiv(k, 128))
    part = torch.empty(split, m, n, dtype=torch.float32, device=xq.device) if split > 1 else out
    locks = _locks(xq.device, tiles) if split > 1 else out
    a_desc = TensorDescriptor.from_tensor(xq, [block_m, 128])
    w_desc = TensorDescriptor.from_tensor(wq, [block_n, 128])
    _tma_decode_kernel[(tiles, split)](
        a_desc, xs, w_desc, ws, out, part, locks, m, n, k,
        xs.stride(0), xs.stride(1), ws.stride(0), ws.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=split, num_warps=warps, num_stages=stages)
    return out
