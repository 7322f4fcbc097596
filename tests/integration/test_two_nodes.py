"""The work really spreads: a second Ray node on this machine, annotators and scorers pinned to it."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from freeal_stream.actors.runtime import loopback_only_ray
from freeal_stream.config import load_job
from freeal_stream.intake import ingest
from freeal_stream.loop import FreeALRun
from freeal_stream.progress import Progress
from freeal_stream.session import open_session
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.jobs import make_job
from freeal_stream.testing.keyword_llm import respond


@pytest.fixture
def two_nodes():
    ray.shutdown()
    loopback_only_ray()  # both nodes on 127.0.0.1: a cluster joined without Ray's token auth stays local
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, resources={"annotator": 4, "scorer": 1})
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_a_job_runs_across_two_nodes_with_pinned_workers(tmp_path, two_nodes):
    cluster, worker = two_nodes
    with FakeOpenAIServer(respond) as server:
        job = load_job(
            make_job(
                tmp_path,
                6,
                llm={"base_url": server.base_url, "model": "kw", "concurrency": 2},
                slm={"mode": "head", "epochs": 3},
                freeal={"rounds": 2, "query_fraction": 0.5, "generated_per_class": 3},
                ray={"annotators": 2, "annotator_resources": {"annotator": 1}, "scorer_resources": {"scorer": 1}},
            )
        )
        with open_session(job, Progress(), cluster.address) as session:
            assert set(session.annotators.node_ids()) == {worker.node_id}
            assert set(session.scorers.node_ids()) == {worker.node_id}
            head = ray.get_runtime_context().get_node_id()
            assert ray.get(session.store.handle.node_id.remote()) == head != worker.node_id  # next to the state
            ingest(job, session.store, Progress())
            rounds = FreeALRun(session, Progress()).run()
            labelled = [r for r in session.store.labels_rows("llm") if r[4] is not None]
            n_items = session.store.count_items()
    assert [m["round"] for m in rounds] == [1, 2]
    assert len(labelled) == n_items == 24
    assert len(server.requests) > 0
