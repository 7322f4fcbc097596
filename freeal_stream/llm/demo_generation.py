"""Round 1's demonstration pool: the LLM writes labelled examples that imitate the unlabelled data.

Zero-shot annotation is too noisy to start FreeAL from; self-generated demos fix that without a single
human label. A small LLM often writes off-class texts or copies the prototypes (adding the label to
them), so each candidate is checked: label tags are cut off, copies and near-copies of what it was shown
are dropped, and the same LLM must label the candidate zero-shot as the class it was written for. A
class left with fewer than half the examples asked for is asked again, then topped up, so one class
cannot fill the pool. Requests go through the job's annotators like any other, so reruns are answered from the cache.
"""
from __future__ import annotations

import difflib
import logging
import math
import random
import re
from typing import Callable, Sequence

from freeal_stream.config import LLMConfig
from freeal_stream.llm.client import ChatRequest, Completer, Ledger
from freeal_stream.llm.prompts import (TEMPLATE_VERSION, annotation_messages, dedupe_key, generation_messages,
                                       parse_generated)
from freeal_stream.llm.verbalizer import Verbalizer

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int, Ledger], None] | None

MAX_TRIES = 3
MIN_TEMPERATURE = 0.7   # writing varied examples needs sampling even when annotation runs at 0
TOKENS_PER_ITEM = 80    # room for one item of up to ~60 words plus its numbering
FALLBACK_DRAW_PER_DEMO = 4  # texts labelled zero-shot per fallback demo wanted: a rare class needs a wide draw
COPY_SHARE = 0.8   # share of the shorter text's words found in the other, in order, at which one is a copy
_WORD = re.compile(r"\w+")


def _draw(texts: Sequence[str], k: int, seed: int, class_idx: int, attempt: int) -> list[str]:
    """A reproducible draw of prototypes, different per class and per try."""
    rng = random.Random(f"{seed}:{class_idx}:{attempt}")
    return [texts[i] for i in rng.sample(range(len(texts)), min(k, len(texts)))]


def _words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(text.casefold()))


def _is_near_copy(words: tuple[str, ...], shown: Sequence[tuple[str, ...]]) -> bool:
    """True when most words of the shorter of `words` and a `shown` text lie in the other, in runs of 2+.

    Over the shorter text, so a prototype cut short, extended or with a word or two changed counts as a
    copy; runs of at least two words, so common words matching here and there do not.
    """
    for proto in shown:
        shorter = min(len(words), len(proto))
        if not shorter:
            continue
        blocks = difflib.SequenceMatcher(None, words, proto, autojunk=False).get_matching_blocks()
        if sum(b.size for b in blocks if b.size >= 2) / shorter >= COPY_SHARE:
            return True
    return False


def _sampling_seed(seed: int, class_idx: int, attempt: int) -> int:
    """A fixed sampling seed per (job seed, class, try): a fresh run writes the same demos."""
    return random.Random(f"sample:{seed}:{class_idx}:{attempt}").randrange(2**31)


def _zero_shot(client: Completer, cfg: LLMConfig, task_description: str, verbalizer: Verbalizer,
               texts: Sequence[str], progress: ProgressFn = None) -> list[int | None]:
    """The LLM's zero-shot label of each text (None = no label), asked exactly like an annotation."""
    checks = [ChatRequest.build(annotation_messages(task_description, verbalizer, [], t), cfg, TEMPLATE_VERSION,
                                logprobs=False) for t in texts]
    return [verbalizer.parse(a.content) for a in client.complete_many(checks, progress)]


