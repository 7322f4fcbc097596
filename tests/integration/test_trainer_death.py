"""A trainer actor killed mid-training is replaced and the round trains again (training has no side effects)."""

from __future__ import annotations

import io
import threading
import time

import ray

from freeal_stream.config import load_job
from freeal_stream.intake import ingest
from freeal_stream.loop import FreeALRun
from freeal_stream.progress import Progress
from freeal_stream.session import open_session
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.jobs import make_job
from freeal_stream.testing.keyword_llm import respond


def test_killed_trainer_is_replaced(tmp_path):
    ray.shutdown()
    out = io.StringIO()
    progress = Progress(stream=out)
    with FakeOpenAIServer(respond) as server:
        job = load_job(
            make_job(
                tmp_path,
                6,
                llm={"base_url": server.base_url, "model": "kw"},
                slm={"mode": "head", "epochs": 10},
                freeal={"rounds": 1, "query_fraction": 0.5, "generated_per_class": 3},
            )
        )
        with open_session(job, progress) as session:
            ingest(job, session.store, progress)
            first = session.trainer

            def kill_when_training():
                while "[round 1 train] epoch 2/" not in out.getvalue():
                    time.sleep(0.02)
                ray.kill(first, no_restart=True)

            killer = threading.Thread(target=kill_when_training, daemon=True)
            killer.start()
            rounds = FreeALRun(session, progress).run()
            killer.join(timeout=5)
            assert session.trainer is not first and session.trainer_restarts == 1
            labelled = sum(1 for r in session.store.labels_rows("llm") if r[4] is not None)
    assert "the trainer actor died; starting a new one" in out.getvalue()
    assert "calibration skipped: 12 LLM labels, fewer than 10 a class" in out.getvalue()  # 4 classes: 40 needed
    assert [m["round"] for m in rounds] == [1] and labelled == 24
