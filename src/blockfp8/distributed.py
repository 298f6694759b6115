"""Tensor parallelism for block-FP8 linear layers over ``torch.distributed``, at any split point.

Split rule: a dimension of ``total`` elements is cut into ``world_size`` contiguous ranges whose sizes
follow ``torch.tensor_split``: the first ``total % world_size`` ranks get one element more. Nothing has to
be a multiple of 128, so N=2112 at TP 8 gives eight 264-row shards whose boundaries fall inside blocks.

Why that is exact: a 128x128 block's scale is valid for every sub-slice of the block. A shard that starts at
offset ``p = start % 128`` inside its first block is placed on a *local* block grid with ``p`` leading zero
rows (column-parallel) or columns (row-parallel) and carries the scale rows/columns of the blocks it
overlaps. The local weight is then an ordinary block-FP8 weight, every backend runs it unchanged, and the
forward drops (column) or zero-fills (row) the padded positions. Zero weight rows/columns cost a few FLOPs.

Row-parallel activations: the input is quantized per 1x128 group, and a group cut by a shard boundary has
its values spread over two or more ranks. Each part would get its own scale from its local maximum, which is
a different (finer) quantization than the unsharded layer's. To stay bit-identical to the unsharded
quantization, the ranks exchange the absolute maximum of every cut group (one all_reduce(MAX) of
``M x (number of cut groups)`` fp32 values, skipped when the split is block-aligned) and each rank writes that
maximum into one of its zero-padded activation positions of the group. The padded weight column there is
zero, so the value adds nothing to the product but makes the group's scale the unsharded one.

Collectives (only with ``group=``): column-parallel with ``gather_output=True`` all-gathers the outputs;
row-parallel all-reduces (SUM) the partial products. Without a group the modules return their local result:
the column shard's own output columns, or the row shard's partial product (rank 0's includes the bias, so the
partials of all ranks sum to the full output). Column shards are bit-identical to the unsharded layer. Row
partials are rounded to ``reduce_dtype`` (default: the input's dtype, as serving engines reduce) before the
sum; with ``reduce_dtype=torch.float32`` the sum matches the unsharded layer to fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .checkpoint import weight_map
from .format import BLOCK, FP8_DTYPE, cdiv
from .nn import Fp8BlockLinear, KeepFp8Buffers
from .ops import linear
from .validate import check_weight_values, require_dtype

# Local N (column shards) and K (row shards) are rounded up to this multiple: cuBLAS blockwise needs N % 16
# and K % 16 (measured on H100), the strictest limits among the backends. The extra rows/columns are zeros
# and never reach past the blocks the shard overlaps.
LOCAL_MULTIPLE = 16
STYLES = ("column", "row")

Group = dist.ProcessGroup | None

__all__ = ["ColumnParallelFp8Linear", "RowParallelFp8Linear", "Segment", "cut_group_amax", "load_shard", "local_shape",
           "shard", "shard_range", "slice_input", "split_sizes"]


def split_sizes(total: int, world_size: int) -> list[int]:
    """Sizes of the ``world_size`` contiguous ranges ``total`` is split into (``torch.tensor_split`` rule)."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be a positive int, got {total!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if world_size > total:
        raise ValueError(f"world_size={world_size} is larger than the dimension it splits (total={total}); "
                         f"every rank needs at least one row/column")
    base, extra = divmod(total, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of ``rank``'s range of a dimension of size ``total`` split over ``world_size`` ranks."""
    sizes = split_sizes(total, world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


@dataclass(frozen=True)
class Segment:
    """Global rows/columns ``[start, stop)`` a rank owns, and where they sit on the local block grid."""

    start: int
    stop: int

    @property
    def pad(self) -> int:
        """Offset of ``start`` inside its 128-block: the number of leading zero rows/columns."""
        return self.start % BLOCK

    @property
    def blocks(self) -> tuple[int, int]:
        """Global block (scale) indices ``[first, stop)`` the segment overlaps."""
        return self.start // BLOCK, cdiv(self.stop, BLOCK)

    @property
    def width(self) -> int:
        return self.stop - self.start


def _column_segments(parts: Sequence[int], rank: int, world_size: int) -> list[Segment]:
    # Each fused part (e.g. gate and up of a gate_up projection) is split on its own, so every rank gets a
    # matching slice of each part.
    segments, offset = [], 0
    for size in parts:
        a, b = shard_range(size, rank, world_size)
        segments.append(Segment(offset + a, offset + b))
        offset += size
    return segments


def _local_offsets(segments: Sequence[Segment]) -> list[int]:
    """Local row where each segment's padded run starts; every run but the last spans whole blocks."""
    offsets, row = [], 0
    for seg in segments:
        offsets.append(row)
        first, stop = seg.blocks
        row += (stop - first) * BLOCK
    return offsets


def _column_local_rows(segments: Sequence[Segment]) -> int:
    last = segments[-1]
    return _round_up(_local_offsets(segments)[-1] + last.pad + last.width)


def _row_local_width(seg: Segment) -> int:
    """Local K of a row shard: pad + shard + one spare zero column (the slot for a cut tail group's amax),
    rounded up, and never more than the whole blocks the shard overlaps."""
    first, stop = seg.blocks
    return min((stop - first) * BLOCK, _round_up(seg.pad + seg.width + 1))


def _round_up(size: int) -> int:
    return cdiv(size, LOCAL_MULTIPLE) * LOCAL_MULTIPLE


def _valid_columns(segments: Sequence[Segment]) -> list[int]:
    """Local output positions holding real (non-padding) outputs, in global order."""
    cols: list[int] = []
    for seg, off in zip(segments, _local_offsets(segments), strict=True):
        cols.extend(range(off + seg.pad, off + seg.pad + seg.width))
    return cols


def _check_parts(parts: Sequence[int] | None, n: int) -> tuple[int, ...]:
    if parts is None:
        return (n,)
    parts = tuple(parts)
    if not parts or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in parts) or sum(parts) != n:
        raise ValueError(f"parts must be positive ints summing to out_features={n}, got {parts!r}")
    return parts


def _check_group(group: Group, rank: int, world_size: int) -> None:
    if group is None:
        return
    if not dist.is_initialized():
        raise ValueError("group= was given but torch.distributed is not initialized")
    seen = (dist.get_rank(group), dist.get_world_size(group))
    if seen != (rank, world_size):
        raise ValueError(f"rank/world_size must match the process group: got rank={rank}, world_size={world_size}, "
                         f"the group has rank={seen[0]}, size={seen[1]}")


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long, device=device)


