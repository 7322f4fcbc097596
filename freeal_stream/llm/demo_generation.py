"""Round 1's demonstration pool: the LLM writes labelled examples that imitate the unlabelled data.

Zero-shot annotation is too noisy to start FreeAL from; self-generated demos fix that without a single
human label. A small LLM often writes off-class texts or copies the prototypes (adding the label to
them), so each candidate is checked: label tags are cut off, copies and near-copies of what it was shown
are dropped, and the same LLM must label the candidate zero-shot as the class it was written for (asked
and read like an annotation: constrained and calibrated where the job's are). A class left with fewer
than half the examples asked for is asked again, then topped up with texts the LLM labels zero-shot, so
every class has the same share of the pool.

The asks are short for a small model on a CPU: each try asks a class for half its demos, of at most 40
words each; every class of a try sees the same prototypes (one prompt prefix for the server to cache), cut
to 40 words and shown as "Example:" paragraphs (shown a numbered list, the 0.5B model continues it, copying
every prototype); no new try starts once the time box (freeal.generation_time_s) has run out, and the
fallback is said plainly. Requests go through the job's annotators like any other, so reruns are answered from the
cache.
"""

from __future__ import annotations

import difflib
import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence

from freeal_stream.config import LLMConfig
from freeal_stream.llm import calibration
from freeal_stream.llm.client import ChatRequest, Completer, Ledger
from freeal_stream.llm.prompts import TEMPLATE_VERSION, dedupe_key, generation_messages, parse_generated
from freeal_stream.llm.verbalizer import Verbalizer

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int, Ledger], None] | None

MAX_TRIES = 3
MIN_TEMPERATURE = 0.7  # writing varied examples needs sampling even when annotation runs at 0
TOKENS_PER_ITEM = 64  # room for one item of prompts.ASK_WORDS (40) words plus its numbering
FALLBACK_DRAW_PER_DEMO = 4  # texts labelled zero-shot per fallback demo wanted: a rare class needs a wide draw
COPY_SHARE = 0.8  # share of the shorter text's words found in the other, in order, at which one is a copy
_WORD = re.compile(r"\w+")


def _draw(texts: Sequence[str], k: int, seed: int, attempt: int) -> list[str]:
    """A reproducible draw of prototypes, different per try (the same for every class of a try, so their
    prompts share a prefix)."""
    rng = random.Random(f"{seed}:{attempt}")
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


def _zero_shot(
    client: Completer,
    cfg: LLMConfig,
    task_description: str,
    verbalizer: Verbalizer,
    texts: Sequence[str],
    progress: ProgressFn = None,
) -> list[int | None]:
    """The LLM's zero-shot label of each text (None = no label), asked and read exactly like an annotation
    (the prompt's content-free prior is asked once and cached)."""
    if not texts:
        return []
    twins = calibration.calibration_requests(cfg, task_description, verbalizer, [])
    prior = (
        calibration.prior(verbalizer, [a for a in client.complete_many(twins) if a.content is not None])
        if twins
        else None
    )
    checks = [calibration.annotation_request(cfg, task_description, verbalizer, [], t) for t in texts]
    return [calibration.read(verbalizer, a, prior).label for a in client.complete_many(checks, progress)]