def generate_demos(client: Completer, cfg: LLMConfig, task_description: str, verbalizer: Verbalizer,
                   unlabelled_texts: Sequence[str], prototypes: int, per_class: int,
                   seed: int, progress: ProgressFn = None) -> list[tuple[str, int, str]]:
    """Up to `per_class` (text, class_idx, source) demos per class; source 'generated' or 'zero-shot'.

    A class that yields fewer than half of `per_class` validated examples is asked again with another
    prototype draw (up to MAX_TRIES in all). If it is still short, it is topped up with unlabelled texts
    that the LLM labels zero-shot as that class (source 'zero-shot'): weaker, but every class keeps a fair
    share of the prompt, and still no human label is used. A class the LLM never picks is left out with a
    warning.
    """
    if not unlabelled_texts:
        raise ValueError("demo generation needs unlabelled texts to imitate")
    kept: dict[int, list[str]] = {c: [] for c in range(len(verbalizer))}
    enough = math.ceil(per_class / 2)
    seen: set[str] = set()
    shown: list[tuple[str, ...]] = []
    pending = list(kept)
    for attempt in range(MAX_TRIES):
        draws = {c: _draw(unlabelled_texts, prototypes, seed, c, attempt) for c in pending}
        requests = [
            ChatRequest.build(generation_messages(task_description, verbalizer, c, draws[c], per_class),
                              cfg, TEMPLATE_VERSION, temperature=max(cfg.temperature, MIN_TEMPERATURE),
                              max_tokens=per_class * TOKENS_PER_ITEM, logprobs=False,
                              seed=_sampling_seed(seed, c, attempt))
            for c in pending]
        answers = client.complete_many(requests, progress)
        seen.update(dedupe_key(t) for draw in draws.values() for t in draw)
        shown += [_words(t) for draw in draws.values() for t in draw]
        candidates: list[tuple[str, int]] = []
        for c, answer in zip(pending, answers):
            fresh = []   # parsed past per_class: copies are dropped before the cap, not after
            for item in parse_generated(answer.content or "", 2 * per_class, verbalizer=verbalizer):
                key = dedupe_key(item)
                if key not in seen and not _is_near_copy(_words(item), shown):
                    seen.add(key)
                    fresh.append((item, c))
            candidates += fresh[:per_class - len(kept[c])]
        verdicts = _zero_shot(client, cfg, task_description, verbalizer, [t for t, _ in candidates], progress)
        for (item, c), verdict in zip(candidates, verdicts):
            if verdict == c:  # the LLM must agree on the class it was written for (candidates fit per_class)
                kept[c].append(item)
        pending = [c for c in pending if len(kept[c]) < enough]
        if not pending:
            break
    demos = [(text, c, "generated") for c, texts in kept.items() for text in texts]
    if pending:
        n_draw = max(prototypes, FALLBACK_DRAW_PER_DEMO * per_class) * len(pending)
        wanted = {c: per_class - len(kept[c]) for c in pending}
        demos += _zero_shot_demos(client, cfg, task_description, verbalizer, unlabelled_texts, wanted,
                                  n_draw, seed, progress)
    for c in sorted(set(range(len(verbalizer))) - {c for _, c, _ in demos}):
        log.warning("demo generation: no example of '%s', generated or labelled zero-shot; going on without it",
                    verbalizer.names[c])
    return demos


def _zero_shot_demos(client: Completer, cfg: LLMConfig, task_description: str, verbalizer: Verbalizer,
                     texts: Sequence[str], wanted: dict[int, int], n_draw: int,
                     seed: int, progress: ProgressFn = None) -> list[tuple[str, int, str]]:
    """Fallback demos, `wanted[c]` for class c: a seeded draw of unlabelled texts, kept where zero-shot says c.

    The draw is labelled a slice at a time (twice what is still missing) and labelling stops once every
    class has its share: a common class is filled after a few requests, only a rare one uses the whole draw.
    """
    names = ", ".join(verbalizer.names[c] for c in wanted)
    log.warning("demo generation: too few usable examples for %s after %d tries; topping up with unlabelled "
                "texts the LLM labels zero-shot as such", names, MAX_TRIES)
    draw = _draw(texts, n_draw, seed, -1, MAX_TRIES)
    missing = dict(wanted)
    out: list[tuple[str, int, str]] = []
    start = 0
    while start < len(draw) and any(missing.values()):
        part = draw[start:start + 2 * sum(missing.values())]
        start += len(part)
        for text, verdict in zip(part, _zero_shot(client, cfg, task_description, verbalizer, part, progress)):
            if missing.get(verdict, 0) > 0:   # None (no label) and classes already full are skipped
                out.append((text, verdict, "zero-shot"))
                missing[verdict] -= 1
    order = list(wanted)
    return sorted(out, key=lambda demo: order.index(demo[1]))   # grouped by class, like the generated ones
