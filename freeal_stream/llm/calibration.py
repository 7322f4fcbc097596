"""How a label is read from an answer: from the class words' logprobs, optionally calibrated against the prompt.

The label is the class with the most probability among every class word's first token in the top logprobs
(llama.cpp reports them before its grammar applies, so they are the model's own), not only the token the
model happened to generate; an answer in other words is still no label.

A small LLM leans: towards the first class listed, towards one class for every text (on SUBJ the 0.5B model
says "objective" to everything; BENCHMARKS.md section 8). Contextual calibration (Zhao et al., ICML 2021)
measures the lean with the very prompt a text is asked with, but a content-free text in its place ("N/A",
an empty text): the class probabilities those get are the prompt's prior, and a text's class probabilities
divided by that prior (then renormalised) are what the text itself adds. It is opt-in (`llm.calibrate`): on
MR and SUBJ it cost both local models accuracy (BENCHMARKS.md section 11; "N/A" reads as a negative,
objective text to them, so the prior over-corrects), and it leaves the 0.5B model's SUBJ answers at chance,
as its class probabilities do not rank SUBJ texts at all.

A prior costs one request per content-free text per demo block. They are ordinary requests, keyed, cached
and budgeted, so a resumed round gets the same answers back from the store and rebuilds the same priors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from freeal_stream.config import LLMConfig
from freeal_stream.llm.client import ChatAnswer, ChatRequest
from freeal_stream.llm.prompts import DEFAULT_MAX_TEXT_CHARS, TEMPLATE_VERSION, annotation_messages
from freeal_stream.llm.verbalizer import Verbalizer

CONTENT_FREE = ("N/A", "")  # Zhao et al. average a few; two keep the extra requests few
PRIOR_FLOOR = 0.01  # a class the prompt all but rules out is not divided by ~0


@dataclass(frozen=True)
class Reading:
    """The label an answer gives (None: no label) and its probability (None: no logprobs came back)."""

    label: int | None
    confidence: float | None


def annotation_request(
    cfg: LLMConfig,
    task_description: str,
    verbalizer: Verbalizer,
    demos: Sequence[tuple[str, int]],
    text: str,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
) -> ChatRequest:
    """The one way a text is asked for its label: the annotation prompt, restricted to the class words by a
    grammar where the job constrains answers (llm.grammar)."""
    return ChatRequest.build(
        annotation_messages(task_description, verbalizer, demos, text, max_text_chars),
        cfg,
        TEMPLATE_VERSION,
        grammar=verbalizer.grammar() if cfg.constrained else None,
    )


def calibration_requests(
    cfg: LLMConfig,
    task_description: str,
    verbalizer: Verbalizer,
    demos: Sequence[tuple[str, int]],
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
) -> tuple[ChatRequest, ...]:
    """The content-free twins of a prompt with these demos (none when the job does not calibrate)."""
    if not cfg.calibrated:
        return ()
    return tuple(
        annotation_request(cfg, task_description, verbalizer, demos, text, max_text_chars) for text in CONTENT_FREE
    )


def prior(verbalizer: Verbalizer, answers: Sequence[ChatAnswer]) -> np.ndarray | None:
    """The prompt's class prior: the mean class probabilities of its content-free answers, floored at
    PRIOR_FLOOR; None when none of them carried class logprobs (then labels are read uncalibrated)."""
    probs = [p for a in answers if (p := verbalizer.probs_from_logprobs(a.top_logprobs)) is not None]
    if not probs:
        return None
    mean = np.maximum(np.mean(probs, axis=0), PRIOR_FLOOR)
    return mean / mean.sum()


def read(verbalizer: Verbalizer, answer: ChatAnswer, prior_: np.ndarray | None = None) -> Reading:
    """The answer's label and confidence.

    Only an answer that is exactly one class word gives a label (an answer in other words is no label, as
    before: a lenient reader would turn chatter into labels). Where the class logprobs came back, the label
    is their argmax after dividing by `prior_` (when given) and the confidence its probability; else the
    word answered, with no confidence.
    """
    said = verbalizer.parse(answer.content)
    if said is None:
        return Reading(None, None)
    probs = verbalizer.probs_from_logprobs(answer.top_logprobs)
    if probs is None:
        return Reading(said, None)
    if prior_ is not None:
        probs = probs / prior_
        probs = probs / probs.sum()
    label = int(np.argmax(probs))
    return Reading(label, float(probs[label]))
