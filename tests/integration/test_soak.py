"""A bounded soak: a few minutes of continuous ingestion while rounds run against a fault-injecting endpoint.
FREEAL_SOAK_SECONDS sets the ingestion time (default 120); bench/bench_soak.py runs it longer."""

from __future__ import annotations

import os

from freeal_stream.testing.soak import run_soak


def test_soak_every_item_labelled_once_and_the_ledger_adds_up(tmp_path):
    r = run_soak(tmp_path, float(os.environ.get("FREEAL_SOAK_SECONDS", "120")))
    assert r["rc"] == 0, r["log_tail"]
    assert r["items_sent"] > 50 and r["rounds_done"] >= 3, r
    assert r["items_stored"] == r["initial_items"] + r["items_sent"]  # repeats added nothing
    assert r["lost"] == 0 and r["unlabelled"] == 0 and r["labelled_more_than_once"] == 0
    assert len(r["faults_injected"]) >= 6, r["faults_injected"]  # most kinds really played
    assert r["duplicate_requests_paid"] == 0  # no request answered twice
    assert r["stored_answers"] == r["paid_answers"]  # every paid answer is on the books
    assert r["requests_received"] == sum(r["faults_injected"].values()) + r["real_answers"]
