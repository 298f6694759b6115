"""The dispatcher's static rules: the backend order for a shape no table has measured, by M and weight size.

Derived from the H100 DeepSeek-V3 runs (``benchmarks/results/bench_A.json``, ``bench_B.json``: 8 shapes x 7 M,
every backend L2-cold in one CUDA graph); ``benchmarks/derive_rules.py`` prints how close each rule's first
choice comes to the per-cell fastest backend (geomean of best / chosen time), with every peer installed and
with DeepGEMM or cuBLAS missing. What the data says:

* decode on small weights (M <= 16, weight < 64 MiB): blockfp8's split-K Triton kernel keeps every SM loading
  the weight and wins or ties (DeepGEMM launches too few CTAs for one small tile row);
* decode otherwise (M <= 64): DeepGEMM, within 1-3% of the best on the large weights and clearly first at M=64;
* mid-size prefill on large weights (256 <= M <= 2048, weight >= 96 MiB): cuBLAS's blockwise GEMM, 9-15% ahead
  of DeepGEMM on the 117-264 MiB DeepSeek-V3 weights at M=512 and 2048;
* other prefill: DeepGEMM, then cuBLAS, then blockfp8's own kernels -- Gluon before Triton only for K >= 4096
  at M >= 512 (on K <= 2048, and at M = 128, the Triton kernel is up to 1.6x faster).

Each rule's order names every backend it ranks; the dispatcher skips any that is not installed or refuses the
shape (the next one runs), so the same rule serves a machine without DeepGEMM or without cuBLAS's blockwise
GEMM. The rules are the last word, after the measured tables, the user's tuning cache, online tuning and the
nearest measured shape of the device's family (``dispatch.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .backends import Problem
from .format import is_decode

MIB = 1024**2
# Weight bytes (fp8: N * K) below which decode at M <= 16 goes to the split-K Triton kernel: the measured
# DeepSeek-V3 weights fall into 15-38 MiB (Triton first or within 4%) and 117-264 MiB (DeepGEMM first).
SMALL_WEIGHT_BYTES = 64 * MIB
# Weight bytes from which mid-size prefill goes to cuBLAS (the 117-264 MiB weights; the 15-38 MiB ones stay on
# DeepGEMM, which is up to 2x faster there at M=512).
LARGE_WEIGHT_BYTES = 96 * MIB
# Of blockfp8's own kernels, the Gluon one leads prefill only with long K loops (K >= 4096) from M = 512 on: its
# per-group promotion overlaps the next wgmma, which pays when there are many groups and tiles to hide it in.
GLUON_MIN_K = 4096
# Below this compute capability there are no FP8 tensor cores (FP8 MMA needs sm_89: Ada, Hopper and later).
MIN_FP8_ARCH = (8, 9)


def weight_bytes(p: Problem) -> int:
    """Bytes of the fp8 weight (N * K): what a decode GEMM streams from memory."""
    return p.n * p.k


@dataclass(frozen=True)
class Rule:
    """A named backend order and the condition under which it applies."""

    name: str
    order: tuple[str, ...]
    why: str
    applies: Callable[[Problem], bool]

    def __str__(self) -> str:
        return f"static rule {self.name!r} ({self.why})"


RULES = (
    Rule("cpu", ("reference", "triton"),
         "off CUDA the float32 reference is the fast path; Triton runs only under its interpreter",
         lambda p: p.device_type != "cuda"),
    Rule("no-fp8-tensor-cores", ("reference",),
         f"compute capability below {MIN_FP8_ARCH[0]}.{MIN_FP8_ARCH[1]}: no FP8 MMA, only the float32 reference runs",
         lambda p: p.arch is not None and p.arch < MIN_FP8_ARCH),
    Rule("decode-small-weight", ("triton", "deepgemm", "gluon", "cublas", "reference"),
         f"M <= 16 and weight < {SMALL_WEIGHT_BYTES // MIB} MiB: the split-K Triton kernel keeps every SM streaming",
         lambda p: p.m <= 16 and weight_bytes(p) < SMALL_WEIGHT_BYTES),
    Rule("decode", ("deepgemm", "triton", "cublas", "gluon", "reference"),
         "M <= 64: DeepGEMM, else the split-K Triton kernel",
         lambda p: is_decode(p.m)),
    Rule("prefill-large-weight", ("cublas", "deepgemm", "gluon", "triton", "reference"),
         f"256 <= M <= 2048 and weight >= {LARGE_WEIGHT_BYTES // MIB} MiB: cuBLAS blockwise leads DeepGEMM",
         lambda p: 256 <= p.m <= 2048 and weight_bytes(p) >= LARGE_WEIGHT_BYTES),
    Rule("prefill-deep-k", ("deepgemm", "cublas", "gluon", "triton", "reference"),
         f"M >= 512 and K >= {GLUON_MIN_K}: DeepGEMM, then cuBLAS, then blockfp8's Gluon and Triton kernels",
         lambda p: p.m >= 512 and p.k >= GLUON_MIN_K),
    Rule("prefill", ("deepgemm", "cublas", "triton", "gluon", "reference"),
         "prefill: DeepGEMM, then cuBLAS, then blockfp8's Triton and Gluon kernels",
         lambda p: True),
)


def static_rule(p: Problem) -> Rule:
    """The first rule of ``RULES`` that applies to ``p`` (the last one always does)."""
    return next(rule for rule in RULES if rule.applies(p))
