"""Labels read from class logprobs and calibrated by the prompt's content-free prior (llm/calibration.py)."""

from __future__ import annotations

import math

import pytest

from freeal_stream.config import LLMConfig
from freeal_stream.llm import calibration
from freeal_stream.llm.client import ChatAnswer
from freeal_stream.llm.verbalizer import Verbalizer
from freeal_stream.records import PlanItem
from freeal_stream.rounds.planning import RoundPlan

VERB = Verbalizer({"subjective": ["subjective"], "objective": ["objective", "fact"]})
EMBEDDED = LLMConfig(model="m")  # no base_url: the grammar on, calibration off
CALIBRATED = LLMConfig(model="m", calibrate=True)
HOSTED = LLMConfig(base_url="http://127.0.0.1:9/v1", model="m")  # plain chat unless the job opts in


def answer(content: str | None, p_subj: float | None = None) -> ChatAnswer:
    top = None if p_subj is None else [[("objective", math.log(1 - p_subj)), ("subject", math.log(p_subj))]]
    return ChatAnswer(
        key="k",
        content=content,
        finish_reason="stop",
        prompt_tokens=1,
        completion_tokens=1,
        cached_tokens=0,
        top_logprobs=top,
        latency_s=0.0,
        attempts=1,
        error=None,
    )


def test_the_label_is_the_argmax_of_the_class_logprobs_divided_by_the_prior():
    prior = calibration.prior(VERB, [answer("objective", 0.05), answer("objective", 0.15)])
    assert prior == pytest.approx([0.1, 0.9])
    # answered 'objective' (70%), but three times the prompt's own subjective mass: subjective
    got = calibration.read(VERB, answer("objective", 0.3), prior)
    assert got.label == 0 and got.confidence == pytest.approx((0.3 / 0.1) / (0.3 / 0.1 + 0.7 / 0.9))
    assert calibration.read(VERB, answer("objective", 0.05), prior).label == 1
    assert calibration.read(VERB, answer("objective", 0.3)) == calibration.Reading(1, pytest.approx(0.7))


def test_only_an_answer_in_class_words_gives_a_label():
    assert calibration.read(VERB, answer("I think it is subjective", 0.9)) == calibration.Reading(None, None)
    assert calibration.read(VERB, answer(None, 0.9)).label is None
    assert calibration.read(VERB, answer("fact")) == calibration.Reading(1, None)  # no logprobs: the word said


def test_prior_is_floored_and_none_without_class_logprobs():
    p = calibration.prior(VERB, [answer("objective", 1e-9)])
    floor = calibration.PRIOR_FLOOR
    assert p[0] == pytest.approx(floor / (1 + floor)) and p.sum() == pytest.approx(1)
    assert calibration.prior(VERB, [answer("objective"), answer("")]) is None
    assert calibration.prior(VERB, []) is None


def test_embedded_requests_carry_the_grammar_hosted_ones_not_and_twins_only_when_calibrating():
    demos = [("a plot summary", 1)]
    r = calibration.annotation_request(EMBEDDED, "t", VERB, demos, "some text")
    assert r.grammar == 'root ::= "subjective" | "objective"' and r.top_logprobs == 20
    assert calibration.calibration_requests(EMBEDDED, "t", VERB, demos) == ()
    twins = calibration.calibration_requests(CALIBRATED, "t", VERB, demos)
    assert [t.messages[-1][1] for t in twins] == ["Text:\n<text>\nN/A\n</text>", "Text:\n<text>\n\n</text>"]
    assert all(t.messages[:-1] == r.messages[:-1] and t.grammar == r.grammar for t in twins)
    assert calibration.annotation_request(HOSTED, "t", VERB, demos, "some text").grammar is None
    assert calibration.calibration_requests(HOSTED, "t", VERB, demos) == ()
    opted_in = LLMConfig(base_url="http://127.0.0.1:9/v1", model="m", grammar=True, calibrate=True)
    assert calibration.annotation_request(opted_in, "t", VERB, demos, "x").grammar is not None
    assert len(calibration.calibration_requests(opted_in, "t", VERB, demos)) == 2
    assert calibration.calibration_requests(LLMConfig(model="m", logprobs=False), "t", VERB, demos) == ()
    with pytest.raises(ValueError, match="calibrate needs logprobs"):
        LLMConfig(model="m", logprobs=False, calibrate=True).validate()


def test_a_plan_pays_for_each_blocks_calibration_just_before_its_first_item():
    def req(name: str):
        return calibration.annotation_request(EMBEDDED, "t", VERB, [], name)

    items = (PlanItem("a", ("d1",)), PlanItem("b", ("d1",)), PlanItem("c", ("d2",)))
    calib = {("d1",): (req("cf1"), req("cf1'")), ("d2",): (req("cf2"),)}  # as with llm.calibrate: true
    plan = RoundPlan(1, items, (req("a"), req("b"), req("c")), calib)
    order = plan.sending_order()
    assert [k for k, _ in order] == [None, None, 0, 1, None, 2]
    assert [r.messages[-1][1] for _, r in order][4] == calib[("d2",)][0].messages[-1][1]
    assert plan.blocks([2, 0, 1]) == [("d2",), ("d1",)]
    assert plan.head(2).calibration == calib and len(plan.head(2)) == 2


def test_verbalizer_grammar_quotes_words():
    verb = Verbalizer({"a": ['say "hi"'], "b": ["back\\slash"]})
    assert verb.grammar() == 'root ::= "say \\"hi\\"" | "back\\\\slash"'
