from pathlib import Path

import pytest

from freeal_stream.config import ConfigError, load_job, parse_job

BASE = {
    "name": "t",
    "data": {"path": "x.csv"},
    "task": {"description": "d", "classes": {"pos": "positive", "neg": ["negative", "bad"]}},
}


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


@pytest.mark.parametrize(
    "classes, problem",
    [
        ({"a": ["billing"], "b": ["billing!"]}, "used by both"),
        ({"a": ["straße"], "b": ["strasse"]}, "used by both"),
        ({"a": ["Account"], "b": ["  account  "]}, "used by both"),
        ({"a": ["!!!"], "b": ["ok"]}, "no letters or digits"),
        ({"a": ["ok"], "b": ["**"]}, "no letters or digits"),
    ],
)
def test_class_words_that_collide_after_normalising_are_refused_before_any_work(classes, problem):
    """The verbalizer's own rule: these passed validation, then crashed once Ray had started."""
    e = err(with_(task={"description": "d", "classes": classes}))
    assert e.field_path == "task" and problem in e.problem


@pytest.mark.parametrize("state_dir", ["/", "/etc", "/tmp", "/usr/", "~", "/home", "..", "/var/../etc"])
def test_a_dangerous_state_dir_is_refused(state_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    job_file = tmp_path / "home" / "jobs" / "job.yaml"
    with pytest.raises(ConfigError) as e:
        parse_job(with_(state_dir=state_dir), job_file if state_dir == ".." else "job.yaml")
    assert e.value.field_path == "state_dir" and "Fix:" in str(e.value)


@pytest.mark.parametrize(
    "state_dir", ["x/{0}", "x/{}", "x/{other}", "x/{name", "x/{name.__class__}", "x/{name[0]}", "x/{name!r}"]
)
def test_a_state_dir_with_a_bad_placeholder_is_a_config_error(state_dir):
    e = err(with_(state_dir=state_dir))
    assert e.field_path == "state_dir" and "{name}" in e.fix


def test_a_state_dir_may_hold_name_and_literal_braces(tmp_path):
    job = parse_job(with_(state_dir=str(tmp_path / "s-{name}" / "{{x}}")), "job.yaml")
    assert job.state_path == tmp_path / "s-t" / "{x}"


def test_a_yaml_alias_bomb_is_refused_at_load(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        "name: t\ndata: {path: x.csv}\ntask: {description: d, classes: {a: [a], b: [b]}}\n"
        "strategy:\n  name: random\n  params:\n" + "".join(f"    {line}\n" for line in levels)
    )
    with pytest.raises(ConfigError) as e:
        load_job(bomb)
    assert "expand to more than" in e.value.problem


def test_aliases_of_modest_size_are_still_allowed(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text(
        "name: t\ndata: {path: x.csv}\ntask: {description: d, classes: {a: &w [a], b: [b]}}\n"
        "budget:\n  prices:\n    m1: &p {input: 1.0, output: 2.0}\n    m2: *p\n"
    )
    assert load_job(ok).budget.prices["m2"].output == 2.0


@pytest.mark.parametrize(
    "text, problem",
    [
        ("a: &a [*a]\n", "refers to itself"),
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ],
)
def test_a_self_referring_or_deeply_nested_job_file_is_a_config_error(tmp_path, text, problem):
    path = tmp_path / "j.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_job(path)
    assert problem in e.value.problem


def test_a_huge_job_file_is_refused_unread(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text("name: t\n" + "#" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="over 1 MiB"):
        load_job(path)


def test_the_hosted_example_job_is_valid_and_keeps_its_key_out_of_the_file():
    job = load_job("jobs/example_hosted.yaml")
    assert job.llm.base_url.startswith("https://") and job.llm.api_key_env == "OPENAI_API_KEY"
    assert Path(job.data.path).is_file() and job.llm.model in job.budget.prices and job.budget.max_cost
