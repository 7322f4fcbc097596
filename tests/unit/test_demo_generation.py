import logging
import math
import re

from freeal_stream.config import LLMConfig
from freeal_stream.llm.client import LLMClient
from freeal_stream.llm.demo_generation import generate_demos
from freeal_stream.llm.retry import RetryPolicy
from freeal_stream.llm.verbalizer import Verbalizer
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer, ok
from tests.unit.test_client import MemoryCache

VERB = Verbalizer({"positive": ["positive"], "negative": ["negative"]})
TEXTS = [f"unlabelled review number {i} about a film" for i in range(30)]
# answers as a hosted endpoint gives them (no grammar, no calibration); the embedded default is tested below
CFG = LLMConfig(model="test-model", timeout_s=5.0, temperature=0.0, grammar=False, calibrate=False)


def wanted(body) -> str:
    return re.search(r"correct label is '(\w+)'", body["messages"][-1]["content"]).group(1)


def shown_prototypes(body) -> list[str]:
    return re.findall(r"^Example: (.*)$", body["messages"][-1]["content"], re.MULTILINE)


def is_check(body) -> bool:
    """A zero-shot annotation of a candidate (the validation step), not a generation request."""
    return "<text>" in body["messages"][-1]["content"]


def judge(body):
    """Labels a candidate by the label word it contains; says 'unsure' when it names none."""
    text = body["messages"][-1]["content"].lower()
    return ok("positive" if "positive" in text else "negative" if "negative" in text else "unsure")


def writer(body):
    if is_check(body):
        return judge(body)
    label = wanted(body)
    lines = [f"{i}. A {label} example sentence number {i}." for i in range(1, 4)]
    lines += [
        f"4. a {label.upper()} example sentence number 1.",
        f"5. {shown_prototypes(body)[0]}",
        "6. positive",
        "7. An off-topic sentence with no label word.",
    ]
    return ok("Sure! Here they are:\n" + "\n".join(lines))


def client(server, cache=None) -> LLMClient:
    return LLMClient(CFG, server.base_url, None, cache, retry_policy=RetryPolicy(base_delay_s=0.01))


def test_generates_per_class_deduped_and_without_prototypes():
    with FakeOpenAIServer(writer) as server:
        demos = generate_demos(client(server), CFG, "Sentiment of reviews.", VERB, TEXTS, 5, 5, seed=1)
    assert demos == [(f"A positive example sentence number {i}.", 0, "generated") for i in range(1, 4)] + [
        (f"A negative example sentence number {i}.", 1, "generated") for i in range(1, 4)
    ]
    checks = [b for b in server.requests if is_check(b)]
    # 3 per class, plus the off-topic line once (the second class's copy is a duplicate)
    assert len(checks) == 7 and all(b["logprobs"] and "grammar" not in b for b in checks)  # asked as annotations
    body = server.requests[0]
    assert len(shown_prototypes(body)) == 5 and body["temperature"] >= 0.7
    assert "Write 3 NEW" in body["messages"][-1]["content"] and body["max_tokens"] == 3 * 64  # half of 5 per ask
    assert "logprobs" not in body
    seeds = [b["seed"] for b in server.requests if not is_check(b)]
    assert len(set(seeds)) == len(seeds)  # one fixed sampling seed per class and try


def test_prototype_draws_are_seeded_and_answers_cached():
    cache = MemoryCache()
    with FakeOpenAIServer(writer) as server:
        first = generate_demos(client(server, cache), CFG, "t", VERB, TEXTS, 5, 3, seed=7)
        again = generate_demos(client(server, cache), CFG, "t", VERB, TEXTS, 5, 3, seed=7)
        sent = len(server.requests)
        assert first == again and sent == 2 + 6  # two generations, then one check per candidate
        generate_demos(client(server, cache), CFG, "t", VERB, TEXTS, 5, 3, seed=8)
        assert len(server.requests) > sent
    generations = [b for b in server.requests if not is_check(b)]
    assert shown_prototypes(generations[0]) != shown_prototypes(generations[2])


