"""Tuning on the device, the engine of ``blockfp8 tune``: for every shape x M, which backend -- and which launch
config of blockfp8's own kernels -- is fastest here, checked before it is timed, kept in the user's tuning cache.

Per cell (shape, M) the candidates are: every available backend that supports the cell (but the reference), the
Triton kernel with a few launch configs (the one that runs now, the heuristic, then ``likely_configs``, then a
spread of ``candidate_configs`` up to ``max_configs``), and the Gluon kernel likewise (``gluon_configs``). The
dispatcher's choice before tuning is among them, so every cell reports what tuning gained over it. Each
candidate is checked against the cell's one reference result first (``autotune.tune_cell``: a wrong or crashing
candidate is reported and never timed, so it can never be ranked), then the correct ones are raced
(``timer.race``): one CUDA graph each over weight copies that just exceed L2 (L2-cold), replayed once per round
in a shuffled order, ``reps`` rounds, so drift lands on all of them alike and their samples pair round by round.
The cell's rows: the backends ranked by their fastest correct candidate (the dispatcher's ranking) and the
fastest config of each own kernel -- except that what runs now (the dispatcher's choice before tuning) is kept
unless a candidate beats it for sure (``autotune.choose_trial``: by more than 1% and in enough rounds that a
sign test rules out chance), so that two tune runs agree.

Budget: before timing, every candidate of every cell can be compiled in parallel processes (``warm``): Triton,
Gluon and DeepGEMM compile a kernel on its first use and keep it on disk, so the timing pass then loads kernels
instead of compiling them one after the other.

Resumable: the cache is written after each shape (atomically), and a cell the cache already holds for this
device and software key is skipped unless ``force``.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .. import dispatch, tuning_cache
from ..autotune import Trial, choose_trial, ranked, tune_cell
from ..backends import Problem, backend_names, get_backend
from ..backends.triton.configs import candidate_configs, get_config, heuristic_config, likely_configs
from ..device import DeviceId, device_id
from ..reference import rel_error
from ..status import Status
from .operands import Operands, make_operands, make_weight_copies
from .shapes import Shape
from .timing import race

__all__ = ["Candidate", "CellResult", "TuneRun", "Trial", "cell_candidates", "cell_rows", "select_candidates",
           "select_gluon", "tune", "tune_cell", "warm"]

OWN_KERNELS = ("triton", "gluon")  # backends whose launch configs are tuned too


@dataclass(frozen=True)
class Candidate:
    """One thing to time at a cell: a backend, with a launch config for blockfp8's own kernels."""

    backend: str
    config: object | None = None  # TritonConfig / GluonConfig; None: what the backend picks itself

    @property
    def label(self) -> str:
        if self.config is None:
            return self.backend
        return f"{self.backend}[{' '.join(f'{k}={v}' for k, v in asdict(self.config).items())}]"


