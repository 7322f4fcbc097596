"""A whole job in llm.mode batch against the local batch service: SIGKILL the run while a batch is in flight,
rerun, and get the uninterrupted run's labels from one submission of each request."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from freeal_stream.testing.fake_batch_api import BatchScript, FakeBatchAPI
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.jobs import ROOT, cli_process, make_job
from freeal_stream.testing.keyword_llm import respond
from tests.integration.test_resume_kill import exported_labels


def batch_job(tmp: Path, api: FakeBatchAPI) -> Path:
    tmp.mkdir()
    return make_job(
        tmp,
        12,
        llm={"base_url": api.base_url, "model": "kw", "mode": "batch", "batch_poll_s": 0.1, "batch_poll_max_s": 0.5},
        slm={"mode": "head", "epochs": 10},
        freeal={"rounds": 3, "query_fraction": 0.3, "generated_per_class": 4},
    )


def submitted(api: FakeBatchAPI) -> list[str]:
    return [
        json.loads(line)["custom_id"]
        for b in api.batches.values()
        for line in api.contents[b["input_file_id"]].splitlines()
    ]


def run_to_end(job: Path, log: Path) -> None:
    p = cli_process("run", str(job), log=log)
    assert p.wait(timeout=900) == 0, log.read_text()[-3000:]


def test_a_batch_job_killed_mid_batch_resumes_to_the_same_labels_from_one_submission(tmp_path):
    with FakeOpenAIServer(respond) as upstream:
        with FakeBatchAPI(upstream.base_url) as api:
            job = batch_job(tmp_path / "reference", api)
            run_to_end(job, tmp_path / "reference.log")
            reference, n_batches = exported_labels(job, tmp_path / "reference"), api.batches_created
        assert n_batches >= 4 and len(reference) == 48 and all(reference.values())

        with FakeBatchAPI(upstream.base_url) as api:
            held = n_batches - 1  # a late round's annotation batch
            api.script(*[BatchScript()] * (held - 1), BatchScript(hold=True))
            job = batch_job(tmp_path / "killed", api)
            log = tmp_path / "killed.log"
            p = cli_process("run", str(job), log=log)
            deadline = time.monotonic() + 600
            while not (api.batches_created == held and list(api.batches.values())[-1]["status"] == "in_progress"):
                assert p.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(0.5)  # the run has recorded the batch and is polling it
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)
            time.sleep(3)  # the dead run's store actor lets go of the state file
            status = subprocess.run(
                [sys.executable, "-m", "freeal_stream.cli", "status", str(job)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert "batches in flight: 1" in status.stdout, status.stdout + status.stderr
            api.release()  # the batch goes on at the provider while no run polls it
            run_to_end(job, log)
            assert "resuming 1 batch submission" in log.read_text()
            ids = submitted(api)
            assert len(ids) == len(set(ids)) and api.rows_run == len(ids)  # each request submitted and paid once
            assert api.batches_created == n_batches
    assert exported_labels(job, tmp_path / "killed") == reference