def test_empty_class_is_retried_then_filled_with_zero_shot_labelled_texts(caplog):
    calls = []

    def stubborn(body):
        if is_check(body):
            return judge(body)
        calls.append((wanted(body), tuple(shown_prototypes(body))))
        if wanted(body) == "negative":
            return ok("I'm sorry, I can't write negative reviews.")
        return writer(body)

    texts = TEXTS + [f"a negative remark number {i}" for i in range(30)]
    with FakeOpenAIServer(stubborn) as server, caplog.at_level(logging.WARNING):
        demos = generate_demos(client(server), CFG, "t", VERB, texts, 4, 3, seed=0)
    assert {(c, src) for _, c, src in demos} == {(0, "generated"), (1, "zero-shot")}
    assert all("negative remark" in t for t, c, _ in demos if c == 1) and len([d for d in demos if d[1] == 1]) <= 3
    negative_draws = [protos for label, protos in calls if label == "negative"]
    assert len(negative_draws) == 3 and len(set(negative_draws)) == 3
    assert "negative" in caplog.text and "too few usable examples" in caplog.text and "zero-shot" in caplog.text


def test_class_the_llm_never_picks_is_left_out_with_a_warning(caplog):
    def never_negative(body):
        if is_check(body):
            return ok("positive")
        return writer(body)

    with FakeOpenAIServer(never_negative) as server, caplog.at_level(logging.WARNING):
        demos = generate_demos(client(server), CFG, "t", VERB, TEXTS, 4, 3, seed=0)
    assert {c for _, c, _ in demos} == {0} and "going on without it" in caplog.text


def test_candidates_the_llm_labels_otherwise_are_dropped():
    def contrary(body):
        if is_check(body):  # the judge disagrees with every 'negative' candidate
            return ok("positive")
        return writer(body)

    with FakeOpenAIServer(contrary) as server:
        demos = generate_demos(client(server), CFG, "t", VERB, TEXTS, 5, 3, seed=2)
    assert demos and {c for _, c, _ in demos} == {0}


def copier(body):
    """A small model's failure: the prototypes it was shown, edited, cut short or with the label appended."""
    if is_check(body):
        return judge(body)
    label, protos = wanted(body), shown_prototypes(body)
    lines = [
        f'{protos[0]}" - {label.capitalize()}',
        f"{protos[1].replace('film', 'movie')}",
        f"{label.capitalize()}: {protos[2]}",
        " ".join(protos[3].split()[:5]),
        f"A truly new {label} sentence, number one.",
    ]
    return ok("\n".join(f"{i}. {t}" for i, t in enumerate(lines, 1)))


def test_copies_of_prototypes_and_label_tags_never_become_demos():
    with FakeOpenAIServer(copier) as server:
        demos = generate_demos(client(server), CFG, "t", VERB, TEXTS, 5, 3, seed=3)
    new = ["A truly new negative sentence, number one.", "A truly new positive sentence, number one."]
    # the tag would have passed the zero-shot check (the judge reads label words); near-copies are dropped
    assert sorted(t for t, _, _ in demos) == new
    checked = {
        re.search(r"<text>\n(.*)\n</text>", b["messages"][-1]["content"]).group(1)
        for b in server.requests
        if is_check(b)
    }
    assert checked - set(TEXTS) == set(new)  # besides the zero-shot fallback's draw of real texts


