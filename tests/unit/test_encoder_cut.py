"""A huge text costs the SLM no more than a text of max_length tokens: texts are cut by characters before
tokenizing (max_length x CHARS_PER_TOKEN), and a text shorter than that embeds bit for bit as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freeal_stream.slm.encoder import Encoder


@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(1)
    return Encoder("all-MiniLM-L6-v2", max_length=32)


def test_the_tokenizer_never_sees_more_than_the_cut(encoder, monkeypatch):
    seen = []
    tokenizer = encoder.tokenizer

    def spy(texts, *a, **kw):
        seen.extend(len(t) for t in texts)
        return tokenizer(texts, *a, **kw)

    monkeypatch.setattr(encoder, "tokenizer", spy)
    huge = "word " * 400_000  # 2 MB
    encoder.embed([huge, "short"])
    encoder.tokenize([huge])
    assert seen and max(seen) <= 32 * 16
    assert encoder.max_chars == 32 * 16


def test_cutting_changes_no_embedding_of_ordinary_text(encoder):
    sentence = "The parcel arrived two weeks late and the box was damaged, so I want a refund. "
    short, long_ = [sentence[:100], "ok"], [sentence * 40]  # the long one: 3,200 characters, cut at 512
    assert len(long_[0]) > encoder.max_chars
    full = encoder.tokenizer(long_, truncation=True, max_length=32)["input_ids"]
    cut = encoder.tokenizer([long_[0][: encoder.max_chars]], truncation=True, max_length=32)["input_ids"]
    assert full == cut  # the first max_length tokens lie well inside the cut
    encoder.eval()
    with torch.no_grad():
        reference = encoder(
            encoder.tokenizer(short, truncation=True, max_length=32, padding=True, return_tensors="pt")
        ).numpy()
    assert np.array_equal(encoder.embed(short), reference)  # bit-identical for short texts
