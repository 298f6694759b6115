"""The static rules and the family lookup as the dispatcher uses them, and the warning below sm_89 -- fake devices,
no GPU needed. The expected picks are the H100 measurements the rules were derived from (rules.py)."""

import warnings

import pytest

from blockfp8 import dispatch, rules, tuning_cache
from blockfp8.backends import Problem, Support, backend_names, get_backend

H100 = dict(device_type="cuda", arch=(9, 0), device_name="NVIDIA H100 80GB HBM3", sms=132)
NEW_HOPPER = dict(device_type="cuda", arch=(9, 0), device_name="Fake Hopper, H100's family", sms=132)
OTHER_HOPPER = dict(device_type="cuda", arch=(9, 0), device_name="Fake Hopper with 78 SMs", sms=78)
A100 = dict(device_type="cuda", arch=(8, 0), device_name="Fake A100")
RTX3090 = dict(device_type="cuda", arch=(8, 6), device_name="Fake RTX 3090")


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """Make exactly the named backends available (the reference always is)."""
    monkeypatch.setenv(tuning_cache.ENV_DIR, str(tmp_path))

    def install(*names):
        for name in backend_names():
            ok = name in names or name == "reference"
            monkeypatch.setattr(get_backend(name), "_availability", Support(ok, "" if ok else "not installed"))
        dispatch.clear_caches()

    yield install
    dispatch.clear_caches()


ALL = ("triton", "gluon", "cublas", "deepgemm")


def choose(m, n, k, dev):
    return dispatch.choose(Problem(m, n, k, **dev))


@pytest.mark.parametrize("m,n,k,rule,first", [
    (1, 2112, 7168, "decode-small-weight", "triton"),  # 15 MiB weight: split-K Triton 10.2 us vs DeepGEMM 14.1
    (16, 32768, 512, "decode-small-weight", "triton"),
    (1, 36864, 7168, "decode", "deepgemm"),  # 264 MiB: DeepGEMM 92.6 us vs Triton 98.4
    (64, 2112, 7168, "decode", "deepgemm"),  # M=64: DeepGEMM 9.7 us vs Triton 12.4
    (128, 36864, 7168, "prefill", "deepgemm"),
    (512, 36864, 7168, "prefill-large-weight", "cublas"),  # cuBLAS 219.7 us vs DeepGEMM 251.1
    (2048, 7168, 16384, "prefill-large-weight", "cublas"),
    (512, 2112, 7168, "prefill-deep-k", "deepgemm"),  # 15 MiB: DeepGEMM 14.8 us vs cuBLAS 22.7
    (4096, 36864, 7168, "prefill-deep-k", "deepgemm"),
    (512, 32768, 512, "prefill", "deepgemm"),
])
def test_rule_picks_on_a_new_hopper(installed, m, n, k, rule, first):
    installed(*ALL)
    p = Problem(m, n, k, **OTHER_HOPPER)  # no table row and no family: the rules decide
    assert rules.static_rule(p).name == rule
    assert choose(m, n, k, OTHER_HOPPER) == first
    assert dispatch.explain_problem(p).source.startswith(f"static rule {rule!r}")


def test_rules_when_peers_are_missing(installed):
    installed("triton", "gluon", "cublas")  # no DeepGEMM
    assert choose(64, 2112, 7168, OTHER_HOPPER) == "triton"
    assert choose(4096, 2112, 7168, OTHER_HOPPER) == "cublas"
    installed("triton", "gluon")  # neither peer: blockfp8's own kernels
    assert choose(512, 32768, 512, OTHER_HOPPER) == "triton"  # K=512: Triton 35.7 us vs Gluon 56.2
    assert choose(512, 7168, 16384, OTHER_HOPPER) == "gluon"  # long K: Gluon 124.5 us vs Triton 156.7


def test_every_rule_is_reachable_and_the_last_catches_all():
    names = [r.name for r in rules.RULES]
    assert len(set(names)) == len(names) and rules.RULES[-1].applies(Problem(1, 1, 1, **OTHER_HOPPER))
    seen = {rules.static_rule(Problem(m, n, k, **dev)).name
            for dev in (OTHER_HOPPER, A100, dict(device_type="cpu"))
            for m in (1, 16, 64, 128, 512, 4096) for n, k in ((2112, 7168), (36864, 7168), (32768, 512))}
    assert seen == set(names)


def test_a_new_device_of_the_h100_family_uses_the_h100_rows(installed):
    """Nearest-shape lookup within the family: the H100's measured ranking answers a sibling with no row."""
    installed(*ALL)
    p = Problem(1, 2112, 7168, **NEW_HOPPER)
    assert choose(1, 2112, 7168, NEW_HOPPER) == "triton"
    source = dispatch.explain_problem(p).source
    assert source.startswith("nearest measured shape: shipped row (NVIDIA H100 80GB HBM3, N=2112 K=7168, "
                             "measured at M=1)")
    # 2000 x 7000 is nobody's shape; 2112 x 7168 on the H100 is within 2x of it.
    assert "N=2112 K=7168, measured at M=128" in dispatch.explain_problem(Problem(100, 2000, 7000, **NEW_HOPPER)).source
    # A device of another family (78 SMs) does not borrow the H100's rows.
    assert dispatch.explain_problem(Problem(1, 2112, 7168, **OTHER_HOPPER)).source.startswith("static rule")


def test_below_sm89_warns_once_per_device(installed, monkeypatch):
    installed(*ALL)
    monkeypatch.setattr(dispatch, "_warned_devices", set())
    with pytest.warns(UserWarning, match=r"Fake A100 has compute capability 8\.0.*float32 reference") as seen:
        assert choose(1, 2112, 7168, A100) == "reference"
        assert choose(4096, 7168, 2048, A100) == "reference"  # same device: no second warning
    assert len([w for w in seen if "compute capability" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match="Fake RTX 3090 has compute capability 8.6"):
        assert choose(16, 4096, 4096, RTX3090) == "reference"
    ex = dispatch.explain_problem(Problem(1, 2112, 7168, **A100))
    assert ex.source.startswith("static rule 'no-fp8-tensor-cores'")
    assert "needs compute capability >= 8.9" in ex.verdicts["triton"].reason


def test_no_warning_on_fp8_gpus_or_cpu(installed, monkeypatch):
    installed(*ALL)
    monkeypatch.setattr(dispatch, "_warned_devices", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choose(1, 2112, 7168, H100)
        choose(1, 2112, 7168, dict(device_type="cpu", device_name="cpu"))
        dispatch.choose(Problem(1, 2112, 7168, **A100), backend="reference")  # forced: the user asked for it


@pytest.mark.parametrize("m,n,k,rule", [
    # Each boundary from both sides: M = 16 | 17, M = 64 | 65, M = 255 | 256, M = 2048 | 2049, K = 4095 | 4096.
    (16, 2112, 7168, "decode-small-weight"), (17, 2112, 7168, "decode"),
    (64, 36864, 7168, "decode"), (65, 36864, 7168, "prefill"),
    (255, 36864, 7168, "prefill"), (256, 36864, 7168, "prefill-large-weight"),
    (2048, 36864, 7168, "prefill-large-weight"), (2049, 36864, 7168, "prefill-deep-k"),
    (512, 2112, 4095, "prefill"), (512, 2112, 4096, "prefill-deep-k"),
    (511, 2112, 7168, "prefill"),  # the deep-K rule starts at M = 512
])
def test_rule_boundaries(m, n, k, rule):
    assert rules.static_rule(Problem(m, n, k, **OTHER_HOPPER)).name == rule
