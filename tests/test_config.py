from pathlib import Path

import pytest

from freeal_stream.config import ConfigError, load_job, parse_job

BASE = {"name": "t", "data": {"path": "x.csv"},
        "task": {"description": "d", "classes": {"pos": "positive", "neg": ["negative", "bad"]}}}


def with_(**sections):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


def err(raw) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse_job(raw, "job.yaml")
    return e.value


def test_defaults_and_single_word_verbalizer():
    job = parse_job(BASE, "/jobs/job.yaml")
    assert job.task.classes == {"pos": ["positive"], "neg": ["negative", "bad"]}
    assert job.data.path == "/jobs/x.csv"
    assert str(job.state_path) == "/jobs/.freeal/t"
    assert job.freeal.tau == 0.7 and job.freeal.schedule == "budgeted"


def test_unknown_key_names_field_and_suggests():
    e = err(with_(freeal={"taus": 0.5}))
    assert e.file == "job.yaml" and e.field_path == "freeal.taus" and "tau" in e.fix


def test_missing_required_field():
    raw = dict(BASE)
    del raw["task"]
    assert err(raw).field_path == "task"


def test_wrong_type_and_range():
    assert err(with_(freeal={"tau": "high"})).field_path == "freeal.tau"
    assert err(with_(freeal={"tau": 1.5})).field_path == "freeal.tau"
    assert err(with_(llm={"concurrency": True})).field_path == "llm.concurrency"


def test_bad_literal_lists_choices():
    e = err(with_(slm={"mode": "fast"}))
    assert e.field_path == "slm.mode" and "'finetune'" in e.fix
    e = err(with_(freeal={"label_of_record": "majority"}))
    assert e.field_path == "freeal.label_of_record" and "'slm'" in e.fix


def test_shared_verbalizer_word_rejected():
    e = err(with_(task={"description": "d", "classes": {"a": "x", "b": ["y", "x"]}}))
    assert "used by both" in e.problem


def test_api_key_in_job_is_refused():
    assert err(with_(llm={"api_key_env": "sk-abc123"})).field_path == "llm.api_key_env"


def test_load_job_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)


def test_demo_job_is_valid():
    job = load_job("jobs/demo.yaml")
    assert len(job.task.classes) == 4 and job.llm.base_url is None


def test_the_hosted_example_job_is_valid_and_keeps_its_key_out_of_the_file():
    job = load_job("jobs/example_hosted.yaml")
    assert job.llm.base_url.startswith("https://") and job.llm.api_key_env == "OPENAI_API_KEY"
    assert Path(job.data.path).is_file() and job.llm.model in job.budget.prices and job.budget.max_cost
