"""Measured tables: the layers and their order, the phase-aware row pick, the family and nearest-shape lookups,
and the exclusions the verification uses -- on fake devices."""

import json

import pytest

from blockfp8 import dispatch, tables, tuning_cache
from blockfp8.device import DeviceId
from blockfp8.testing.shapes import default_m_values

H100 = DeviceId("NVIDIA H100 80GB HBM3", (9, 0), 132)
SIBLING = DeviceId("Fake H200", (9, 0), 132)  # H100's family: same capability and SM count
PCIE = DeviceId("Fake H100 PCIe", (9, 0), 114)  # another family: fewer SMs


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(tuning_cache, "library_versions", lambda: {"driver": "1", "torch": "1"})
    dispatch.clear_caches()
    yield
    tables.exclude()
    dispatch.clear_caches()


def row(m, source="shipped"):
    return tables.Row([source], m, source, "test", "dev", 1, 1)


def test_pick_stays_in_the_phase():
    by_m = {16: row(16), 64: row(64), 512: row(512), 4096: row(4096)}
    assert tables.pick(by_m, 1).m == 16
    assert tables.pick(by_m, 17).m == 64
    assert tables.pick(by_m, 65).m == 512
    assert tables.pick(by_m, 9999).m == 4096  # beyond the largest measured M: the largest
    assert tables.pick({16: row(16)}, 100) is None  # a decode row never answers a prefill query
    assert tables.pick({4096: row(4096)}, 1) is None
    assert tables.pick({16: row(16)}, 64).m == 16  # the largest of the phase


def test_m_buckets_are_the_shipped_sweep():
    assert tables.M_BUCKETS == (1, 16, 64, 128, 512, 2048, 4096)
    assert list(tables.M_BUCKETS) == default_m_values()
    assert [tables.m_bucket(m) for m in (1, 2, 16, 17, 64, 65, 128, 129, 4096, 10000)] == \
        [1, 16, 16, 64, 64, 128, 128, 512, 4096, 4096]


def test_layers_merge_per_m_in_order(tmp_path, monkeypatch):
    nk = "2112,7168"
    shipped = tables.shipped("dispatch")[H100.name][nk]
    assert {"1", "16", "64", "4096"} <= set(shipped)
    tuning_cache.save(H100, {"dispatch": {nk: {"16": ["reference"], "64": ["reference"]}}})
    tables.record("dispatch", H100.name, 2112, 7168, 64, ["gluon", "reference"])
    override = tmp_path / "o.json"
    override.write_text(json.dumps({H100.name: {nk: {"64": ["deepgemm", "reference"]}}}))
    monkeypatch.setenv("BLOCKFP8_DISPATCH_TABLE", str(override))
    tables.invalidate()
    sources = {m: tables.lookup("dispatch", H100, 2112, 7168, m).source for m in (1, 16, 64, 4096)}
    assert sources == {1: "shipped", 16: "cache", 64: "override", 4096: "shipped"}
    tables.exclude(sources=("override",))
    assert tables.lookup("dispatch", H100, 2112, 7168, 64).value == ["gluon", "reference"]
    tables.exclude(sources=("override", "recorded"), shipped_of=(H100.name,))
    assert tables.lookup("dispatch", H100, 2112, 7168, 1).source == "cache"  # the cache's M=16 row: its bucket
    assert tables.lookup("dispatch", H100, 2112, 7168, 4096) is None  # no prefill row left
    tables.exclude(sources=("cache",))
    assert tables.lookup("dispatch", H100, 2112, 7168, 16).source == "shipped"
    with pytest.raises(ValueError, match="sources"):
        tables.exclude(sources=("nope",))


def test_family_is_capability_and_sm_count():
    assert H100.family == ((9, 0), 132) == SIBLING.family
    assert PCIE.family != H100.family and DeviceId("cpu").family is None
    assert tables.family_devices(SIBLING) == [H100]
    assert tables.family_devices(H100) == [] and tables.family_devices(PCIE) == []


def test_nearest_uses_the_family_and_stays_close():
    # The exact shape measured on a sibling (distance 0).
    found = tables.nearest("dispatch", SIBLING, 2112, 7168, 1)
    assert (found.device, found.n, found.k, found.m) == (H100.name, 2112, 7168, 1)
    # A shape within 2x in N and K: 2000 x 7000 is nearest to 2112 x 7168.
    found = tables.nearest("dispatch", SIBLING, 2000, 7000, 100)
    assert (found.n, found.k, found.m) == (2112, 7168, 128)
    # Nothing within 2x in both dimensions (4096 x 512's nearest, 32768 x 512, is 8x away in N).
    assert tables.nearest("dispatch", SIBLING, 4096, 256, 1) is None
    # Another family never borrows rows.
    assert tables.nearest("dispatch", PCIE, 2112, 7168, 1) is None
    # max_ratio=1: the exact shape only.
    assert tables.nearest("triton", SIBLING, 2112, 7168, 1, max_ratio=1.0).value["block_n"] == 64
    assert tables.nearest("triton", SIBLING, 2000, 7168, 1, max_ratio=1.0) is None
    # This device's own exact shape is lookup's answer, not nearest's.
    assert tables.nearest("dispatch", H100, 2112, 7168, 1, max_ratio=1.0) is None
    # K counts as much as N: 7168 x 18000 is nearer 7168 x 18432 than 7168 x 16384, and 7168 x 1000 is more than
    # 2x from 7168 x 2048 in K (no other row is within 2x in N).
    assert tables.nearest("dispatch", SIBLING, 7168, 18000, 1).k == 18432
    assert tables.nearest("dispatch", SIBLING, 7168, 1000, 1) is None


def test_nearest_prefers_the_own_device_on_a_tie():
    tables.record("dispatch", SIBLING.name, 2112, 7168, 1, ["reference", "triton"])
    # 2112 x 7168 is measured on both devices: from a shape near it, this device's row at the same distance wins
    # over the H100's.
    found = tables.nearest("dispatch", SIBLING, 2100, 7168, 1)
    assert (found.device, found.value) == (SIBLING.name, ["reference", "triton"])


def test_known_devices_name_every_shipped_device():
    for kind in tables.KINDS:
        assert set(tables.shipped(kind)) <= set(tables.known_devices())
