"""A deterministic 'LLM' for the fake server: answers the demo job's prompts by keyword rules.

Used where a test needs an LLM whose answers are a pure function of the request (kill-and-compare
resume tests, multi-node runs, soak runs) and whose received requests can be counted. The real local
LLM (llama.cpp) is what proves that labelling works; this one proves the plumbing around it.
"""

from __future__ import annotations

import re
from typing import Any

from freeal_stream.testing.fake_openai_server import Reply, ok

KEYWORDS = {
    "billing": (
        "charge",
        "refund",
        "invoice",
        "payment",
        "bill",
        "paid",
        "pay",
        "price",
        "receipt",
        "subscription",
        "card",
        "money",
        "fee",
        "vat",
        "plan",
    ),
    "technical": (
        "error",
        "crash",
        "bug",
        "app",
        "load",
        "broken",
        "screen",
        "sync",
        "update",
        "slow",
        "button",
        "freez",
        "upload",
        "work",
        "page",
    ),
    "shipping": (
        "deliver",
        "parcel",
        "package",
        "track",
        "ship",
        "courier",
        "arriv",
        "return",
        "order",
        "box",
        "address",
        "post",
    ),
    "account": (
        "password",
        "login",
        "log in",
        "account",
        "email",
        "profile",
        "username",
        "sign",
        "privacy",
        "data",
        "two-factor",
        "delete",
    ),
}
EXAMPLES = {c: [f"Question {i} about my {w} please help" for i, w in enumerate(ws[:10])] for c, ws in KEYWORDS.items()}
_TEXT = re.compile(r"<text>\s*(.*?)\s*</text>", re.S)


def classify(text: str) -> str:
    """The class with the most keyword hits (ties: the first class in KEYWORDS' order)."""
    low = text.lower()
    scores = {c: sum(low.count(w) for w in ws) for c, ws in KEYWORDS.items()}
    return max(scores, key=lambda c: scores[c])


def respond(body: dict[str, Any]) -> Reply:
    msgs = body.get("messages", [])
    last = msgs[-1]["content"] if msgs else ""
    if "Write " in last and "NEW texts" in last:  # demo generation: n texts of the asked class
        asked = re.search(r"correct label is '(\w+)", last)
        cls = asked.group(1) if asked and asked.group(1) in EXAMPLES else "billing"
        return ok("\n".join(f"{i}. {t}" for i, t in enumerate(EXAMPLES[cls], 1)))
    m = _TEXT.search(last)
    text = m.group(1) if m else last
    if msgs and msgs[0]["content"].startswith("Rewrite the text"):
        return ok(f"In other words: {text}")
    label = classify(text)
    return ok(label, top_logprobs=[[(label, -0.1), ("billing" if label != "billing" else "account", -2.5)]])
