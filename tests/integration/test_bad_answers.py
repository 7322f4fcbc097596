"""A whole job against an endpoint that never reports usage and sends malformed answers (a logprob 'abc',
content that is a number, a list or an object, usage over 2^31 or negative): the job finishes, each
malformed answer is paid once and stored with no label and the reason, every answer is charged its
pre-flight estimate so a token cap holds, `status` says both, and a rerun resumes without a crash and
without paying for anything twice."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import yaml

from freeal_stream.store import Store
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.jobs import ROOT, cli_process, make_job
from freeal_stream.testing.keyword_llm import respond

_TEXT = re.compile(r"<text>\s*(.*?)\s*</text>", re.S)


def _content(value):
    return lambda c: c["choices"][0]["message"].update(content=value)


def _usage(prompt_tokens):
    return lambda c: c.update(usage={"prompt_tokens": prompt_tokens, "completion_tokens": 1})


def _bad_logprob(c):
    c["choices"][0]["logprobs"] = {"content": [{"token": "billing", "logprob": "abc", "top_logprobs": []}]}


FAULTS = [_bad_logprob, _content(5), _content(["billing"]), _content({"a": 1}), _usage(2**31), _usage(-500)]


class NoUsageSomeMalformed:
    """The keyword LLM with usage dropped from every answer, and every other new text's label answer
    malformed, the faults taken in turn (remembered per text: a resent request gets the same answer)."""

    def __init__(self) -> None:
        self.fault_of: dict[str, object] = {}

    def __call__(self, body):
        reply = respond(body)
        last = body["messages"][-1]["content"]
        text = _TEXT.search(last)
        fault = None
        if text and "NEW texts" not in last:
            n = len(self.fault_of)
            fault = self.fault_of.setdefault(text.group(1), FAULTS[n // 2 % len(FAULTS)] if n % 2 == 0 else None)

        def patch(completion):
            del completion["usage"]
            if fault is not None:
                fault(completion)

        reply.patch = patch
        return reply


def status(job) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "freeal_stream.cli", "status", str(job), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_malformed_answers_and_missing_usage_neither_break_a_resume_nor_pass_the_token_cap(tmp_path):
    log = tmp_path / "run.log"
    cap = 6000
    with FakeOpenAIServer(NoUsageSomeMalformed()) as server:
        job = make_job(
            tmp_path,
            6,
            llm={"base_url": server.base_url, "model": "kw", "max_tokens": 4},
            slm={"mode": "head", "epochs": 3},
            budget={"max_tokens": cap, "max_requests": None},
            freeal={"rounds": 2, "query_fraction": 0.5, "generated_per_class": 4, "demos_per_prompt": 4},
            ray={"annotators": 1, "chunk_size": 2},
        )
        assert cli_process("run", str(job), log=log).wait(timeout=600) == 0, log.read_text()[-3000:]
        first = status(job)
        sent = len(server.requests)
        # a higher cap: the rerun resumes on the stored answers (the malformed ones replayed too)
        spec = yaml.safe_load(job.read_text())
        spec["budget"]["max_tokens"] = 10 * cap
        job.write_text(yaml.safe_dump(spec, sort_keys=False))
        assert cli_process("run", str(job), log=log).wait(timeout=600) == 0, log.read_text()[-3000:]
        second = status(job)
        counts = server.hash_counts
    spent = first["spent"]
    assert 0 < spent["tokens"] <= cap and "budget" in log.read_text()  # the cap held, counted by estimate
    assert spent["charged_by_estimate"] == spent["requests"] == sent  # every answer stored, none resent
    assert spent["malformed_answers"] >= 1
    assert second["spent"]["requests"] == len(server.requests) > sent  # the rerun went on...
    assert max(counts.values()) == 1  # ...paying for nothing twice
    assert second["spent"]["malformed_answers"] > spent["malformed_answers"]
    store = Store(tmp_path / "state" / "freeal.duckdb")
    reasons = [
        r[0] for r in store.con.execute("SELECT malformed FROM llm_answers WHERE malformed IS NOT NULL").fetchall()
    ]
    no_label = store.con.execute("""SELECT count(*) FROM annotations a JOIN llm_answers l ON l.key = a.request_key
                                    WHERE l.malformed IS NOT NULL AND a.label IS NOT NULL""").fetchall()[0][0]
    store.close()
    assert no_label == 0 and {w for w in ("logprob", "content", "prompt_tokens") if any(w in r for r in reasons)} == {
        "logprob",
        "content",
        "prompt_tokens",
    }, reasons
