import dataclasses
from pathlib import Path

import numpy as np
import pytest

from freeal_stream.config import FreeALConfig, SLMConfig
from freeal_stream.slm.encoder import EmbeddingCache, EncoderNotFound, resolve_encoder
from freeal_stream.slm.model import SLM
from freeal_stream.slm.trainer import (
    LONG_WARMUP,
    LONG_WARMUP_MIN_LABELS,
    SHORT_WARMUP,
    Recipe,
    resolve_mode,
    resolve_warmup,
    train_slm,
)

FOOD = ["chef", "baked", "bread", "garlic", "soup", "recipe", "oven", "butter", "pasta", "kitchen", "spicy", "dinner"]
SPORT = [
    "striker",
    "scored",
    "goal",
    "match",
    "referee",
    "stadium",
    "league",
    "coach",
    "team",
    "season",
    "tackle",
    "penalty",
]


def make_texts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Two classes with disjoint vocabularies: any sane SLM separates them."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    texts = [" ".join(rng.choice(SPORT if c else FOOD, size=6, replace=False)) for c in y]
    return texts, y


HEAD = SLMConfig(mode="head", epochs=4, batch_size=16, head_hidden=64)
FREEAL = FreeALConfig(warmup_epochs=1, rampup_epochs=2)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("emb-cache")


@pytest.fixture(scope="module")
def noisy_run(cache_dir):
    texts, gold = make_texts(120, seed=0)
    flipped = np.random.default_rng(1).permutation(120)[:24]
    noisy = gold.copy()
    noisy[flipped] = 1 - noisy[flipped]
    result = train_slm(texts, noisy, 2, HEAD, FREEAL, seed=0, cache_dir=cache_dir)
    return texts, gold, flipped, result


def test_head_mode_learns_through_label_noise_and_flags_flipped_rows(noisy_run):
    texts, gold, flipped, result = noisy_run
    assert result.mode == "head"
    assert (result.probs.argmax(1) == gold).mean() >= 0.95
    caught = (~result.clean[flipped]).mean()
    assert caught >= 0.8, f"GMM kept {(result.clean[flipped]).sum()} of {len(flipped)} flipped rows as clean"
    is_flipped = np.zeros(len(texts), dtype=bool)
    is_flipped[flipped] = True
    assert (~is_flipped[result.clean]).mean() >= 0.95
    assert len(result.history) == HEAD.epochs
    assert {
        "epoch",
        "alpha",
        "loss",
        "l_clean",
        "l_cr_l",
        "l_cr_u",
        "l_mix",
        "n_clean",
        "seconds",
        "samples_per_s",
    } <= set(result.history[-1])
    assert result.history[0]["alpha"] == 0 and result.history[-1]["alpha"] == 1


def test_outputs_shapes_and_normalised_embeddings(noisy_run):
    texts, _, _, result = noisy_run
    assert result.probs.shape == (len(texts), 2)
    assert np.allclose(result.probs.sum(1), 1, atol=1e-5)
    assert result.embeddings.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(result.embeddings, axis=1), 1, atol=1e-4)
    assert np.isfinite(result.losses).all()


def test_rows_without_label_stay_out_of_supervised_terms(cache_dir):
    texts, gold = make_texts(60, seed=2)
    labels = np.full(60, -1)
    labels[:6] = gold[:6]
    result = train_slm(texts, labels, 2, HEAD, FREEAL, seed=0, cache_dir=cache_dir)
    assert all(h["n_clean"] <= 6 for h in result.history)
    assert all(h["n_pool"] >= 54 for h in result.history)
    assert np.isnan(result.losses[6:]).all() and np.isfinite(result.losses[:6]).all()
    assert not result.clean[6:].any()


def test_plain_ce_recipe_has_no_auxiliary_terms(cache_dir):
    texts, gold = make_texts(40, seed=3)
    result = train_slm(texts, gold, 2, HEAD, FREEAL, recipe=Recipe.plain_ce(), seed=0, cache_dir=cache_dir)
    assert all(h["alpha"] == 0 and h["l_mix"] == 0 and h["n_clean"] == 40 for h in result.history)
    assert result.clean.all()


def test_supplied_views_are_embedded_once_through_the_cache(tmp_path):
    texts, gold = make_texts(30, seed=4)
    views = [t.upper() for t in texts]
    train_slm(texts, gold, 2, dataclasses.replace(HEAD, epochs=1), FREEAL, views=views, cache_dir=tmp_path)
    cached = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(cached) == 1 and len(list(cached[0].glob("chunk-*.keys"))) == 2


def test_embedding_cache_computes_each_text_once(tmp_path):
    calls: list[list[str]] = []

    def compute(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)

    cache = EmbeddingCache(tmp_path, "enc|max_length=8")
    first = cache.get(["a", "bb", "a"], compute)
    assert calls == [["a", "bb"]] and first[:, 0].tolist() == [1, 2, 1]
    again = EmbeddingCache(tmp_path, "enc|max_length=8").get(["bb", "ccc"], compute)
    assert calls[1] == ["ccc"] and again[:, 0].tolist() == [2, 3]
    assert len(EmbeddingCache(tmp_path, "enc|max_length=16")) == 0


def test_save_load_round_trip_gives_identical_predictions(noisy_run, tmp_path):
    texts, _, _, result = noisy_run
    result.model.save(tmp_path / "slm")
    loaded = SLM.load(tmp_path / "slm")
    assert np.array_equal(loaded.predict_proba(texts[:10]), result.model.predict_proba(texts[:10]))
    assert np.allclose(loaded.predict_proba(texts[:10]), result.probs[:10], atol=1e-5)