def test_a_class_with_too_few_examples_is_asked_again_then_topped_up(caplog):
    def lopsided(body):
        if is_check(body):
            return judge(body)
        if wanted(body) == "positive":
            return writer(body)
        return ok("1. The one negative example this model ever writes.")  # the same on every try

    texts = TEXTS + [f"a negative remark number {i}" for i in range(30)]
    with FakeOpenAIServer(lopsided) as server, caplog.at_level(logging.WARNING):
        demos = generate_demos(client(server), CFG, "t", VERB, texts, 4, 4, seed=0)
    by_class = {c: [(t, src) for t, cc, src in demos if cc == c] for c in (0, 1)}
    assert len(by_class[0]) == 3 and all(src == "generated" for _, src in by_class[0])  # 3 of 4: enough
    # 1 of 4 is under half: asked twice more, then topped up to 4 with texts labelled zero-shot
    assert [src for _, src in by_class[1]] == ["generated"] + ["zero-shot"] * 3
    assert all("negative remark" in t for t, src in by_class[1] if src == "zero-shot")
    # the top-up labels its draw (16 texts here) a slice at a time and stops once the class is full
    top_up = [b for b in server.requests if is_check(b) and any(t in b["messages"][-1]["content"] for t in texts)]
    assert 3 <= len(top_up) < 16
    generations = [wanted(b) for b in server.requests if not is_check(b)]
    assert generations.count("positive") == 1 and generations.count("negative") == 3
    assert "too few usable examples for negative" in caplog.text


SUBJ = Verbalizer({"subjective": ["subjective"], "objective": ["objective"]})
EMBEDDED = LLMConfig(model="test-model", timeout_s=5.0, temperature=0.0, calibrate=True)  # no base_url: grammar


def leaning_judge(body):
    """A small model on SUBJ: it answers 'objective' to everything, but gives opinions more 'subjective'
    mass than it gives a content-free text."""
    text = re.search(r"<text>\n(.*)\n</text>", body["messages"][-1]["content"], re.DOTALL).group(1)
    p_subj = 0.05 if text in ("", "N/A") else 0.3 if "love" in text else 0.01
    return ok("objective", top_logprobs=[[("objective", math.log(1 - p_subj)), ("subject", math.log(p_subj))]])


def subj_writer(body):
    if is_check(body):
        return leaning_judge(body)
    if wanted(body) == "subjective":
        return ok("\n".join(f"{i}. I love how this film number {i} is shot." for i in range(1, 4)))
    return ok("\n".join(f"{i}. The film number {i} was shot in Canada." for i in range(1, 4)))


def test_calibrated_checks_keep_both_classes_where_a_leaning_model_says_one():
    with FakeOpenAIServer(subj_writer) as server:
        demos = generate_demos(client(server), EMBEDDED, "t", SUBJ, TEXTS, 4, 3, seed=0)
    # read from the first token's text alone, every candidate is 'objective' and no subjective demo survives
    assert {(c, src) for _, c, src in demos} == {(0, "generated"), (1, "generated")}
    assert len(demos) == 6
    checks = [b for b in server.requests if is_check(b)]
    assert all(b["grammar"] == 'root ::= "subjective" | "objective"' and b["top_logprobs"] == 20 for b in checks)
    content_free = [b for b in checks if re.search(r"<text>\n(N/A)?\n</text>", b["messages"][-1]["content"])]
    assert len(content_free) == 2  # the zero-shot prompt's prior: asked once, for both classes' checks


def test_time_box_stops_new_tries_and_says_so():
    said = []

    def slow_negative(body):
        if is_check(body):
            return judge(body)
        if wanted(body) == "negative":
            return ok("1. Nothing to see here, sorry.", delay_s=0.3)
        return writer(body)

    texts = TEXTS + [f"a negative remark number {i}" for i in range(30)]
    with FakeOpenAIServer(slow_negative) as server:
        demos = generate_demos(client(server), CFG, "t", VERB, texts, 4, 3, seed=0, time_box_s=0.2, say=said.append)
    generations = [wanted(b) for b in server.requests if not is_check(b)]
    assert generations.count("negative") == 1  # one try only: the box ran out during it
    assert any("time box (freeal.generation_time_s) ran out after 1 try" in m for m in said)
    assert any("topping up" in m and "negative" in m for m in said)
    assert said[-1] == "demo pool: positive: 3 generated; negative: 3 zero-shot"
    assert [src for _, c, src in demos if c == 1] == ["zero-shot"] * 3