def _spread(items: list, room: int) -> list:
    """``room`` items spread evenly over ``items`` (its order sweeps tile shape, split and stages, so even spacing
    samples every kind)."""
    if room >= len(items):
        return items
    if room <= 0:
        return []
    if room == 1:
        return [items[len(items) // 2]]
    step = (len(items) - 1) / (room - 1)
    return [items[round(i * step)] for i in range(room)]


def select_candidates(m: int, n: int, k: int, max_configs: int, num_sms: int = 132,
                      incumbent: object | None = None) -> list:
    """Triton configs to time at one cell: the heuristic, the ``incumbent`` (the config the tables hold now, so a
    re-tune never ends slower than what runs), then ``likely_configs``, then a spread of the rest of
    ``candidate_configs``, up to ``max_configs`` in all (the first two are always kept; <= 0: all of them)."""
    base = heuristic_config(m, n, k, num_sms)
    head = list(dict.fromkeys([base] + ([incumbent] if incumbent is not None else [])))
    likely = [c for c in likely_configs(m, n, k, num_sms) if c not in head]
    rest = [c for c in dict.fromkeys(candidate_configs(m, n, k, num_sms)) if c not in head and c not in likely]
    if max_configs <= 0:
        return [*head, *likely, *rest]
    room = max(0, max_configs - len(head))
    return [*head, *likely[:room], *_spread(rest, room - len(likely[:room]))]


def select_gluon(m: int, n: int, k: int, max_configs: int, incumbent: object | None = None) -> list:
    """Gluon configs to time at one cell: ``pick_config``, the ``incumbent``, then ``likely_configs``, up to
    ``max_configs`` (the first two always kept; <= 0: all)."""
    from ..backends.gluon import likely_configs as gluon_likely

    likely = gluon_likely(m, n, k)
    head = list(dict.fromkeys([likely[0]] + ([incumbent] if incumbent is not None else [])))
    rest = [c for c in likely if c not in head]
    return [*head, *(rest if max_configs <= 0 else rest[:max(0, max_configs - len(head))])]


def current_candidate(p: Problem, device: torch.device, backend: str) -> Candidate:
    """``backend`` with the launch config it runs at ``p`` now (tables or heuristic)."""
    if backend == "triton":
        return Candidate(backend, get_config(p.m, p.n, p.k, device))
    if backend == "gluon":
        from ..backends.gluon import launch_config

        return Candidate(backend, launch_config(p.m, p.n, p.k, device))
    return Candidate(backend)


def cell_candidates(p: Problem, device: torch.device, backends: list[str], max_configs: int,
                    gluon_configs: int) -> list[Candidate]:
    """Every candidate of one cell, the backends' current choices first (see the module docstring)."""
    out: list[Candidate] = []
    for name in backends:
        if name == "reference" or not get_backend(name).supports(p):
            continue
        now = current_candidate(p, device, name)
        if name == "triton":
            out += [Candidate(name, c) for c in select_candidates(p.m, p.n, p.k, max_configs, p.sms or 132,
                                                                    now.config)]
        elif name == "gluon":
            out += [Candidate(name, c) for c in select_gluon(p.m, p.n, p.k, gluon_configs, now.config)]
        else:
            out.append(now)
    return out


def run_candidate(c: Candidate, x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor,
                  weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """One call of a candidate (bf16 output)."""
    if c.backend == "triton" and c.config is not None:
        from ..backends.triton.gemm import triton_gemm

        return triton_gemm(x_fp8, x_scale, w_fp8, weight_scale_inv, config=c.config)
    if c.backend == "gluon" and c.config is not None:
        from ..backends.gluon import gluon_gemm

        return gluon_gemm(x_fp8, x_scale, w_fp8, weight_scale_inv, config=c.config)
    return get_backend(c.backend).run(x_fp8, x_scale, w_fp8, weight_scale_inv, None, torch.bfloat16)


def measure_cell(weights: list[tuple[torch.Tensor, torch.Tensor]], m: int, candidates: list[Candidate], reps: int,
                 on_bad: Callable[[Trial], None]) -> list[Trial]:
    """Check every candidate against one reference result at M=``m``, then time the correct ones L2-cold."""
    ops: Operands = make_operands(weights, m)
    ref = ops.reference()

    def scales(c: Candidate) -> torch.Tensor:
        return ops.scales(get_backend(c.backend).scale_layout)  # the layout the backend is fed in a model

    def check(c: Candidate) -> float:
        return rel_error(run_candidate(c, ops.x_fp8, scales(c), *ops.weights[0]), ref)

    def call(c: Candidate) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        xs = scales(c)
        return lambda w, s: run_candidate(c, ops.x_fp8, xs, w, s)

    # Raced, not timed one after the other: decode candidates a few tenths of a microsecond apart are told
    # apart by paired rounds, and a close call keeps what runs now (autotune.choose_trial).
    return tune_cell(candidates, check, on_bad=on_bad,
                     race=lambda cs: race([call(c) for c in cs], rotate=ops.weights, rounds=reps))


@dataclass
class CellResult:
    """What tuning measured at one (shape, M): every trial, and the dispatcher's choice before tuning."""

    name: str
    n: int
    k: int
    m: int
    trials: list[Trial]
    default: Candidate | None = None

    @property
    def best(self) -> Trial | None:
        """The fastest correct trial."""
        fastest = ranked(self.trials)
        return fastest[0] if fastest else None

    @property
    def chosen(self) -> Trial | None:
        """What the cell's rows keep: the fastest, unless the dispatcher's choice before tuning is not slower
        for sure (``autotune.choose_trial``)."""
        return choose_trial(self.trials, self.default)

    @property
    def default_trial(self) -> Trial | None:
        return next((t for t in self.trials if t.config == self.default), None)

    def ranking(self) -> list[str]:
        """Backends by their fastest correct candidate, fastest first, the chosen trial's backend leading."""
        keep = self.chosen
        order = ([keep] if keep else []) + ranked(self.trials)
        return list(dict.fromkeys(t.config.backend for t in order))

    def best_config(self, backend: str) -> object | None:
        """The launch config to keep for ``backend``: the chosen trial's where it is that backend's, else its
        fastest."""
        keep = self.chosen
        if keep is not None and keep.config.backend == backend:
            return keep.config.config
        return next((t.config.config for t in ranked(self.trials) if t.config.backend == backend), None)


def cell_rows(r: CellResult) -> tuple[dict, dict]:
    """(tables in the cache's layout, the cell's record) of one tuned cell; empty tables when nothing was correct."""
    nk, m = f"{r.n},{r.k}", str(r.m)
    tables: dict = {}
    if r.ranking():
        tables["dispatch"] = {nk: {m: r.ranking()}}
    for kernel in OWN_KERNELS:
        config = r.best_config(kernel)
        if config is not None:
            tables[kernel] = {nk: {m: asdict(config)}}
    default = r.default_trial
    record = {"source": "tune", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "shape": r.name,
              "us": {t.config.label: t.us for t in ranked(r.trials)},
              "bad": {t.config.label: t.reason or f"rel error {t.rel_error:.3g}" for t in r.trials
                      if t.status != Status.OK},
              "best": r.chosen.config.label if r.chosen else None,
              "fastest": r.best.config.label if r.best else None,
              "rounds": max((len(t.samples) for t in r.trials if t.samples), default=0),
              "default": r.default.label if r.default else None,
              "default_us": default.us if default else None}
    return tables, record


@dataclass
class TuneRun:
    """What one ``tune`` call did."""

    results: list[CellResult] = field(default_factory=list)
    skipped: list[tuple[Shape, int]] = field(default_factory=list)  # already in the cache
    path: str = ""
    warm_s: float = 0.0
    measure_s: float = 0.0
    warm_failures: dict = field(default_factory=dict)


def _cached_cells(dev: DeviceId) -> set[str]:
    """Cells ``blockfp8 tune`` already measured for this key (online tuning measures backends only: not counted)."""
    found = tuning_cache.load(dev)
    cells = found.cells if found else {}
    return {key for key, rec in cells.items() if isinstance(rec, dict) and rec.get("source") == "tune"}


def tune(shapes: list[Shape], ms: list[int], device: torch.device, *, backends: list[str] | None = None,
         max_configs: int = 4, gluon_configs: int = 3, reps: int = 20, force: bool = False, warm_procs: int = 0,
         dev: DeviceId | None = None, on_plan: Callable[[int], None] = lambda total: None,
         on_cell: Callable[[str], None] = lambda s: None, on_bad: Callable[[Trial], None] = lambda t: None,
         measure: Callable[..., list[Trial]] = measure_cell) -> TuneRun:
    """Tune every (shape, M) cell not yet in this device's cache (all with ``force``), writing the cache after
    each shape. ``dev`` names the device for the cache (default: ``device``'s); ``on_plan`` hears how many cells
    will be measured, ``on_cell`` each cell as it starts; ``measure`` measures one cell (tests pass a fake)."""
    dev = dev or device_id(device)
    names = list(backends or backend_names())
    done = set() if force else _cached_cells(dev)
    run = TuneRun()
    plan: list[tuple[Shape, list[tuple[int, Problem, list[Candidate], Candidate | None]]]] = []
    for shape in shapes:
        cells = []
        for m in ms:
            if f"{shape.n},{shape.k},{m}" in done:
                run.skipped.append((shape, m))
                continue
            p = Problem(m, shape.n, shape.k, "cuda" if dev.arch else device.type, dev.arch, torch.bfloat16,
                        dev.name, dev.sms)
            try:
                default = current_candidate(p, device, dispatch.choose(p))
            except ValueError:
                default = None
            cells.append((m, p, cell_candidates(p, device, names, max_configs, gluon_configs), default))
        if cells:
            plan.append((shape, cells))
    on_plan(sum(len(cells) for _, cells in plan))
    t0 = time.perf_counter()
    if warm_procs > 0 and device.type == "cuda":
        jobs = [(m, shape.n, shape.k, cands) for shape, cells in plan for m, _, cands, _ in cells]
        procs = warm_process_count(jobs, warm_procs, torch.cuda.mem_get_info(device)[0])
        if procs:
            run.warm_failures = warm(jobs, procs)
    run.warm_s = time.perf_counter() - t0
    for shape, cells in plan:
        weights = make_weight_copies(shape.n, shape.k, device, factor=1)
        shape_results = []
        for m, _, cands, default in cells:
            on_cell(f"{shape.name} M={m}")
            shape_results.append(CellResult(shape.name, shape.n, shape.k, m, measure(weights, m, cands, reps, on_bad),
                                             default))
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
        run.path = str(_save(dev, shape_results))
        run.results += shape_results
    run.measure_s = time.perf_counter() - t0 - run.warm_s
    dispatch.clear_caches()
    return run


def _save(dev: DeviceId, results: list[CellResult]) -> object:
    tables: dict = {}
    cells = {}
    for r in results:
        rows, record = cell_rows(r)
        for kind, table in rows.items():
            for nk, by_m in table.items():
                tables.setdefault(kind, {}).setdefault(nk, {}).update(by_m)
        cells[f"{r.n},{r.k},{r.m}"] = record
    return tuning_cache.save(dev, tables, cells)


# ------------------------------------------------------------------------------------------------ warming


# What one warm-up process may need at its peak besides twice its operands: a CUDA context, the libraries'
# workspaces, the compilers' device allocations. Sixteen processes ran an 80 GB H100 out of memory (more than
# 4.9 GB each) and four did not: 8 GB keeps a margin above the failure.
WARM_PROCESS_BYTES = 8 << 30


def warm_process_count(jobs: list[tuple[int, int, int, list[Candidate]]], requested: int, free_bytes: int) -> int:
    """How many warm-up processes fit: at most ``requested`` and one per job, and no more than 80% of the device's
    free memory holds at ``WARM_PROCESS_BYTES`` plus twice the largest cell's operands each (every process may hold
    its biggest cell at once)."""
    if not jobs or requested <= 0:
        return 0
    largest = max(n * k + 4 * m * k + 4 * m * n for m, n, k, _ in jobs)  # fp8 weight, activation, fp32 output
    per_process = WARM_PROCESS_BYTES + 2 * largest
    return max(1, min(requested, len(jobs), int(0.8 * free_bytes) // per_process))


def _warm_job(job: tuple[int, int, int, list[Candidate]]) -> list[str]:
    """Run every candidate of one cell once on small operands (one weight copy): each kernel is compiled and
    kept in its library's disk cache. Returns the labels that failed (the timing pass reports why)."""
    m, n, k, candidates = job
    try:
        ops = make_operands(make_weight_copies(n, k, "cuda", copies=1), m)
    except torch.OutOfMemoryError:  # leave the cell to the timing pass, which runs alone
        return [c.label for c in candidates]
    failed = []
    for c in candidates:
        try:
            run_candidate(c, ops.x_fp8, ops.scales(get_backend(c.backend).scale_layout), *ops.weights[0])
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a failing candidate is reported by the timing pass
            failed.append(c.label)
    return failed


def warm(jobs: list[tuple[int, int, int, list[Candidate]]], procs: int) -> dict:
    """Compile every candidate of every cell in ``procs`` processes (spawned, each with its own CUDA context);
    returns {(m, n, k): labels that failed there}."""
    with mp.get_context("spawn").Pool(procs) as pool:
        failures = pool.map(_warm_job, jobs, chunksize=1)
    return {(m, n, k): f for (m, n, k, _), f in zip(jobs, failures, strict=True) if f}
