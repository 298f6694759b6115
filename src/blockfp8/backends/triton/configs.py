"""Launch configurations for the Triton GEMM: measured tables (data) with a heuristic default.

A device's tuned configs come from the layered tables of ``tables.py`` (kind ``"triton"``): the shipped
``data/triton_configs.json``, the user's tuning cache written by ``blockfp8 tune``, and
``BLOCKFP8_TRITON_CONFIGS`` (a JSON file with the shipped layout, merged over the rest). A query uses the entry
tuned at the smallest M >= its own in its phase (else the largest of that phase). Without an entry for this
device, the entry for the same shape on a device of the same family (same compute capability and SM count:
H100 and H200) is used, and without that the heuristic below. ``likely_configs`` is the short list
``blockfp8 tune`` times first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import torch

from ... import tables
from ...device import DeviceId, device_id
from ...format import cdiv, is_decode, next_pow2


@dataclass(frozen=True)
class TritonConfig:
    block_m: int
    block_n: int
    split_k: int = 1
    group_m: int = 8
    swap_ab: bool = False
    num_warps: int = 4
    num_stages: int = 3
    # Read the A and W tiles through TMA tensor descriptors where the operands allow it (sm_90+, 16-byte
    # aligned rows); otherwise, and when False, per-thread pointer loads.
    tma: bool = False
    # Decode with TMA: two K groups per loop step, both dots issued before either is scaled.
    pair_k: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> TritonConfig:
        return TritonConfig(**d)


def heuristic_config(m: int, n: int, k: int, num_sms: int = 132) -> TritonConfig:
    """Untuned default, fitted to the H100 tuning run (docs/performance.md): TMA tile loads everywhere
    (the kernel falls back to pointer loads where the operands do not allow them); swap-AB split-K for
    decode, 64x128 tiles for prefill, 128x128 for large prefill GEMMs."""
    groups = cdiv(k, 128)
    if is_decode(m):
        bm = max(16, next_pow2(m))
        bn = 64
        tiles = cdiv(n, bn) * cdiv(m, bm)
        # About one program per SM, each still owning at least 2 K groups: with TMA's deep pipeline one
        # program per SM streams as fast as two did with per-thread loads, and the split-K reduction shrinks.
        split = max(1, min(cdiv(num_sms, tiles), groups // 2 or 1))
        return TritonConfig(bm, bn, split, group_m=1, swap_ab=True, num_warps=4, num_stages=4, tma=True)
    if m >= 2048 and n >= 4096 and k >= 4096:
        return TritonConfig(128, 128, 1, group_m=8, swap_ab=False, num_warps=8, num_stages=4, tma=True)
    # 64x128 tiles with 4 warps won most prefill cells: 128x128 with 8 warps scales a larger accumulator
    # after every 128-K group and stalls more, except on the largest GEMMs.
    bm, bn = 64, 128
    tiles = cdiv(m, bm) * cdiv(n, bn)
    split = 1 if tiles >= num_sms else max(1, min(cdiv(num_sms, tiles), groups // 4 or 1))
    return TritonConfig(bm, bn, split, group_m=8, swap_ab=False, num_warps=4, num_stages=3, tma=True)


def candidate_configs(m: int, n: int, k: int, num_sms: int = 132) -> list[TritonConfig]:
    """Search space for ``blockfp8 tune`` at one (M, N, K), most promising first.

    Decode: swap-AB tiles with split-K counts that put 1-2 programs on every SM, TMA tile loads with deep
    pipelines first (the decode probe in docs/performance.md), then per-thread loads; prefill: the usual wgmma
    tile shapes, with and without TMA.
    """
    groups = cdiv(k, 128)
    out: list[TritonConfig] = []
    if is_decode(m):
        bm = max(16, next_pow2(m))
        # Per-thread-load configs: a few (the tuned table's entries are re-timed by tune anyway).
        for tma, shapes in ((True, ((4, 4), (4, 6), (8, 4), (4, 8))), (False, ((4, 3),))):
            for bn in (64, 128):
                tiles = cdiv(n, bn) * cdiv(m, bm)
                splits = {1, cdiv(num_sms, tiles), cdiv(2 * num_sms, tiles)}
                for split in sorted(s for s in splits if s <= groups and tiles * s <= 8 * num_sms):
                    for warps, stages in shapes:
                        out.append(TritonConfig(bm, bn, split, 1, True, warps, stages, tma))
                        # Two groups in flight double the staged tiles: keep them within shared memory.
                        if tma and warps == 4 and stages in (4, 6) and 2 * (bm + bn) * 128 * stages <= 200_000:
                            out.append(TritonConfig(bm, bn, split, 1, True, warps, stages, tma, pair_k=True))
    else:
        for tma in (True, False):
            for bm, bn, warps in ((64, 128, 4), (128, 128, 8), (128, 256, 8), (64, 256, 8)):
                tiles = cdiv(m, bm) * cdiv(n, bn)
                splits = {1} if tiles >= num_sms else {1, 2, cdiv(num_sms, tiles)}
                for split in sorted(s for s in splits if s <= groups):
                    for stages in (3, 4):
                        out.append(TritonConfig(bm, bn, split, 8, False, warps, stages, tma))
    return list(dict.fromkeys(out))


def likely_configs(m: int, n: int, k: int, num_sms: int = 132) -> list[TritonConfig]:
    """The few configs most likely to win at (M, N, K), best guess first: the heuristic and its variants that
    won cells of the H100 tuning run (``benchmarks/results/tune_h100.txt`` and ``data/triton_configs.json``).

    Decode: deeper pipelines (6 stages), the paired-K TMA loop, no split and 8 warps; prefill: the 64x128 tile
    with 4 stages and the 128x128 tile with 8 warps. ``blockfp8 tune`` times these before sampling the rest of
    ``candidate_configs``, so a short tuning budget goes to the likely winners."""
    base = heuristic_config(m, n, k, num_sms)
    if is_decode(m):
        variants = [replace(base, num_stages=6), replace(base, pair_k=True), replace(base, split_k=1),
                    replace(base, num_warps=8)]
        # Two groups in flight double the staged tiles (pair_k), six stages hold 1.5x four: stay within shared
        # memory (228 KB per SM on Hopper, part of it reserved).
        variants = [c for c in variants if (2 if c.pair_k else 1) * (c.block_m + c.block_n) * 128 * c.num_stages
                    <= 200_000]
    else:
        variants = [TritonConfig(64, 128, base.split_k, 8, False, 4, 4, True),
                    TritonConfig(128, 128, 1, 8, False, 8, 4, True),
                    TritonConfig(64, 128, base.split_k, 8, False, 4, 3, True)]
    return list(dict.fromkeys([base, *variants]))


def lookup(device: DeviceId, m: int, n: int, k: int) -> TritonConfig | None:
    """The tuned config for (M, N, K): this device's row, else the same shape on a device of its family."""
    found = tables.tuned_config("triton", device, n, k, m)
    return TritonConfig.from_json(found) if found else None


@lru_cache(maxsize=4096)
def _cached_config(generation: int, device: DeviceId, m: int, n: int, k: int) -> TritonConfig:
    # ``generation`` changes whenever a table may have changed (tuning wrote the cache): a new key, a new lookup.
    return lookup(device, m, n, k) or heuristic_config(m, n, k, device.sms or 132)


def get_config(m: int, n: int, k: int, device: torch.device) -> TritonConfig:
    """Tuned config for this device and shape if there is one, else the heuristic."""
    return _cached_config(tables.generation(), device_id(device), m, n, k)
