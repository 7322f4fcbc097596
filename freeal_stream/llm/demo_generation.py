"""Round 1's demonstration pool: the LLM writes labelled examples that imitate the unlabelled data.

Zero-shot annotation is too noisy to start FreeAL from; self-generated demos fix that without a single
human label. A small LLM often writes off-class texts or copies the prototypes, so each candidate is
checked: copies are dropped, and the same LLM must label the candidate zero-shot as the class it was
written for. Requests go through LLMClient like any other, so reruns are answered from the cache.
"""
from __future__ import annotations

import logging
import random
from typing import Sequence

from freeal_stream.config import LLMConfig
from freeal_stream.llm.client import ChatRequest, LLMClient
from freeal_stream.llm.prompts import (TEMPLATE_VERSION, annotation_messages, dedupe_key, generation_messages,
                                       parse_generated)
from freeal_stream.llm.verbalizer import Verbalizer

log = logging.getLogger(__name__)

MAX_TRIES = 3
MIN_TEMPERATURE = 0.7   # writing varied examples needs sampling even when annotation runs at 0
TOKENS_PER_ITEM = 80    # room for one item of up to ~60 words plus its numbering


def _draw(texts: Sequence[str], k: int, seed: int, class_idx: int, attempt: int) -> list[str]:
    """A reproducible draw of prototypes, different per class and per try."""
    rng = random.Random(f"{seed}:{class_idx}:{attempt}")
    return [texts[i] for i in rng.sample(range(len(texts)), min(k, len(texts)))]


def _agreeing(client: LLMClient, cfg: LLMConfig, task_description: str, verbalizer: Verbalizer,
              candidates: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The candidates that the LLM, asked zero-shot like any annotation, labels as the intended class."""
    checks = [ChatRequest.build(annotation_messages(task_description, verbalizer, [], text), cfg,
                                TEMPLATE_VERSION, logprobs=False) for text, _ in candidates]
    answers = client.complete_many(checks)
    return [(text, c) for (text, c), a in zip(candidates, answers) if verbalizer.parse(a.content) == c]


def generate_demos(client: LLMClient, cfg: LLMConfig, task_description: str, verbalizer: Verbalizer,
                   unlabelled_texts: Sequence[str], prototypes: int, per_class: int,
                   seed: int) -> list[tuple[str, int]]:
    """Up to `per_class` new (text, class_idx) examples per class, deduplicated, prototypes excluded.

    A class that yields nothing is asked again with another prototype draw (up to MAX_TRIES in all);
    if it still yields nothing, a warning is logged and the pool goes on without it.
    """
    if not unlabelled_texts:
        raise ValueError("demo generation needs unlabelled texts to imitate")
    kept: dict[int, list[str]] = {c: [] for c in range(len(verbalizer))}
    seen: set[str] = set()
    pending = list(kept)
    for attempt in range(MAX_TRIES):
        draws = {c: _draw(unlabelled_texts, prototypes, seed, c, attempt) for c in pending}
        requests = [
            ChatRequest.build(generation_messages(task_description, verbalizer, c, draws[c], per_class),
                              cfg, TEMPLATE_VERSION, temperature=max(cfg.temperature, MIN_TEMPERATURE),
                              max_tokens=per_class * TOKENS_PER_ITEM, logprobs=False)
            for c in pending]
        answers = client.complete_many(requests)
        seen.update(dedupe_key(t) for draw in draws.values() for t in draw)
        candidates: list[tuple[str, int]] = []
        for c, answer in zip(pending, answers):
            for item in parse_generated(answer.content or "", per_class, verbalizer=verbalizer):
                if dedupe_key(item) not in seen:
                    seen.add(dedupe_key(item))
                    candidates.append((item, c))
        for item, c in _agreeing(client, cfg, task_description, verbalizer, candidates):
            kept[c].append(item)
        pending = [c for c in pending if not kept[c]]
        if not pending:
            break
    for c in pending:
        log.warning("demo generation: no usable example for class '%s' after %d tries; going on without",
                    verbalizer.names[c], MAX_TRIES)
    return [(text, c) for c, texts in kept.items() for text in texts]
