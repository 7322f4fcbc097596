"""What an LLM answer must look like before it is stored or used: every field checked where it enters.

A provider bills an answer once it has sent it, so a malformed one (content that is not a string, a
logprob that is not a finite number, usage that is not a sane count) must never become an exception: an
exception after payment but before storage makes every rerun pay again, and one after storage makes every
resume crash on the replayed answer. The client stores such an answer as a *no-label* answer carrying the
reason (paid once, never asked again); answers stored by older versions pass the same check when they are
read back. Missing usage is not malformed (many servers omit it): it is charged at the pre-flight estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

# No model's context comes near this: a larger figure is a bug or a lie, never a bill (the bound also
# keeps every stored count far inside a 64-bit column).
MAX_USAGE_TOKENS = 10_000_000
MAX_CANDIDATES = 64  # top logprobs per position (OpenAI allows 20)
MAX_TOKEN_CHARS = 256  # one token's text
MAX_FINISH_REASON_CHARS = 64
LOGPROB_SLACK = 1e-6  # a log probability is <= 0; servers round, so allow a hair above


class Malformed(ValueError):
    """The answer's field named in the message is not what the protocol allows."""


@dataclass(frozen=True)
class Usage:
    """Tokens one answer is charged; `estimated`: the server gave no usable figure, so the pre-flight
    estimate stands in (input ~4 characters a token, output at max_tokens: errs high)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    estimated: bool


@dataclass(frozen=True)
class Choice:
    content: str
    finish_reason: str | None
    top_logprobs: list[list[tuple[str, float]]] | None


def max_content_chars(max_tokens: int) -> int:
    """The longest answer content believed for a request capped at `max_tokens` tokens."""
    return 1000 + 64 * max_tokens


def is_logprob(value: Any) -> bool:
    """A finite number <= 0 (bools are not numbers here)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value <= LOGPROB_SLACK
    )


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _field(obj: Any, name: str, where: str) -> Any:
    """obj.name for a parsed model or a plain mapping; Malformed when obj is neither."""
    if isinstance(obj, dict):
        return obj.get(name)
    if isinstance(obj, BaseModel):
        return getattr(obj, name, None)
    raise Malformed(f"{where} is a {_kind(obj)}, not an object")


def _text(value: Any, where: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise Malformed(f"{where} is a {_kind(value)}, not a string")
    if len(value) > max_chars:
        raise Malformed(f"{where} has {len(value)} characters, over the {max_chars} believed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Malformed(f"{where} holds a lone surrogate (not Unicode text)") from None
    return value


def _list(value: Any, where: str, max_len: int) -> list[Any]:
    if not isinstance(value, list):
        raise Malformed(f"{where} is a {_kind(value)}, not a list")
    if len(value) > max_len:
        raise Malformed(f"{where} has {len(value)} entries, over the {max_len} believed")
    return value


def _candidate(token: Any, logprob: Any, where: str) -> tuple[str, float]:
    text = _text(token, f"{where}.token", MAX_TOKEN_CHARS)
    if not is_logprob(logprob):
        raise Malformed(f"{where}.logprob is {logprob!r}, not a finite number <= 0")
    return text, float(logprob)


def read_choice(choice: Any, max_tokens: int) -> Choice:
    """Content, finish reason and first-token candidates of a completion's first choice, all checked."""
    message = _field(choice, "message", "choices[0]")
    content = _field(message, "content", "choices[0].message") if message is not None else None
    finish = _field(choice, "finish_reason", "choices[0]")
    return Choice(
        content="" if content is None else _text(content, "content", max_content_chars(max_tokens)),
        finish_reason=None if finish is None else _text(finish, "finish_reason", MAX_FINISH_REASON_CHARS),
        top_logprobs=_wire_logprobs(_field(choice, "logprobs", "choices[0]"), max_tokens),
    )


def _wire_logprobs(logprobs: Any, max_tokens: int) -> list[list[tuple[str, float]]] | None:
    """Per generated token, its top candidates (or the token itself when the server lists none)."""
    if logprobs is None:
        return None
    tokens = _field(logprobs, "content", "logprobs")
    if tokens is None:
        return None
    out = []
    for i, token in enumerate(_list(tokens, "logprobs.content", max_tokens + 16)):
        where = f"logprobs.content[{i}]"
        top = _field(token, "top_logprobs", where)
        cands = [
            _candidate(
                _field(c, "token", f"{where}.top_logprobs[{j}]"),
                _field(c, "logprob", f"{where}.top_logprobs[{j}]"),
                f"{where}.top_logprobs[{j}]",
            )
            for j, c in enumerate(_list(top, f"{where}.top_logprobs", MAX_CANDIDATES) if top is not None else [])
        ]
        out.append(cands or [_candidate(_field(token, "token", where), _field(token, "logprob", where), where)])
    return out


def stored_logprobs(value: Any) -> list[list[tuple[str, float]]] | None:
    """Candidates as the store keeps them ([[token, logprob], ...] per position), checked as on the wire."""
    if value is None:
        return None
    out = []
    for i, position in enumerate(_list(value, "top_logprobs", 1 << 16)):
        cands = []
        for j, pair in enumerate(_list(position, f"top_logprobs[{i}]", MAX_CANDIDATES)):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise Malformed(f"top_logprobs[{i}][{j}] is not a [token, logprob] pair")
            cands.append(_candidate(pair[0], pair[1], f"top_logprobs[{i}][{j}]"))
        out.append(cands)
    return out


def _count(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_USAGE_TOKENS:
        raise Malformed(f"{where} is {value!r}, not a token count in [0, {MAX_USAGE_TOKENS}]")
    return value


def read_usage(usage: Any, estimate: tuple[int, int]) -> Usage:
    """Reported usage, checked; the estimate (prompt, completion) when the server reports no full figure."""
    if usage is None:
        return estimated_usage(estimate)
    prompt, completion = (_field(usage, name, "usage") for name in ("prompt_tokens", "completion_tokens"))
    prompt = None if prompt is None else _count(prompt, "usage.prompt_tokens")
    completion = None if completion is None else _count(completion, "usage.completion_tokens")
    if prompt is None or completion is None:
        return estimated_usage(estimate)
    details = _field(usage, "prompt_tokens_details", "usage")
    cached = _field(details, "cached_tokens", "usage.prompt_tokens_details") if details is not None else None
    cached = 0 if cached is None else _count(cached, "usage.prompt_tokens_details.cached_tokens")
    if cached > prompt:
        raise Malformed(f"usage.prompt_tokens_details.cached_tokens ({cached}) is over prompt_tokens ({prompt})")
    return Usage(prompt, completion, cached, estimated=False)


def estimated_usage(estimate: tuple[int, int]) -> Usage:
    return Usage(estimate[0], estimate[1], 0, estimated=True)
