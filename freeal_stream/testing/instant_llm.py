"""An instant OpenAI-compatible LLM on 127.0.0.1 for benchmarks: answers from a table, as fast as it can.

It stands in for a hosted API whose latency is not the point (annotation throughput, a million texts) or whose
answers are known in advance (MR's real GPT-3.5 labels, replayed). The answer to a labelling prompt is looked
up by the text between the last `<text>` tags:

- `labels`: text -> class word to answer (a replayed LLM); texts not in the table get `default`;
- with `accuracy` < 1 the table holds the *right* class and the server answers it with that probability, else
  another class, decided by a hash of the text (a simulated LLM of stated accuracy, the same on every run).

Demo-generation prompts ("Write N NEW texts whose correct label is 'x'") are answered with N table texts of
that class, so a job's round 1 works as with a real model. Usage is reported (prompt tokens ~ characters / 4).

    python -m freeal_stream.testing.instant_llm --table answers.jsonl [--accuracy 0.9] [--port 0]

prints `listening on http://127.0.0.1:PORT/v1` and serves until killed. `table` is JSON lines of
{"text": ..., "label": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

_TEXT = re.compile(r"<text>\n?(.*?)\n?</text>", re.S)
_GENERATE = re.compile(r"Write (\d+) NEW texts whose correct label is '([^']+)'")
_CLASS_WORDS = re.compile(r"Answer with exactly one of these words: (.*?)\. Reply")


def _unit(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by the text: the same answer on every run."""
    return int.from_bytes(hashlib.sha1((salt + text).encode()).digest()[:8], "big") / 2**64


class InstantLLM:
    """The answering logic, apart from HTTP (so tests can call it directly)."""

    def __init__(self, labels: Mapping[str, str], accuracy: float = 1.0, default: str | None = None):
        self.labels, self.accuracy, self.default = dict(labels), accuracy, default
        self.by_class: dict[str, list[str]] = {}
        for text, label in self.labels.items():
            self.by_class.setdefault(label, []).append(text)
        self.requests = 0

    def answer(self, body: dict) -> dict:
        self.requests += 1
        messages = body.get("messages") or []
        last = str(messages[-1].get("content", "")) if messages else ""
        system = str(messages[0].get("content", "")) if messages else ""
        asked = _GENERATE.search(last)
        if asked:
            n, label = int(asked.group(1)), asked.group(2).split(" (")[0]
            pool = self.by_class.get(label, [])
            start = int(_unit(last, "gen") * max(1, len(pool)))
            content = "\n".join(f"{i + 1}. {pool[(start + i) % len(pool)]}" for i in range(min(n, len(pool))))
        else:
            content = self._label(last, system)
        prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        if body.get("logprobs"):
            choice["logprobs"] = {
                "content": [
                    {
                        "token": content,
                        "logprob": math.log(0.9),
                        "bytes": None,
                        "top_logprobs": [{"token": content, "logprob": math.log(0.9), "bytes": None}],
                    }
                ]
            }
        return {
            "id": f"chatcmpl-{self.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "instant"),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_chars // 4 + 1,
                "completion_tokens": 1,
                "total_tokens": prompt_chars // 4 + 2,
            },
        }

    def _label(self, last: str, system: str) -> str:
        found = _TEXT.findall(last)
        text = found[-1] if found else last
        right = self.labels.get(text, self.default or "")
        if self.accuracy >= 1.0 or not right:
            return right
        if _unit(text, "acc") < self.accuracy:
            return right
        listed = _CLASS_WORDS.search(system)
        words = [w.strip() for w in (listed.group(1).split(",") if listed else self.by_class)]
        others = [w for w in words if w != right] or [right]
        return others[int(_unit(text, "wrong") * len(others))]


def app_for(llm: InstantLLM) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        return web.json_response(llm.answer(await request.json()))

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "instant", "object": "model"}]})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


def load_table(path: Path) -> dict[str, str]:
    table = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                table[row["text"]] = row["label"]
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", type=Path, required=True, help="JSON lines of {text, label}")
    ap.add_argument("--accuracy", type=float, default=1.0, help="answer the table's label with this probability")
    ap.add_argument("--default", default=None, help="answer for texts not in the table")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    llm = InstantLLM(load_table(args.table), args.accuracy, args.default)

    async def serve() -> None:
        runner = web.AppRunner(app_for(llm), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
        await site.start()
        port = runner.addresses[0][1]
        print(f"listening on http://127.0.0.1:{port}/v1", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