def generate_demos(
    client: Completer,
    cfg: LLMConfig,
    task_description: str,
    verbalizer: Verbalizer,
    unlabelled_texts: Sequence[str],
    prototypes: int,
    per_class: int,
    seed: int,
    progress: ProgressFn = None,
    time_box_s: float | None = None,
    say: Callable[[str], None] = log.warning,
) -> list[tuple[str, int, str]]:
    """Up to `per_class` (text, class_idx, source) demos per class; source 'generated' or 'zero-shot'.

    Each try asks for half of `per_class` texts per class (a short ask a small model answers without
    running on); a class that yields fewer than half of `per_class` validated examples is asked again with another
    prototype draw (up to MAX_TRIES in all, and no new try once `time_box_s` has passed). If it is still
    short, it is topped up with unlabelled texts that the LLM labels zero-shot as that class (source
    'zero-shot'): weaker, but every class keeps a fair share of the prompt, and still no human label is
    used. A class the LLM never picks is left out. `say` tells the user about each fallback and, at the
    end, what the pool holds per class.
    """
    if not unlabelled_texts:
        raise ValueError("demo generation needs unlabelled texts to imitate")
    deadline = None if time_box_s is None else time.monotonic() + time_box_s
    kept: dict[int, list[str]] = {c: [] for c in range(len(verbalizer))}
    enough = math.ceil(per_class / 2)
    seen: set[str] = set()
    shown: list[tuple[str, ...]] = []
    pending = list(kept)
    tries = 0
    for attempt in range(MAX_TRIES):
        if attempt and deadline is not None and time.monotonic() > deadline:
            say(
                f"demo generation: the {time_box_s:.0f} s time box (freeal.generation_time_s) ran out after "
                f"{attempt} {'try' if attempt == 1 else 'tries'}; no more tries"
            )
            break
        tries += 1
        draw = _draw(unlabelled_texts, prototypes, seed, attempt)
        requests = [
            ChatRequest.build(
                generation_messages(task_description, verbalizer, c, draw, enough),
                cfg,
                TEMPLATE_VERSION,
                temperature=max(cfg.temperature, MIN_TEMPERATURE),
                max_tokens=enough * TOKENS_PER_ITEM,
                logprobs=False,
                seed=_sampling_seed(seed, c, attempt),
            )
            for c in pending
        ]
        answers = client.complete_many(requests, progress)
        seen.update(dedupe_key(t) for t in draw)
        shown += [_words(t) for t in draw]
        candidates: list[tuple[str, int]] = []
        for c, answer in zip(pending, answers):
            fresh = []  # parsed past per_class: copies are dropped before the cap, not after
            for item in parse_generated(answer.content or "", 2 * per_class, verbalizer=verbalizer):
                key = dedupe_key(item)
                if key not in seen and not _is_near_copy(_words(item), shown):
                    seen.add(key)
                    fresh.append((item, c))
            candidates += fresh[: per_class - len(kept[c])]
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
        say(
            f"demo generation: too few usable examples for {', '.join(verbalizer.names[c] for c in pending)} "
            f"after {tries} {'try' if tries == 1 else 'tries'}; topping up with unlabelled texts the LLM labels "
            "zero-shot as such (weaker demos)"
        )
        demos += _zero_shot_demos(
            client, cfg, task_description, verbalizer, unlabelled_texts, wanted, n_draw, seed, progress
        )
    say(
        "demo pool: "
        + "; ".join(
            _pool_line(verbalizer.names[c], [src for _, cc, src in demos if cc == c]) for c in range(len(verbalizer))
        )
    )
    return demos


def _pool_line(name: str, sources: list[str]) -> str:
    if not sources:
        return f"{name}: none, generated or labelled zero-shot; going on without it"
    counts = [f"{sources.count(src)} {src}" for src in ("generated", "zero-shot") if src in sources]
    return f"{name}: {' + '.join(counts)}"


def _zero_shot_demos(
    client: Completer,
    cfg: LLMConfig,
    task_description: str,
    verbalizer: Verbalizer,
    texts: Sequence[str],
    wanted: dict[int, int],
    n_draw: int,
    seed: int,
    progress: ProgressFn = None,
) -> list[tuple[str, int, str]]:
    """Fallback demos, `wanted[c]` for class c: a seeded draw of unlabelled texts, kept where zero-shot says c.

    The draw is labelled a slice at a time (twice what is still missing) and labelling stops once every
    class has its share: a common class is filled after a few requests, only a rare one uses the whole draw.
    """
    draw = _draw(texts, n_draw, seed, -1)
    missing = dict(wanted)
    out: list[tuple[str, int, str]] = []
    start = 0
    while start < len(draw) and any(missing.values()):
        part = draw[start : start + 2 * sum(missing.values())]
        start += len(part)
        for text, verdict in zip(part, _zero_shot(client, cfg, task_description, verbalizer, part, progress)):
            if verdict is not None and missing.get(verdict, 0) > 0:  # no label, or a class already full: skip
                out.append((text, verdict, "zero-shot"))
                missing[verdict] -= 1
    order = list(wanted)
    return sorted(out, key=lambda demo: order.index(demo[1]))  # grouped by class, like the generated ones
