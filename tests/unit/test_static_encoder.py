"""The static encoder (`minilm-static`, distilled once from the bundled MiniLM) and `slm.encoder: auto`.

One distillation (~30-60 s on 2 cores) serves the whole module: it goes to a temporary model cache that
every test here (and the Ray workers of the integration tests) reads through $FREEAL_MODEL_CACHE.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import ray

from freeal_stream.config import ConfigError, SLMConfig, parse_job
from freeal_stream.rounds.pool import embedding_space
from freeal_stream.slm import static_encoder
from freeal_stream.slm.encoder import DEFAULT_ENCODER, cache_key, choose_encoder
from freeal_stream.slm.model import SLM
from freeal_stream.slm.static_encoder import StaticEncoder, recipe_key, static_model_dir
from freeal_stream.slm.trainer import resolve_mode, train_slm
from freeal_stream.testing.local_ray import local_ray
from tests.unit.test_slm_trainer import FREEAL, HEAD, make_texts

STATIC = "minilm-static"


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """(model cache, network connections attempted while distilling): distilled once, with every socket
    connection refused and recorded, so the distillation provably needs no network."""
    cache = tmp_path_factory.mktemp("models")
    attempts: list[object] = []

    def refuse(_sock, address, *_a):
        attempts.append(address)
        raise OSError("network use in a test that must run offline")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        folder = static_model_dir(cache)
    return cache, folder, attempts


@pytest.fixture
def model_cache(distilled, monkeypatch):
    monkeypatch.setenv("FREEAL_MODEL_CACHE", str(distilled[0]))
    return distilled[0]


@pytest.fixture(scope="module")
def encoder(distilled) -> StaticEncoder:
    return StaticEncoder(max_length=64, cache_dir=distilled[0])


def test_distils_offline_into_the_cache_atomically_and_reuses_it(distilled, monkeypatch):
    cache, folder, attempts = distilled
    assert attempts == []
    assert folder == cache / f"{STATIC}-{recipe_key()}" and (folder / "model.safetensors").is_file()
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temporary folder left behind

    def no_second_distillation(_out):
        raise AssertionError("distilled again although the cache has the model")

    monkeypatch.setattr(static_encoder, "_distill", no_second_distillation)
    assert static_model_dir(cache) == folder


def test_a_lost_race_uses_the_copy_renamed_first(distilled, tmp_path, monkeypatch):
    """Two processes distilling at once: the one whose rename fails takes the other's model, leaves no temp."""
    target = tmp_path / f"{STATIC}-{recipe_key()}"

    def distil_while_another_process_wins(out: Path) -> None:
        (out / "mine").write_text("x")
        target.mkdir()
        (target / "theirs").write_text("x")

    monkeypatch.setattr(static_encoder, "_distill", distil_while_another_process_wins)
    assert static_model_dir(tmp_path) == target
    assert [p.name for p in tmp_path.iterdir()] == [target.name] and (target / "theirs").exists()


def test_embeddings_are_normalised_float32_of_the_models_width(encoder):
    emb = encoder.embed(["a gripping, well acted thriller", "dull and far too long", "ok"])
    assert emb.shape == (3, 256) and emb.dtype == np.float32 and encoder.dim == 256
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert not encoder.embed([""]).any()  # no known token: zeros, not NaN


def test_a_text_is_the_mean_of_its_own_token_vectors_whatever_its_batch(encoder):
    """MiniLM's tokenizer pads to 128 tokens; the [PAD]s must not join the mean, nor the batch change a text."""
    text = "a great film"
    ids = encoder.model.tokenize([text])[0]
    assert 0 < len(ids) <= 5
    mean = encoder.vectors[ids].mean(0).numpy()
    alone = encoder.embed([text])[0]
    assert np.allclose(alone, mean / np.linalg.norm(mean), atol=1e-6)
    batched = encoder.embed(["word " * 200, text, "another one"], batch_size=2)[1]
    assert np.array_equal(alone, batched)


def test_only_the_first_max_length_tokens_count(encoder):
    words = [f"w{i}" for i in range(300)]
    short = encoder.embed([" ".join(words[:64])])
    assert np.allclose(encoder.embed([" ".join(words)]), short, atol=1e-6)


def test_embeddings_are_deterministic_across_loads(distilled, encoder):
    texts, _ = make_texts(50, seed=7)
    again = StaticEncoder(max_length=64, cache_dir=distilled[0])
    assert np.array_equal(encoder.embed(texts), again.embed(texts[::-1])[::-1])


def test_cache_key_names_the_recipe_and_max_length(distilled):
    key = cache_key(STATIC, 64)
    assert key == f"{STATIC}-{recipe_key()}|max_length=64"
    assert key != cache_key(STATIC, 32) and key != cache_key(DEFAULT_ENCODER, 64)


def test_head_mode_trains_on_the_static_encoder_and_survives_save_load(model_cache, tmp_path):
    texts, gold = make_texts(120, seed=0)
    cfg = dataclasses.replace(HEAD, encoder=STATIC, mode="auto")  # auto: head, the only mode it has
    result = train_slm(texts, gold, 2, cfg, FREEAL, seed=0, cache_dir=tmp_path / "emb")
    assert result.mode == "head" and result.embeddings.shape == (120, 256)
    assert (result.probs.argmax(1) == gold).mean() >= 0.95
    assert [d.name.split("-")[:2] for d in (tmp_path / "emb").iterdir()] == [["minilm", "static"]]
    loaded = SLM.load(result.model.save(tmp_path / "slm"))
    assert loaded.encoder.name == STATIC
    assert np.allclose(loaded.predict_proba(texts[:10]), result.probs[:10], atol=1e-5)