def _padded_width(parts: Sequence[int], world_size: int) -> int:
    """Widest local output over all ranks: every rank pads its output to it before the all_gather."""
    return max(_column_local_rows(_column_segments(parts, r, world_size)) for r in range(world_size))


def _gather_positions(parts: Sequence[int], world_size: int) -> list[int]:
    """Position of every global output column in the concatenation of all ranks' padded local outputs."""
    width = _padded_width(parts, world_size)
    layouts = [_column_segments(parts, r, world_size) for r in range(world_size)]
    valid = [_valid_columns(segs) for segs in layouts]
    out: list[int] = []
    for i in range(len(parts)):  # global order: part by part, then rank by rank inside a part
        for r, segs in enumerate(layouts):
            before = sum(s.width for s in segs[:i])
            out.extend(r * width + c for c in valid[r][before:before + segs[i].width])
    return out


class ColumnParallelFp8Linear(KeepFp8Buffers, nn.Module):
    """One rank's slice of the output features (N) of a block-FP8 linear layer.

    ``forward(x)`` takes the full input [..., K]. It returns this rank's output columns [..., local_out_features]
    (without a group, or ``gather_output=False``), or the full output [..., N] all-gathered over ``group``.
    With several ``parts`` (a fused layer such as gate_up), each part is split on its own and the local output
    is the concatenation of this rank's slice of each part.
    """

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None, *,
                 parts: Sequence[int], rank: int, world_size: int, group: Group = None,
                 gather_output: bool = False, backend: str | None = None) -> None:
        super().__init__()
        _check_group(group, rank, world_size)
        self.in_features = weight.shape[1]
        self.out_features = sum(parts)
        self.parts = tuple(parts)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.gather_output, self.backend = gather_output, backend
        self.segments = _column_segments(self.parts, rank, world_size)
        valid = _valid_columns(self.segments)
        self.local_out_features = len(valid)
        # One segment: the real outputs are one slice of the local output (a view, no copy).
        seg = self.segments[0]
        self._slice = (seg.pad, seg.width) if len(self.segments) == 1 else None
        self._gather_width = _padded_width(self.parts, world_size)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale_inv", weight_scale_inv)
        self.register_buffer("bias", bias)
        self.register_buffer("_valid", _index(valid, weight.device), persistent=False)
        gather = _gather_positions(self.parts, world_size) if group is not None and gather_output else []
        self.register_buffer("_gather", _index(gather, weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.weight_scale_inv, self.bias, backend=self.backend)
        if self.group is not None and self.gather_output:
            return self._all_gather(y)
        if self._slice is not None:
            return y.narrow(-1, *self._slice)
        return y.index_select(-1, self._valid)

    def _all_gather(self, y: torch.Tensor) -> torch.Tensor:
        # Local widths differ by rank (different pads); all_gather wants equal shapes, so pad to the widest.
        y = F.pad(y, (0, self._gather_width - y.shape[-1])).contiguous()
        pieces = [torch.empty_like(y) for _ in range(self.world_size)]
        dist.all_gather(pieces, y, group=self.group)
        return torch.cat(pieces, dim=-1).index_select(-1, self._gather)

    def extra_repr(self) -> str:
        spans = ", ".join(f"[{s.start}, {s.stop}) pad {s.pad}" for s in self.segments)
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}/"
                f"{self.world_size}, rows {spans}, local weight {tuple(self.weight.shape)}, "
                f"gather_output={self.gather_output}, backend={self.backend or 'auto'}")


