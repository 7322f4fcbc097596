"""Class <-> word mapping for the LLM, strict on purpose.

An answer the verbalizer cannot map to exactly one class is 'no label' (None): FreeAL keeps such texts
apart instead of guessing, so a lenient parser here would quietly inject noise into the labels.
"""

from __future__ import annotations

import math
import re

import numpy as np

from freeal_stream.llm.answer_check import is_logprob

_EDGE_JUNK = re.compile(r"^[\W_]+|[\W_]+$")
_LEAD_TAG = re.compile(r"^(?:answer|label|category)\s*[:=\-]\s*")
_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Case-fold, collapse whitespace, strip surrounding punctuation/quotes/markdown."""
    return _EDGE_JUNK.sub("", _SPACES.sub(" ", text.casefold()).strip())


class Verbalizer:
    """Per class, the words that mean it; the first word is the one the LLM is asked to answer."""

    def __init__(self, classes: dict[str, list[str]]):
        if len(classes) < 2:
            raise ValueError("a verbalizer needs at least 2 classes")
        self.names: list[str] = list(classes)
        self.answer_words: list[str] = []
        self._word_class: dict[str, int] = {}
        for idx, (name, words) in enumerate(classes.items()):
            if not words:
                raise ValueError(f"class '{name}' has no verbalizer word")
            self.answer_words.append(words[0])
            for word in words:
                key = normalise(word)
                if not key:
                    raise ValueError(f"verbalizer word {word!r} of class '{name}' has no letters or digits")
                if self._word_class.get(key, idx) != idx:
                    other = self.names[self._word_class[key]]
                    raise ValueError(f"verbalizer word {word!r} is used by both '{other}' and '{name}'")
                self._word_class[key] = idx

    def __len__(self) -> int:
        return len(self.names)

    @property
    def words(self) -> list[str]:
        """Every class word, normalised."""
        return list(self._word_class)

    def parse(self, text: str | None) -> int | None:
        """The class the answer names, or None unless it is exactly one class word (after normalising).

        Anything but a string is no label: a replayed answer must never crash a resume."""
        if not isinstance(text, str):
            return None
        answer = normalise(_LEAD_TAG.sub("", normalise(text)))
        return self._word_class.get(answer)

    def grammar(self) -> str:
        """A GBNF grammar (llama.cpp's `grammar` field) whose only sentences are the answer words, so a
        constrained answer is always exactly one class word: no 'no label' answers."""
        quoted = (w.replace("\\", "\\\\").replace('"', '\\"') for w in self.answer_words)
        return "root ::= " + " | ".join(f'"{w}"' for w in quoted)

    def probs_from_logprobs(self, top_logprobs: list[list[tuple[str, float]]] | None) -> np.ndarray | None:
        """Class probabilities from the first generated token's top candidates, or None if none maps.

        A candidate counts for a class when it is a non-empty prefix of words of that class only
        (tokenizers often split 'positive' into 'pos' + 'itive'); ambiguous prefixes are skipped, and so
        is any candidate that is not a (token, finite logprob <= 0) pair (answer_check's rule).
        """
        if not isinstance(top_logprobs, list) or not top_logprobs or not isinstance(top_logprobs[0], list):
            return None
        mass = np.zeros(len(self.names))
        for cand in top_logprobs[0]:
            if not isinstance(cand, (tuple, list)) or len(cand) != 2:
                continue
            token, logprob = cand
            if not isinstance(token, str) or not is_logprob(logprob):
                continue
            piece = normalise(token)
            if not piece:
                continue
            owners = {c for word, c in self._word_class.items() if word.startswith(piece)}
            if len(owners) == 1:
                mass[owners.pop()] += math.exp(min(logprob, 0.0))
        total = mass.sum()
        return mass / total if total > 0 else None
