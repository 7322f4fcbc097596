import math

import numpy as np
import pytest

from freeal_stream.llm.verbalizer import Verbalizer


@pytest.fixture
def verb() -> Verbalizer:
    return Verbalizer({"positive": ["positive", "great"], "negative": ["negative", "bad"]})


def test_names_and_answer_words(verb):
    assert verb.names == ["positive", "negative"]
    assert verb.answer_words == ["positive", "negative"]
    assert len(verb) == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("positive", 0),
        ("Negative", 1),
        ("  POSITIVE.\n", 0),
        ("'positive'", 0),
        ('"negative"', 1),
        ("**Positive**", 0),
        ("\u201cnegative\u201d", 1),
        ("Answer: positive", 0),
        ("label: negative", 1),
        ("Category - negative.", 1),
        ("great", 0),
        ("Bad!", 1),
        ("answer: 'great'", 0),
    ],
)
def test_parse_accepts_exactly_one_class_word(verb, text, expected):
    assert verb.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "   ",
        "positive or negative",
        "positive, negative",
        "pos",
        "neutral",
        "I think positive",
        "The answer is positive",
        "answer:",
        "positive positive",
        "not bad",
    ],
)
def test_parse_never_guesses(verb, text):
    assert verb.parse(text) is None


def test_multi_word_verbalizer_words():
    verb = Verbalizer({"subj": ["subjective"], "obj": ["objective", "not subjective"]})
    assert verb.parse("Not  Subjective.") == 1
    assert verb.parse("subjective") == 0


def test_rejects_shared_word_and_single_class():
    with pytest.raises(ValueError, match="both"):
        Verbalizer({"a": ["yes"], "b": ["Yes "]})
    with pytest.raises(ValueError, match="2 classes"):
        Verbalizer({"a": ["yes"]})
    with pytest.raises(ValueError, match="no verbalizer word"):
        Verbalizer({"a": ["yes"], "b": []})


def test_probs_sum_prefix_candidates_per_class(verb):
    top = [
        [(" pos", math.log(0.5)), ("Positive", math.log(0.1)), ("neg", math.log(0.3)), ("the", math.log(0.1))],
        [("itive", 0.0)],
    ]
    probs = verb.probs_from_logprobs(top)
    np.testing.assert_allclose(probs, [0.6 / 0.9, 0.3 / 0.9])
    assert probs.sum() == pytest.approx(1.0)


def test_probs_skip_ambiguous_prefixes():
    verb = Verbalizer({"a": ["positive"], "b": ["pointless"]})
    assert verb.probs_from_logprobs([[("po", 0.0), ("p", -0.1)]]) is None
    np.testing.assert_allclose(verb.probs_from_logprobs([[("po", 0.0), ("pos", math.log(0.2))]]), [1.0, 0.0])


def test_probs_none_when_nothing_matches(verb):
    assert verb.probs_from_logprobs(None) is None
    assert verb.probs_from_logprobs([]) is None
    assert verb.probs_from_logprobs([[]]) is None
    assert verb.probs_from_logprobs([[("Answer", -0.1), (":", -2.0), (" ", -3.0)], [("positive", 0.0)]]) is None


@pytest.mark.parametrize("answer", [5, ["positive"], {"text": "positive"}, 2.5, b"positive"])
def test_parse_gives_no_label_for_an_answer_that_is_not_text(verb, answer):
    assert verb.parse(answer) is None


@pytest.mark.parametrize(
    "top",
    [
        [[("pos", "abc")]],
        [[("pos", float("inf")), ("neg", -1.0)]],
        [[("pos", float("nan"))]],
        [[(7, -0.1)]],
        [[("pos", None)]],
        [[("pos", 2.0), ("neg", -0.1)]],
        [["pos"]],
        [[("pos", -0.1, "x")]],
        [None],
        "abc",
    ],
)
def test_probs_from_logprobs_never_raises_or_gives_nan_on_bad_candidates(verb, top):
    probs = verb.probs_from_logprobs(top)
    assert probs is None or (np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0))
