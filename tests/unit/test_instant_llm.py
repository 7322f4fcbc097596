"""The benchmarks' instant LLM answers from its table, at a stated accuracy, the same on every run."""

from __future__ import annotations

from freeal_stream.llm.prompts import annotation_messages
from freeal_stream.llm.verbalizer import Verbalizer
from freeal_stream.testing.instant_llm import InstantLLM

VERB = Verbalizer({"negative": ["negative"], "positive": ["positive"]})


def ask(llm: InstantLLM, text: str) -> str:
    body = {"model": "m", "messages": annotation_messages("Sentiment.", VERB, [("fine film", 1)], text)}
    return llm.answer(body)["choices"][0]["message"]["content"]


def test_replays_the_table_and_simulates_a_stated_accuracy():
    table = {f"text {i}": ("positive" if i % 2 else "negative") for i in range(2000)}
    assert all(ask(InstantLLM(table), t) == label for t, label in list(table.items())[:50])
    noisy = InstantLLM(table, accuracy=0.9)
    answers = [ask(noisy, t) for t in table]
    right = sum(a == table[t] for a, t in zip(answers, table))
    assert 0.87 < right / len(table) < 0.93 and set(answers) == {"negative", "positive"}
    assert answers == [ask(InstantLLM(table, accuracy=0.9), t) for t in table]  # the same on every run


def test_demo_generation_is_answered_with_texts_of_the_asked_class():
    table = {"a good one": "positive", "a bad one": "negative", "a great one": "positive"}
    body = {
        "messages": [
            {"role": "system", "content": "x"},
            {"role": "user", "content": "Write 2 NEW texts whose correct label is 'positive'."},
        ]
    }
    lines = InstantLLM(table).answer(body)["choices"][0]["message"]["content"].splitlines()
    assert sorted(line.split(". ", 1)[1] for line in lines) == ["a good one", "a great one"]
