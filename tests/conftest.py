"""Test setup shared by tests/unit (fast, in process) and tests/integration (real Ray, real servers, the CLI in
its own process; marked `integration`, so `pytest -m "not integration"` runs the quick part alone)."""

from __future__ import annotations

import os

import pytest

# What the Makefile exports, for a bare `pytest` too: no model hub, llama.cpp's threads sleep when idle (2 cores).
for _name, _value in {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_name, _value)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