def _cut_groups(in_features: int, world_size: int) -> list[int]:
    """Global activation groups (= weight block columns) that two or more ranks share."""
    owners = [0] * cdiv(in_features, BLOCK)
    for r in range(world_size):
        first, stop = Segment(*shard_range(in_features, r, world_size)).blocks
        for g in range(first, stop):
            owners[g] += 1
    return [g for g, n in enumerate(owners) if n > 1]


def _group_amax(x: torch.Tensor) -> torch.Tensor:
    """fp32 absolute maximum of every 1x128 group of x [..., K] (the last group may be partial)."""
    k = x.shape[-1]
    return F.pad(x, (0, cdiv(k, BLOCK) * BLOCK - k)).unflatten(-1, (-1, BLOCK)).abs().amax(-1).float()


def cut_group_amax(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Absolute maximum of each activation group that the ``world_size`` split cuts, from the full input.

    ``x`` is [..., K]; returns fp32 [..., number of cut groups]. This is what a row-parallel group exchanges;
    pass it as ``cut_amax=`` to run row shards without a process group and still match the unsharded layer.
    """
    return _group_amax(x)[..., _index(_cut_groups(x.shape[-1], world_size), x.device)]


class RowParallelFp8Linear(KeepFp8Buffers, nn.Module):
    """One rank's slice of the input features (K) of a block-FP8 linear layer.

    ``forward(x)`` takes this rank's slice of the input, ``x_full[..., start:stop]`` (see ``slice_input``), and
    returns the output [..., N]: all-reduced over ``group``, or this rank's partial product without a group
    (rank 0's partial includes the bias, so the partials sum to the full output).
    """

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None, *,
                 in_features: int, rank: int, world_size: int, group: Group = None,
                 backend: str | None = None, reduce_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_group(group, rank, world_size)
        self.in_features = in_features
        self.out_features = weight.shape[0]
        self.rank, self.world_size, self.group, self.backend = rank, world_size, group, backend
        self.reduce_dtype = reduce_dtype
        self.segment = Segment(*shard_range(in_features, rank, world_size))
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale_inv", weight_scale_inv)
        self.register_buffer("bias", bias)
        cut = _cut_groups(in_features, world_size)
        first, stop = self.segment.blocks
        mine = [(slot, g - first) for slot, g in enumerate(cut) if first <= g < stop]
        self.num_cut_groups = len(cut)
        self.register_buffer("_slots", _index([s for s, _ in mine], weight.device), persistent=False)
        self.register_buffer("_local_groups", _index([lg for _, lg in mine], weight.device), persistent=False)
        self.register_buffer("_sentinels", _index([self._free_position(lg) for _, lg in mine], weight.device),
                             persistent=False)

    def _free_position(self, local_group: int) -> int:
        # A cut group is only partly this rank's, so it has a zero-padded position: the first one when the
        # shard starts inside the group, else the spare column right after the shard (it ends inside it).
        if local_group == 0 and self.segment.pad > 0:
            return 0
        return self.segment.pad + self.segment.width

    def forward(self, x: torch.Tensor, cut_amax: torch.Tensor | None = None) -> torch.Tensor:
        """``cut_amax`` ([..., num_cut_groups], from ``cut_group_amax``) replaces the exchange over the group.

        ``cut_amax`` is checked: a float tensor of that shape on x's device, no value below the absolute maximum
        of this rank's own part of its group (reading them costs one host sync per call; the exchange over a
        group needs no check). A value *above* the true maximum cannot be seen from one rank: it coarsens that
        group's quantization, so pass ``cut_group_amax`` of the full input.
        """
        seg = self.segment
        if x.dim() < 1 or x.shape[-1] != seg.width:
            raise ValueError(f"x must be rank {self.rank}'s input slice [..., {seg.width}] (columns [{seg.start}, "
                             f"{seg.stop}) of in_features={self.in_features}), got shape {tuple(x.shape)}")
        buf = x.new_zeros(*x.shape[:-1], self.weight.shape[1])
        buf[..., seg.pad:seg.pad + seg.width] = x
        if cut_amax is not None:
            self._check_cut_amax(cut_amax, x, buf)
        if self.num_cut_groups and (cut_amax is not None or self.group is not None):
            if cut_amax is None:  # every rank joins the exchange, also one whose own blocks are all whole
                cut_amax = self._exchange_amax(buf)
            # The weight column under each sentinel is zero: it changes the group's scale, not the product.
            buf[..., self._sentinels] = cut_amax[..., self._slots].to(buf.dtype)
        # Partials in reduce_dtype: casting the bf16 input to fp32 is exact, so quantization is unchanged.
        y = linear(buf.to(self.reduce_dtype or buf.dtype), self.weight, self.weight_scale_inv, self.bias,
                   backend=self.backend)
        if self.group is not None:
            dist.all_reduce(y, group=self.group)
        return y.to(x.dtype)

    def _check_cut_amax(self, cut_amax: torch.Tensor, x: torch.Tensor, buf: torch.Tensor) -> None:
        require_dtype(cut_amax, "cut_amax")
        want = (*x.shape[:-1], self.num_cut_groups)
        if tuple(cut_amax.shape) != want:
            raise ValueError(f"cut_amax must have shape {want} (x's leading dimensions, then the {self.num_cut_groups} "
                             f"activation group(s) a {self.world_size}-way split of K={self.in_features} cuts: "
                             f"cut_group_amax(x_full, {self.world_size})), got {tuple(cut_amax.shape)}")
        if cut_amax.device != x.device:
            raise ValueError(f"cut_amax is on {cut_amax.device} but x is on {x.device}; move both to one device")
        if not self._slots.numel():
            return
        # This rank holds part of each of its cut groups, so the whole group's maximum is at least its part's.
        own = _group_amax(buf)[..., self._local_groups]
        given = cut_amax[..., self._slots].float()
        bad = ~(given >= own) & ~torch.isnan(own)  # a NaN input makes its own row NaN anyway
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            where = ", ".join(map(str, (*idx[:-1], int(self._slots[idx[-1]]))))
            raise ValueError(f"cut_amax holds {int(bad.sum())} value(s) below the absolute maximum of rank "
                             f"{self.rank}'s own part of the group; first: cut_amax[{where}] = {given[idx].item()!r} "
                             f"< {own[idx].item()!r}. Pass cut_group_amax(x_full, {self.world_size}) of the full input")

    def _exchange_amax(self, buf: torch.Tensor) -> torch.Tensor:
        local = _group_amax(buf)[..., self._local_groups]
        amax = local.new_zeros(*buf.shape[:-1], self.num_cut_groups)
        amax[..., self._slots] = local
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        return amax

    def extra_repr(self) -> str:
        seg = self.segment
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}/"
                f"{self.world_size}, columns [{seg.start}, {seg.stop}) pad {seg.pad}, local weight "
                f"{tuple(self.weight.shape)}, cut groups here={self._slots.numel()}, reduce_dtype={self.reduce_dtype}, "
                f"backend={self.backend or 'auto'}")


def slice_input(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """``rank``'s slice of a full row-parallel input [..., K]: ``x[..., start:stop]`` (a view)."""
    start, stop = shard_range(x.shape[-1], rank, world_size)
    return x.narrow(-1, start, stop - start)


# The local weights are assembled as uint8 (fp8 zero is byte 0): zero-fill and strided copies of raw bytes
# work on every device, while float8 kernels for them are not available everywhere. The sources are torch
# tensors or lazy safetensors slices: both read ``t[a:b]`` and ``t[:, a:b]``.


def _column_tensors(segments: Sequence[Segment], k: int, weight: Any, scale: Any,
                    bias: Any | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Local (weight, scale, bias) of a column shard: each segment's rows behind ``pad`` zero rows."""
    pieces = [(weight[s.start:s.stop], scale[slice(*s.blocks)], bias[s.start:s.stop] if bias is not None else None)
              for s in segments]
    w0, _, b0 = pieces[0]
    n_local = _column_local_rows(segments)
    w = torch.zeros(n_local, k, dtype=torch.uint8, device=w0.device)
    b = torch.zeros(n_local, dtype=b0.dtype, device=w0.device) if b0 is not None else None
    for seg, off, (wp, _, bp) in zip(segments, _local_offsets(segments), pieces, strict=True):
        w[off + seg.pad:off + seg.pad + seg.width] = wp.view(torch.uint8)
        if b is not None:
            b[off + seg.pad:off + seg.pad + seg.width] = bp
    return w.view(FP8_DTYPE), torch.cat([sp for _, sp, _ in pieces]).contiguous(), b


def _row_tensors(segment: Segment, n: int, weight: Any, scale: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (weight, scale) of a row shard: ``pad`` zero columns, the shard, zero columns up to its local K."""
    first, stop = segment.blocks
    wp = weight[:, segment.start:segment.stop]
    w = torch.zeros(n, _row_local_width(segment), dtype=torch.uint8, device=wp.device)
    w[:, segment.pad:segment.pad + segment.width] = wp.view(torch.uint8)
    return w.view(FP8_DTYPE), scale[:, first:stop].contiguous()


def local_shape(n: int, k: int, rank: int, world_size: int, style: str = "column",
                parts: Sequence[int] | None = None) -> tuple[int, int]:
    """(N, K) of ``rank``'s local weight when an (N, K) layer is sharded ``style``-wise (what its GEMMs run):
    column shards split N (each of ``parts`` on its own), row shards split K; either is padded onto its local
    block grid and rounded up to ``LOCAL_MULTIPLE``, exactly as ``shard`` builds it."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if style == "column":
        return _column_local_rows(_column_segments(_check_parts(parts, n), rank, world_size)), k
    if parts is not None:
        raise ValueError(f"parts= applies to style='column' only, got parts={parts!r} with style='row'")
    return n, _row_local_width(Segment(*shard_range(k, rank, world_size)))


def _check_style(style: str, gather_output: bool, parts: Sequence[int] | None,
                 reduce_dtype: torch.dtype | None) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if style == "row" and gather_output:
        raise ValueError("gather_output=True applies to style='column' only; row shards all-reduce their output")
    if style == "row" and parts is not None:
        raise ValueError(f"parts= applies to style='column' only, got parts={parts!r} with style='row'")
    if style == "column" and reduce_dtype is not None:
        raise ValueError(f"reduce_dtype= applies to style='row' only, got reduce_dtype={reduce_dtype} with "
                         f"style='column'")
    if reduce_dtype not in (None, torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"reduce_dtype must be None, bfloat16, float16 or float32, got {reduce_dtype}")


def _build(weight: Any, scale: Any, bias: Any | None, n: int, k: int, rank: int, world_size: int, style: str,
           group: Group, gather_output: bool, parts: Sequence[int] | None, reduce_dtype: torch.dtype | None,
           backend: str | None) -> nn.Module:
    """The shard module, reading only its slices of ``weight``/``scale``/``bias`` (tensors or lazy slices)."""
    _check_style(style, gather_output, parts, reduce_dtype)
    if style == "column":
        parts = _check_parts(parts, n)
        tensors = _column_tensors(_column_segments(parts, rank, world_size), k, weight, scale, bias)
        return ColumnParallelFp8Linear(*tensors, parts=parts, rank=rank, world_size=world_size, group=group,
                                       gather_output=gather_output, backend=backend)
    wl, sl = _row_tensors(Segment(*shard_range(k, rank, world_size)), n, weight, scale)
    bl = bias[:] if bias is not None and rank == 0 else None
    return RowParallelFp8Linear(wl, sl, bl, in_features=k, rank=rank, world_size=world_size, group=group,
                                backend=backend, reduce_dtype=reduce_dtype)


def shard(layer: Fp8BlockLinear, rank: int, world_size: int, style: str = "column", group: Group = None,
          gather_output: bool = False, parts: Sequence[int] | None = None,
          reduce_dtype: torch.dtype | None = None) -> nn.Module:
    """``rank``'s tensor-parallel shard of ``layer``: a ``ColumnParallelFp8Linear`` (``style="column"``, split N)
    or a ``RowParallelFp8Linear`` (``style="row"``, split K). Any ``world_size`` up to the split dimension works.

    ``group`` (a ``torch.distributed`` process group whose rank/size match) makes the forward run the
    collective; ``parts`` splits each part of a fused output (e.g. ``(18432, 18432)`` for gate_up) on its own.
    ``reduce_dtype`` (row only) computes and all-reduces the partial products in that dtype (None: the input's
    dtype, as serving engines do; ``torch.float32`` matches the unsharded layer to fp32 rounding).
    """
    if not isinstance(layer, Fp8BlockLinear):
        raise TypeError(f"layer must be an Fp8BlockLinear, got {type(layer).__name__}")
    return _build(layer.weight, layer.weight_scale_inv, layer.bias, layer.out_features, layer.in_features, rank,
                  world_size, style, group, gather_output, parts, reduce_dtype, layer.backend)


def _slice_opener(files: dict[str, Path], stack: ExitStack) -> Callable[[str], Any]:
    """name -> a lazy safetensors slice of that tensor; each file is opened once."""
    handles: dict[Path, Any] = {}

    def open_slice(name: str) -> Any:
        path = files[name]
        if path not in handles:
            handles[path] = stack.enter_context(safe_open(path, framework="pt"))
        return handles[path].get_slice(name)
    return open_slice


def load_shard(checkpoint_dir: str | Path, name: str, rank: int, world_size: int, style: str = "column",
               group: Group = None, gather_output: bool = False, parts: Sequence[int] | None = None,
               reduce_dtype: torch.dtype | None = None, backend: str | None = None,
               device: torch.device | str | None = None) -> nn.Module:
    """Build ``rank``'s shard of layer ``name`` straight from a block-FP8 safetensors checkpoint.

    Reads only the shard's slice of ``<name>.weight`` and ``<name>.weight_scale_inv`` (and of ``<name>.bias``
    if present; a row shard's bias is read by rank 0 only). Same arguments and result as ``shard``; the
    module lands on ``device`` (default: CPU).
    """
    files = weight_map(checkpoint_dir)
    wname, sname, bname = f"{name}.weight", f"{name}.weight_scale_inv", f"{name}.bias"
    for needed in (wname, sname):
        if needed not in files:
            raise ValueError(f"tensor {needed!r} is not in the checkpoint at {checkpoint_dir}")
    with ExitStack() as stack:
        open_slice = _slice_opener(files, stack)
        w, s = open_slice(wname), open_slice(sname)
        n, k = w.get_shape()
        for tname, t, want in ((wname, w, "F8_E4M3"), (sname, s, "F32")):
            if t.get_dtype() != want:
                raise TypeError(f"{tname} in {files[tname]} must have dtype {want}, got {t.get_dtype()}")
        if tuple(s.get_shape()) != (cdiv(n, BLOCK), cdiv(k, BLOCK)):
            raise ValueError(f"{sname} must have shape {(cdiv(n, BLOCK), cdiv(k, BLOCK))} for weight {(n, k)}, "
                             f"got {tuple(s.get_shape())}")
        b = open_slice(bname) if bname in files else None
        module = _build(w, s, b, n, k, rank, world_size, style, group, gather_output, parts, reduce_dtype, backend)
    def where(tname: str) -> str:
        return f"{tname} in {files[tname]} (rank {rank}'s {style} shard, local indices)"

    # (a bias-less shard has no bias file to name)
    check_weight_values(module.weight, module.weight_scale_inv, module.bias, where(wname), where(sname),
                        where(bname) if module.bias is not None else bname)
    return module.to(device) if device is not None else module
