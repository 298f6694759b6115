"""The per-device tuning cache: where it lives, what keys it, what a broken file does, and that the dispatcher
reads it with no setting -- on fake devices, no GPU needed."""

import json
import re
import sys
import warnings

import pytest

from blockfp8 import dispatch, tables, tuning_cache
from blockfp8.backends import Problem, Support, backend_names, get_backend
from blockfp8.device import DeviceId

GPU = DeviceId("Fake Hopper 141GB", (9, 0), 132)
VERSIONS = {"driver": "580.159.04", "cuda": "13.0", "blockfp8": "0.1.0", "torch": "2.11.0", "triton": "3.6.0",
            "deep_gemm": "2.8.2"}
ROW = {"dispatch": {"2112,7168": {"64": ["cublas", "triton"]}}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder, fixed software versions, and every backend available but the reference last."""
    monkeypatch.setenv(tuning_cache.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.setattr(tuning_cache, "library_versions", lambda: dict(VERSIONS))
    for name in backend_names():
        monkeypatch.setattr(get_backend(name), "_availability", Support(True))
    dispatch.clear_caches()
    yield tmp_path / "cache"
    dispatch.clear_caches()


def choose(m, n, k, dev=GPU):
    return dispatch.choose(Problem(m, n, k, "cuda", dev.arch, device_name=dev.name, sms=dev.sms))


def source(m, n, k, dev=GPU):
    return dispatch.explain_problem(Problem(m, n, k, "cuda", dev.arch, device_name=dev.name, sms=dev.sms)).source


def test_cache_dir_rules(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning_cache.ENV_DIR, str(tmp_path / "mine"))
    assert tuning_cache.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(tuning_cache.ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # not installed: the XDG rule
    assert tuning_cache.cache_dir() == tmp_path / "xdg" / "blockfp8"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning_cache.cache_dir() == tmp_path / "home" / ".cache" / "blockfp8"


def test_cache_dir_uses_platformdirs_when_installed(monkeypatch, tmp_path):
    # A stand-in module: the optional package is not installed on every test machine, and a skip would never run.
    import types

    platformdirs = types.ModuleType("platformdirs")
    platformdirs.user_cache_dir = lambda app, appauthor: str(tmp_path / f"pd-{app}-{appauthor}")
    monkeypatch.setitem(sys.modules, "platformdirs", platformdirs)
    monkeypatch.delenv(tuning_cache.ENV_DIR, raising=False)
    assert tuning_cache.cache_dir() == tmp_path / "pd-blockfp8-False"


def test_dispatcher_reads_the_cache_without_a_setting(cache):
    assert choose(64, 2112, 7168) == "deepgemm"  # static rule 'decode'
    path = tuning_cache.save(GPU, ROW)
    assert path.parent == cache and path.name.startswith("tuning-fake-hopper-141gb-")
    dispatch.clear_caches()
    assert choose(64, 2112, 7168) == "cublas"
    assert choose(17, 2112, 7168) == "cublas"  # the bucket M <= 64 of the decode phase
    assert choose(128, 2112, 7168) == "deepgemm"  # prefill: a decode row never answers
    assert source(64, 2112, 7168).startswith(f"cache row (Fake Hopper 141GB, N=2112 K=7168, measured at M=64) from "
                                             f"{path}")


@pytest.mark.parametrize("change", [
    {"device": "Other GPU"}, {"capability": (10, 0)}, {"sms": 114},
    {"driver": "575.51.03"}, {"cuda": "12.8"}, {"blockfp8": "0.2.0"}, {"torch": "2.12.0"}, {"triton": "3.7.0"},
    {"deep_gemm": None},
])
def test_another_device_or_version_never_reuses_rows(cache, monkeypatch, change):
    tuning_cache.save(GPU, ROW)
    dev = DeviceId(change.get("device", GPU.name), change.get("capability", GPU.arch), change.get("sms", GPU.sms))
    versions = {**VERSIONS, **{k: v for k, v in change.items() if k in VERSIONS}}
    monkeypatch.setattr(tuning_cache, "library_versions", lambda: versions)
    dispatch.clear_caches()
    assert tuning_cache.load(dev).tables["dispatch"] == {}
    assert choose(64, 2112, 7168, dev) != "cublas"
    # The same device and versions still find it.
    monkeypatch.setattr(tuning_cache, "library_versions", lambda: dict(VERSIONS))
    assert tuning_cache.load(GPU).tables["dispatch"] == ROW["dispatch"]


def _path():
    return tuning_cache.cache_path(tuning_cache.cache_key(GPU))


def _valid_file() -> dict:
    return {"schema": tuning_cache.SCHEMA, "key": tuning_cache.cache_key(GPU), "tables": ROW, "cells": {}}


BROKEN = {
    "truncated": lambda: json.dumps(_valid_file())[:40],
    "not json": lambda: "\x00\x01 not json",
    "a list": lambda: "[1, 2]",
    "stale schema": lambda: json.dumps({**_valid_file(), "schema": 0}),
    "another key": lambda: json.dumps({**_valid_file(), "key": {**tuning_cache.cache_key(GPU), "torch": "1.0"}}),
    "shape entry not an object": lambda: json.dumps({**_valid_file(), "tables": {"dispatch": {"2112,7168": [1]}}}),
    "tables not an object": lambda: json.dumps({**_valid_file(), "tables": []}),
    "deeply nested": lambda: '{"a":' * 100_000 + "1" + "}" * 100_000,  # RecursionError in the JSON parser
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_cache_file_is_ignored_with_a_warning(cache, kind):
    path = _path()
    path.parent.mkdir(parents=True)
    path.write_text(BROKEN[kind]())
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        assert choose(64, 2112, 7168) == "deepgemm"  # the static rule: never a crash
    # The next save replaces the broken file with a valid one (and says what it replaced).
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        tuning_cache.save(GPU, ROW)
    dispatch.clear_caches()
    assert choose(64, 2112, 7168) == "cublas"


def test_valid_file_loads_without_warning(cache, recwarn):
    path = _path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_valid_file()))
    assert choose(64, 2112, 7168) == "cublas"
    assert not [w for w in recwarn if "tuning cache" in str(w.message)]


def test_save_merges_and_checks_rows(cache):
    tuning_cache.save(GPU, ROW, {"2112,7168,64": {"source": "tune"}})
    config = {"block_m": 16, "block_n": 64}
    tuning_cache.save(GPU, {"dispatch": {"2112,7168": {"1": ["triton"]}}, "triton": {"2112,7168": {"1": config}}})
    found = tuning_cache.load(GPU)
    assert found.tables["dispatch"]["2112,7168"] == {"64": ["cublas", "triton"], "1": ["triton"]}
    assert found.tables["triton"] == {"2112,7168": {"1": {"block_m": 16, "block_n": 64}}}
    assert "2112,7168,64" in found.cells
    assert not list(cache.glob(".*tmp"))  # the temporary file of the atomic write is gone
    with pytest.raises(ValueError, match="malformed"):
        tuning_cache.save(GPU, {"dispatch": {"2112,7168": {"64": "cublas"}}})
    with pytest.raises(ValueError, match="split_k=0"):
        tuning_cache.save(GPU, {"triton": {"2112,7168": {"1": {"block_m": 16, "block_n": 64, "split_k": 0}}}})
    with pytest.raises(ValueError, match="kind"):
        tuning_cache.save(GPU, {"nope": {}})
    with pytest.raises(ValueError, match="only CUDA devices"):
        tuning_cache.save(DeviceId("cpu"), ROW)
    assert tuning_cache.load(DeviceId("cpu")) is None


def test_cache_row_naming_a_refusing_backend_is_skipped(cache):
    """N=130 breaks DeepGEMM's N % 8 and cuBLAS's N % 16: a cache row that ranks them first falls to the next."""
    tuning_cache.save(GPU, {"dispatch": {"130,1024": {"16": ["deepgemm", "cublas", "triton"]}}})
    dispatch.clear_caches()
    assert choose(16, 130, 1024) == "triton"
    assert source(16, 130, 1024).startswith("cache row")


def test_override_table_is_merged_over_the_cache(cache, tmp_path, monkeypatch):
    tuning_cache.save(GPU, {"dispatch": {"2112,7168": {"64": ["cublas"], "4096": ["cublas"]}}})
    override = tmp_path / "override.json"
    override.write_text(json.dumps({GPU.name: {"2112,7168": {"64": ["triton"]}}}))
    monkeypatch.setenv(dispatch.ENV_TABLE, str(override))
    dispatch.clear_caches()
    assert choose(64, 2112, 7168) == "triton" and source(64, 2112, 7168).startswith("override row")
    assert choose(4096, 2112, 7168) == "cublas"  # the cache's other rows stay
    override.write_text("{broken")
    dispatch.clear_caches()
    with pytest.raises(ValueError, match="BLOCKFP8_DISPATCH_TABLE"):
        choose(64, 2112, 7168)


def test_driver_version_parsing(monkeypatch, tmp_path):
    fake = tmp_path / "version"
    fake.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build\n")
    real_path = tuning_cache.Path

    monkeypatch.setattr(tuning_cache, "Path", lambda p: fake if p == "/proc/driver/nvidia/version" else real_path(p))
    assert tuning_cache.driver_version() == "580.159.04"
    fake.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n")
    assert tuning_cache.driver_version() == "550.54.15"


def test_shipped_rows_still_answer_for_their_device(cache):
    h100 = tables.known_devices()["NVIDIA H100 80GB HBM3"]
    assert choose(1, 2112, 7168, h100) == "triton"
    assert source(1, 2112, 7168, h100).startswith("shipped row (NVIDIA H100 80GB HBM3")


_TRITON = {"block_m": 16, "block_n": 64, "split_k": 4, "group_m": 1, "swap_ab": True, "num_warps": 4,
           "num_stages": 6, "tma": True}
BAD_ROWS = {
    "ranking not a list": ("dispatch", "2112,7168", "16", "cublas"),
    "shape key not N,K": ("dispatch", "2112x7168", "64", ["cublas"]),
    "zero-sized shape": ("dispatch", "0,128", "64", ["cublas"]),  # was a ZeroDivisionError for every other shape
    "M of zero": ("dispatch", "2112,7168", "0", ["cublas"]),
    "unknown backend": ("dispatch", "2112,7168", "16", ["fastest"]),
    "split_k of zero": ("triton", "2112,7168", "1", {**_TRITON, "split_k": 0}),  # launched nothing: garbage out
    "unknown config field": ("triton", "2112,7168", "1", {**_TRITON, "bogus": 1}),
    "a bool for a size": ("triton", "2112,7168", "1", {**_TRITON, "block_m": True}),
    "a size for a flag": ("triton", "2112,7168", "1", {**_TRITON, "tma": 1}),
    "gluon tile the kernel lacks": ("gluon", "2112,7168", "1", {"block_m": 32}),
    "gluon ring of one slot": ("gluon", "2112,7168", "1", {"stages": 1}),  # would hang the GPU, not fail
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_is_skipped_with_one_warning_and_the_file_still_serves(cache, case):
    kind, nk, m, value = BAD_ROWS[case]
    good = {"dispatch": ["cublas", "triton"], "triton": {"block_m": 16, "block_n": 64}, "gluon": {"block_m": 64}}[kind]
    data = _valid_file()
    data["tables"] = {"dispatch": {"2112,7168": {"64": ["cublas", "triton"]}}, "triton": {}, "gluon": {}}
    data["tables"][kind].setdefault("2112,7168", {}).setdefault("64", good)
    data["tables"][kind].setdefault(nk, {})[m] = value
    path = _path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match=rf"skipping the {kind} row .*M={m} from {re.escape(str(path))}: "):
        rows = tables.device_rows(kind, GPU)
    assert int(m) not in rows.get((2112, 7168), {}) or nk != "2112,7168"  # never used
    assert rows[(2112, 7168)][64].value == good  # the file's good rows still serve
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every lookup
        tables.device_rows.cache_clear()
        tables.device_rows(kind, GPU)
        assert choose(64, 2112, 7168) == "cublas"
        choose(64, 4096, 4096)  # a shape without a row of its own looks at the nearest ones: no crash


def test_config_fields_are_the_kernels_fields():
    from dataclasses import fields

    from blockfp8.backends.triton.configs import TritonConfig

    assert set(tuning_cache.CONFIG_FIELDS["triton"]) == {f.name for f in fields(TritonConfig)}
    gluon = pytest.importorskip("blockfp8.backends.gluon")
    assert set(tuning_cache.CONFIG_FIELDS["gluon"]) == {f.name for f in fields(gluon.GluonConfig)}


@pytest.mark.parametrize("kind", ["dispatch", "triton", "gluon"])
def test_every_shipped_row_is_valid(kind):
    for device, table in tables.shipped(kind).items():
        assert tuning_cache.table_problem(kind, table) is None, device


def test_written_tables_get_the_usual_mode_and_keep_theirs(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        new = tmp_path / "new.json"
        tuning_cache.write_atomic(new, "{}\n")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # not the temporary file's private 0600
        kept = tmp_path / "kept.json"
        kept.write_text("{}\n")
        kept.chmod(0o640)
        tuning_cache.write_atomic(kept, "{}\n")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def _save_rows(worker: int, count: int) -> None:
    for i in range(count):
        tuning_cache.save(GPU, {"dispatch": {f"{worker + 1},{i + 1}": {"1": ["triton"]}}})


def test_processes_saving_at_once_keep_every_row(cache):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # the children keep this test's cache folder and versions
    procs = [ctx.Process(target=_save_rows, args=(w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(tuning_cache.load(GPU).tables["dispatch"]) == 4 * 60


def test_write_atomic_replaces_the_file_rather_than_writing_into_it(tmp_path):
    import os

    path = tmp_path / "t.json"
    path.write_text("old\n")
    os.link(path, tmp_path / "reader.json")  # a reader that opened the old file keeps the old bytes, whole
    tuning_cache.write_atomic(path, "new\n")
    assert path.read_text() == "new\n" and (tmp_path / "reader.json").read_text() == "old\n"


def test_the_key_holds_every_version_and_the_file_name_its_hash():
    versions = tuning_cache.library_versions.__wrapped__()  # not the fixture's fixed versions
    assert {"driver", "cuda", "blockfp8", "torch", "triton", "deep_gemm"} <= set(versions)
    key = tuning_cache.cache_key(GPU)
    assert tuning_cache.cache_path(key) != tuning_cache.cache_path({**key, "triton": "0.0"})
    assert tuning_cache.cache_path(key).name.startswith("tuning-fake-hopper-141gb-")