def test_finetune_smoke_runs_the_full_recipe(tmp_path):
    texts, gold = make_texts(40, seed=5)
    labels = gold.copy()
    labels[:4] = -1
    cfg = SLMConfig(mode="finetune", epochs=1, batch_size=8, max_length=16)
    result = train_slm(texts, labels, 2, cfg, FreeALConfig(warmup_epochs=0, rampup_epochs=0), seed=0)
    assert result.mode == "finetune" and result.history[0]["alpha"] == 1.0
    assert result.history[0]["l_cr_u"] > 0 and result.history[0]["l_mix"] > 0
    assert result.probs.shape == (40, 2) and np.isnan(result.losses[:4]).all()
    result.model.save(tmp_path / "ft")
    assert np.allclose(SLM.load(tmp_path / "ft").predict_proba(texts[:5]), result.probs[:5], atol=1e-5)


def test_resolve_mode():
    auto = SLMConfig(mode="auto", finetune_max_items=100, finetune_min_labels=10)
    assert resolve_mode(auto, 100, 10) == "finetune"
    assert resolve_mode(auto, 101, 50) == "head"  # too many texts to fine-tune on
    assert resolve_mode(auto, 100, 9) == "head"  # too few labels for fine-tuning to pay
    assert resolve_mode(SLMConfig(mode="head"), 5, 5) == "head"
    assert resolve_mode(SLMConfig(mode="finetune"), 10**9, 0) == "finetune"


def test_resolve_warmup():
    auto = FreeALConfig()
    assert auto.warmup_epochs is None
    assert resolve_warmup(auto, LONG_WARMUP_MIN_LABELS - 1, 4) == SHORT_WARMUP == 1  # few labels: split early
    assert resolve_warmup(auto, LONG_WARMUP_MIN_LABELS, 4) == LONG_WARMUP == 3
    assert resolve_warmup(auto, LONG_WARMUP_MIN_LABELS, 3) == 2  # one epoch stays for the recipe
    assert resolve_warmup(auto, LONG_WARMUP_MIN_LABELS, 1) == 1  # (with one epoch there is nothing to leave)
    assert resolve_warmup(FreeALConfig(warmup_epochs=0), 10**6, 4) == 0  # a configured value always wins
    assert resolve_warmup(FreeALConfig(warmup_epochs=5), 5, 4) == 5


def test_training_follows_the_warmup_chosen_by_label_count(cache_dir, monkeypatch):
    texts, gold = make_texts(120, seed=0)
    monkeypatch.setattr("freeal_stream.slm.trainer.LONG_WARMUP_MIN_LABELS", 100)
    auto = FreeALConfig(rampup_epochs=2)
    many = train_slm(texts, gold, 2, HEAD, auto, seed=0, cache_dir=cache_dir)
    gold_few = np.where(np.arange(120) < 60, gold, -1)
    few = train_slm(texts, gold_few, 2, HEAD, auto, seed=0, cache_dir=cache_dir)
    assert [h["alpha"] for h in many.history] == [0, 0, 0, 0.5]  # 120 labels: 3 warm-up epochs
    assert [h["alpha"] for h in few.history] == [0, 0.5, 1, 1]  # 60 labels: 1
    assert many.history[2]["n_clean"] == 120 and many.history[3]["n_clean"] < 120  # the split starts after


def test_rows_without_a_supplied_view_get_model_free_noise(cache_dir, monkeypatch):
    """A view column with gaps: rows that have a view use it, the others fall back to perturbation."""
    import freeal_stream.slm.trainer as trainer

    texts, gold = make_texts(40, seed=3)
    views = [t.upper() if i % 2 else None for i, t in enumerate(texts)]
    seen = []
    real_noise = trainer.feature_noise
    monkeypatch.setattr(trainer, "feature_noise", lambda emb: seen.append(len(emb)) or real_noise(emb))
    result = train_slm(texts, gold, 2, HEAD, FREEAL, views=views, seed=0, cache_dir=cache_dir)
    assert seen and (result.probs.argmax(1) == gold).mean() >= 0.9
    ft = dataclasses.replace(HEAD, mode="finetune", epochs=2, max_length=16)
    perturbed = []
    real_perturb = trainer.perturb
    monkeypatch.setattr(trainer, "perturb", lambda t, rng: perturbed.append(t) or real_perturb(t, rng))
    train_slm(texts, gold, 2, ft, FREEAL, views=views, seed=0)
    assert perturbed and set(perturbed) <= {t for i, t in enumerate(texts) if i % 2 == 0}


def test_encoder_resolution():
    assert (resolve_encoder("all-MiniLM-L6-v2") / "config.json").is_file()
    assert resolve_encoder("sentence-transformers/all-MiniLM-L6-v2") == resolve_encoder("all-MiniLM-L6-v2")
    with pytest.raises(EncoderNotFound, match="never downloads.*huggingface-cli download no-such-org/no-model"):
        resolve_encoder("no-such-org/no-model")


def test_encoder_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderNotFound, match="no config.json"):
        resolve_encoder(str(tmp_path))


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="labels must be in"):
        train_slm(["a", "b"], np.array([0, 2]), 2, HEAD, FREEAL)
    with pytest.raises(ValueError, match="3 texts but 2 views"):
        train_slm(["a", "b", "c"], np.array([0, 1, 0]), 2, HEAD, FREEAL, views=["x", "y"])


def test_no_labelled_rows_is_reported_not_fatal(cache_dir):
    messages: list[str] = []
    texts, _ = make_texts(12, seed=6)
    result = train_slm(texts, np.full(12, -1), 2, HEAD, FREEAL, cache_dir=cache_dir, progress=messages.append)
    assert any("no labelled rows" in m for m in messages)
    assert result.probs.shape == (12, 2) and np.isnan(result.losses).all() and not result.clean.any()
    assert all(h["rows"] == 0 for h in result.history)
