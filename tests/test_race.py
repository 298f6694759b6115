"""Telling close candidates apart: ``timer.race`` times candidates interleaved round by round (wall clock on the
CPU, CUDA graphs on a GPU), ``autotune.faster`` decides from paired rounds whether one beats another for sure,
and ``choose_trial`` keeps what runs now unless a candidate does -- so two tune runs agree."""

from __future__ import annotations

import time

import pytest
import torch

from blockfp8.autotune import STICKY_MARGIN, Trial, choose_trial, faster, tune_cell
from blockfp8.backends.triton.configs import TritonConfig
from blockfp8.testing.tuning import Candidate, CellResult, cell_rows
from blockfp8.timer import race


def test_constants():
    assert STICKY_MARGIN == 0.01


def test_race_gives_every_candidate_one_sample_per_round_and_keeps_failures_apart():
    calls = []

    def quick(x):
        calls.append("quick")

    def slow(x):
        calls.append("slow")
        time.sleep(0.002)

    def broken(x):
        raise RuntimeError("no kernel image")

    out = race([quick, broken, slow], rotate=[(torch.zeros(1),), (torch.zeros(1),)], rounds=6, warmup=0)
    assert isinstance(out[1], RuntimeError)
    assert len(out[0]) == len(out[2]) == 6
    assert min(out[2]) > 900 > max(out[0])  # per call: 2 ms asleep against nothing
    # Two calls per round (one per argument set) after one untimed pass each, interleaved in shuffled orders.
    timed = calls[4:]
    assert timed.count("quick") == timed.count("slow") == 12
    firsts = {timed[i] for i in range(0, len(timed), 4)}
    assert firsts == {"quick", "slow"}  # seed 0 puts each first in some round


def test_race_refuses_no_rounds():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        race([lambda: None], rotate=[()], rounds=0)


def _t(name, samples=None, us=None):
    us = us if us is not None else sorted(samples)[len(samples) // 2]
    return Trial(name, "ok", 1e-3, us, samples=samples)


def test_faster_needs_the_margin_and_enough_rounds():
    base = [10.0 + 0.3 * ((i * 7) % 5) for i in range(20)]  # drift shared by both, round by round
    clear = _t("clear", [b * 0.97 for b in base])
    assert faster(clear, _t("base", base))
    small = _t("small", [b * 0.995 for b in base])  # wins every round, but by less than the margin
    assert not faster(small, _t("base", base))
    # 3% faster at the median but winning only 12 rounds of 20: chance is not ruled out.
    mixed = _t("mixed", [b * 0.97 if i < 12 else b * 1.05 for i, b in enumerate(base)])
    assert not faster(mixed, _t("base", base))
    assert not faster(_t("base", base), clear)
    # Timed one by one (no samples): the medians and the margin decide.
    assert faster(_t("a", us=9.8), _t("b", us=10.0)) and not faster(_t("a", us=9.95), _t("b", us=10.0))


def test_choose_trial_keeps_what_runs_now_unless_beaten_for_sure():
    base = [10.0 + 0.1 * (i % 3) for i in range(20)]
    now = _t("now", base)
    close = _t("close", [b - 0.05 for b in base])
    assert choose_trial([close, now], "now") is now
    clear = _t("clear", [b * 0.9 for b in base])
    assert choose_trial([close, now, clear], "now") is clear
    assert choose_trial([close, now], None) is close  # nothing runs now: the fastest
    wrong_now = Trial("now", "wrong", 0.5)
    assert choose_trial([close, wrong_now], "now") is close
    assert choose_trial([Trial("x", "crashed")], "x") is None


def test_tune_cell_races_only_the_correct_candidates():
    raced, bad = [], []

    def check(c):
        if c == "raises":
            raise RuntimeError("out of resources")
        return 0.5 if c == "wrong" else 1e-3

    def run_race(configs):
        raced.extend(configs)
        return [[5.0, 6.0, 7.0] if c == "ok" else ValueError("capture failed") for c in configs]

    trials = tune_cell(["ok", "wrong", "raises", "dies"], check, on_bad=bad.append, race=run_race)
    assert raced == ["ok", "dies"]
    by = {t.config: t for t in trials}
    assert by["ok"].us == 6.0 and by["ok"].samples == [5.0, 6.0, 7.0]
    assert by["dies"].status == "crashed" and by["dies"].reason == "ValueError: capture failed"
    assert [t.config for t in bad] == ["wrong", "raises", "dies"]


def test_cell_rows_keep_the_dispatchers_choice_when_no_candidate_beats_it():
    now_cfg, other_cfg = TritonConfig(16, 64, 4, 1, True, 4, 4, True), TritonConfig(64, 128)
    base = [10.0 + 0.2 * (i % 4) for i in range(20)]
    now = Candidate("triton", now_cfg)
    trials = [Trial(now, "ok", 1e-3, 10.2, samples=base),
              Trial(Candidate("deepgemm"), "ok", 1e-3, 10.15, samples=[b - 0.05 for b in base]),
              Trial(Candidate("triton", other_cfg), "ok", 1e-3, 10.1, samples=[b - 0.08 for b in base])]
    r = CellResult("o_proj", 4096, 4096, 1, trials, now)
    tables, record = cell_rows(r)
    assert tables["dispatch"] == {"4096,4096": {"1": ["triton", "deepgemm"]}}
    assert tables["triton"] == {"4096,4096": {"1": now_cfg.to_json()}}
    assert record["best"] == now.label and record["fastest"] == Candidate("triton", other_cfg).label
    assert record["rounds"] == 20
    # A candidate faster for sure replaces it.
    trials.append(Trial(Candidate("deepgemm", None), "ok", 1e-3, 9.0, samples=[b * 0.9 for b in base]))
    r = CellResult("o_proj", 4096, 4096, 1, trials[1:] + [trials[0]], now)
    tables, record = cell_rows(r)
    assert tables["dispatch"]["4096,4096"]["1"][0] == "deepgemm"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_race_on_the_gpu_replays_graphs_l2_cold_and_orders_a_clear_difference():
    small = [(torch.empty(8 << 20, dtype=torch.uint8, device="cuda"),) for _ in range(4)]
    dst = torch.empty(16 << 20, dtype=torch.uint8, device="cuda")

    def copy_once(src):
        dst[: src.numel()].copy_(src)

    def copy_twice(src):
        dst[: src.numel()].copy_(src)
        dst[src.numel():].copy_(src)

    # A candidate that synchronizes cannot be captured: it is timed from eager launches instead.
    once, twice, syncing = race([copy_once, copy_twice, lambda src: src[:1].sum().item()], rotate=small,
                                rounds=20)
    assert len(once) == len(twice) == len(syncing) == 20
    a, b = _t("once", once), _t("twice", twice)
    assert faster(a, b) and not faster(b, a)