def test_fine_tuning_a_static_encoder_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="nothing to fine-tune: train it in head mode"):
        SLM(STATIC, "finetune", 2, 64, 0)
    job = {
        "name": "t",
        "data": {"path": "x.csv"},
        "task": {"description": "d", "classes": {"a": ["a"], "b": ["b"]}},
        "slm": {"encoder": STATIC, "mode": "finetune"},
    }
    with pytest.raises(ConfigError, match="field 'slm.encoder'.*nothing to fine-tune; use mode head"):
        parse_job(job, tmp_path / "job.yaml")


def test_auto_takes_minilm_up_to_the_threshold_and_the_static_encoder_above():
    cfg = SLMConfig(encoder="auto", static_above_items=1000)
    small, big = choose_encoder(cfg, 1000), choose_encoder(cfg, 1001)
    assert small.name == DEFAULT_ENCODER and "a pool of 1,000 texts <= slm.static_above_items 1,000" in small.why
    assert big.name == STATIC and "a pool of 1,001 texts > slm.static_above_items 1,000" in big.why
    assert choose_encoder(dataclasses.replace(cfg, mode="finetune"), 10**6).name == DEFAULT_ENCODER
    assert choose_encoder(SLMConfig(encoder="my/local-model"), 10**6).name == "my/local-model"
    assert resolve_mode(SLMConfig(encoder=STATIC), 100, 5000) == "head"


def test_auto_keeps_the_choice_an_earlier_round_made():
    cfg = SLMConfig(encoder="auto", static_above_items=1000)
    kept = choose_encoder(cfg, 10**6, pinned=DEFAULT_ENCODER)
    assert kept.name == DEFAULT_ENCODER and "as chosen by the job's first round" in kept.why
    assert choose_encoder(SLMConfig(), 10**6, pinned=STATIC).name == DEFAULT_ENCODER  # only auto is pinned


@pytest.mark.integration
def test_scorers_share_the_nodes_cores_and_embed_as_the_encoder_does(model_cache, encoder):
    from freeal_stream.actors.scorers import ScorerPool

    texts, _ = make_texts(40, seed=8)
    cores = min(2, len(os.sched_getaffinity(0)))
    with local_ray(cpus=2):  # workers inherit FREEAL_MODEL_CACHE
        one = ScorerPool(64, 1, size=1)
        assert one.work_threads() == [cores]  # the single scorer gets both cores, not slm.threads' one
        assert np.allclose(one.embed(STATIC, texts), encoder.embed(texts), atol=1e-6)
        for a in one.actors:
            ray.kill(a)
        two = ScorerPool(64, 1, size=2)
        assert two.work_threads() == [max(1, cores // 2)] * 2


@pytest.mark.integration
def test_auto_encoder_is_chosen_once_and_kept_when_the_pool_grows(tmp_path, model_cache, capsys):
    """24 texts at the first round (<= 24: MiniLM); 12 more ingested before round 2 make 36 > 24, and round 2
    still embeds and trains with MiniLM, so the cache and the stored rounds keep meaning one thing."""
    from freeal_stream.cli import main
    from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
    from freeal_stream.testing.jobs import make_job
    from freeal_stream.testing.keyword_llm import respond

    with FakeOpenAIServer(respond) as server:
        job = make_job(
            tmp_path,
            6,
            llm={"base_url": server.base_url, "model": "kw"},
            slm={"mode": "head", "epochs": 2, "encoder": "auto", "static_above_items": 24},
            freeal={"rounds": 1, "generated_per_class": 3, "query_fraction": 0.25},
        )
        assert main(["run", str(job)]) == 0
        assert "frozen encoder: all-MiniLM-L6-v2 (slm.encoder auto: a pool of 24 texts <=" in capsys.readouterr().err
        extra = tmp_path / "more.csv"
        with open(extra, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "text", "label"])
            w.writerows([[f"more-{i}", f"my parcel {i} never arrived at the address", "shipping"] for i in range(12)])
        assert main(["ingest", str(job), str(extra)]) == 0
        job.write_text(job.read_text().replace("rounds: 1", "rounds: 2"))
        assert main(["run", str(job)]) == 0
    err = capsys.readouterr().err
    assert "frozen encoder: all-MiniLM-L6-v2 (slm.encoder auto, as chosen by the job's first round" in err
    assert STATIC not in err
    state = tmp_path / "state"
    meta = json.loads((state / "models" / "round-2" / "slm.json").read_text())
    assert meta["encoder"] == "sentence-transformers/all-MiniLM-L6-v2"
    # one encoder's arrays only (the file names carry the space), never the static encoder's
    spaces = {p.stem.split("-", 1)[1] for kind in ("frozen", "views") for p in (state / "arrays").glob(f"{kind}-*.f32")}
    assert spaces == {embedding_space(DEFAULT_ENCODER, SLMConfig().max_length)}
