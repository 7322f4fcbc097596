"""Job YAML -> validated, typed config objects.

Every section is a frozen dataclass; one generic walker checks unknown keys, missing fields, types and
ranges, so an error always names the file, the field and the fix before any work (or money) is spent.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from freeal_stream.errors import UserError
from freeal_stream.llm.verbalizer import Verbalizer


class ConfigError(UserError):
    """A job file problem, phrased as: file, field, what is wrong, how to fix it."""

    def __init__(self, file: str | Path, field_path: str, problem: str, fix: str):
        self.file, self.field_path, self.problem, self.fix = str(file), field_path, problem, fix
        super().__init__(f"{file}: field '{field_path}': {problem}. Fix: {fix}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class DataConfig:
    """Where the texts come from. `gold_column` is read only to print accuracy, never to train."""

    path: str
    text_column: str = "text"
    format: Literal["auto", "csv", "jsonl", "parquet"] = "auto"
    id_column: str | None = None
    augmented_column: str | None = None
    gold_column: str | None = None
    # Texts longer than this are kept whole in the store but flagged, and prompts show only their first
    # max_text_chars characters (cut back to a word boundary, then " [...]"). 1000 characters (~250
    # tokens) lets the query and 10 demos fit the default 4096-token context with room to spare.
    max_text_chars: int = 1000

    def validate(self) -> None:
        _check(bool(self.text_column.strip()), "text_column must name a column")
        _check(self.max_text_chars >= 50, "max_text_chars must be >= 50")
        _check(self.id_column is None or self.id_column != self.text_column, "id_column must differ from text_column")


@dataclass(frozen=True)
class TaskConfig:
    """The task description and, per class, its verbalizer words (the first is the answer asked for)."""

    description: str
    classes: dict[str, list[str]]

    def validate(self) -> None:
        """The verbalizer's own rule, before any work: words that collide once normalised ('billing' and
        'billing!', 'straße' and 'strasse') or that hold no letter or digit ('!!!') are refused."""
        Verbalizer(self.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)


@dataclass(frozen=True)
class LLMConfig:
    """An OpenAI-compatible chat endpoint. `base_url: null` starts the embedded llama.cpp server."""

    base_url: str | None = None
    model: str = "qwen2.5-coder-1.5b-instruct"  # with base_url null: 10-19 points better than the 0.5B on
    # MR and SUBJ at ~2.2x the time per label (BENCHMARKS.md section 11)
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 8
    logprobs: bool = True
    top_logprobs: int = 20  # OpenAI's maximum: every class word's first token among them (calibration)
    grammar: bool | None = None  # answers restricted to the class words by a GBNF grammar (llama.cpp's
    # `grammar` field); null = for the embedded server only
    calibrate: bool = False  # contextual calibration of the class probabilities (llm/calibration.py):
    # off, as it cost accuracy on MR and SUBJ with both local models
    # (BENCHMARKS.md section 11)
    concurrency: int = 1
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    timeout_s: float = 120.0
    max_retries: int = 5
    circuit_failures: int = 5  # consecutive failures (any request) that open the circuit breaker
    circuit_cooldown_s: float = 5.0  # first pause once open; doubles while probes keep failing
    give_up_after_s: float = 300.0  # failing this long means the endpoint is dead: the run stops
    server_threads: int = 0
    context_size: int = 4096
    # 'batch': requests go through the provider's files + batches API (OpenAI: half price, within 24 h)
    mode: Literal["live", "batch"] = "live"
    batch_poll_s: float = 10.0  # first wait between polls of the batches in flight; x1.5 per poll...
    batch_poll_max_s: float = 120.0  # ...up to this
    batch_max_wait_s: float = 93600.0  # a run waits this long for its batches (24 h window + 2 h), then stops;
    # they stay recorded, and the next run resumes polling them
    batch_max_requests: int = 50000  # requests per input file (OpenAI's cap; files also stay under 200 MB)
    batch_enqueued_tokens: int = 0  # the provider's enqueued-token limit for the model (0 = none): the
    # prompt tokens of this job's batches in flight stay under it

    @property
    def constrained(self) -> bool:
        """Whether answers are restricted to the class words (llm.grammar; the embedded server by default)."""
        return self.grammar if self.grammar is not None else self.base_url is None

    @property
    def calibrated(self) -> bool:
        """Whether class probabilities are calibrated (llm.calibrate, which needs logprobs)."""
        return self.logprobs and self.calibrate

    def validate(self) -> None:
        _check(0.0 <= self.temperature <= 2.0, "temperature must be in [0, 2]")
        _check(
            self.mode == "live" or bool(self.base_url),
            "mode 'batch' needs base_url: an endpoint with the OpenAI files and batches API (the embedded "
            "server has none)",
        )
        _check(
            0 < self.batch_poll_s <= self.batch_poll_max_s and self.batch_max_wait_s > 0,
            "batch_poll_s must be > 0 and <= batch_poll_max_s, and batch_max_wait_s > 0",
        )
        _check(1 <= self.batch_max_requests <= 50000, "batch_max_requests must be in [1, 50000]")
        _check(self.batch_enqueued_tokens >= 0, "batch_enqueued_tokens must be >= 0 (0 = no limit)")
        _check(not (self.calibrate and not self.logprobs), "calibrate needs logprobs: true")
        _check(self.max_tokens >= 1, "max_tokens must be >= 1")
        _check(0 <= self.top_logprobs <= 20, "top_logprobs must be in [0, 20]")
        _check(self.concurrency >= 1, "concurrency must be >= 1")
        _check(
            self.requests_per_minute >= 0 and self.tokens_per_minute >= 0, "rate limits must be >= 0 (0 = unlimited)"
        )
        _check(self.timeout_s > 0, "timeout_s must be > 0")
        _check(self.max_retries >= 0, "max_retries must be >= 0")
        _check(self.circuit_failures >= 1, "circuit_failures must be >= 1")
        _check(
            self.circuit_cooldown_s >= 0 and self.give_up_after_s > 0,
            "circuit_cooldown_s must be >= 0 and give_up_after_s > 0",
        )
        _check(
            self.api_key_env.replace("_", "").isalnum(),
            "api_key_env is the NAME of an environment variable (e.g. OPENAI_API_KEY), never the key",
        )
        _check(
            not self.api_key_env.startswith("sk-"),
            "api_key_env looks like an API key; put the key in the environment and name the variable here",
        )


# slm.encoder's special values: the static encoder distilled from MiniLM (slm/static_encoder.py), and the
# choice between MiniLM and it by pool size (slm/encoder.py: choose_encoder).
STATIC_ENCODER = "minilm-static"
AUTO_ENCODER = "auto"


@dataclass(frozen=True)
class SLMConfig:
    """The small model. `mode: auto` fine-tunes when the pool is at most `finetune_max_items` texts and has
    at least `finetune_min_labels` LLM labels, else trains a head on frozen embeddings. `encoder: auto` uses
    MiniLM for pools of at most `static_above_items` texts and the static encoder above."""

    encoder: str = "all-MiniLM-L6-v2"
    static_above_items: int = 100_000
    mode: Literal["auto", "finetune", "head"] = "auto"
    finetune_max_items: int = 30000
    finetune_min_labels: int = 1000
    views: Literal["auto", "column", "perturb", "llm"] = "auto"
    max_length: int = 64
    batch_size: int = 32
    learning_rate: float = 5e-5
    head_learning_rate: float = 1e-3
    head_hidden: int = 256
    epochs: int = 4
    threads: int = 1
    device: str = "auto"

    def validate(self) -> None:
        _check(self.max_length >= 8, "max_length must be >= 8")
        _check(self.batch_size >= 2, "batch_size must be >= 2")
        _check(self.learning_rate > 0 and self.head_learning_rate > 0, "learning rates must be > 0")
        _check(self.epochs >= 1, "epochs must be >= 1")
        _check(self.threads >= 1, "threads must be >= 1")
        _check(self.head_hidden >= 0, "head_hidden must be >= 0 (0 = linear head)")
        _check(self.static_above_items >= 0, "static_above_items must be >= 0")
        _check(
            not (self.encoder == STATIC_ENCODER and self.mode == "finetune"),
            f"encoder '{STATIC_ENCODER}' is a static model with nothing to fine-tune; use mode head (or auto, "
            "which trains a head on it), or a transformer encoder such as all-MiniLM-L6-v2 for mode finetune",
        )


@dataclass(frozen=True)
class FreeALConfig:
    """The method's knobs, named as in the paper (m, tau, R, k, Beta, warm-up, rounds, P, Q)."""

    schedule: Literal["full", "budgeted"] = "budgeted"
    demos_per_prompt: int = 10  # m
    demo_group_size: int = 8  # queries sharing one retrieved demo block (prompt-prefix reuse)
    tau: float = 0.7  # GMM clean threshold
    clean_ratio: float = 0.2  # R
    medoids_per_class: int = 50  # k
    mixup_alpha: float = 4.0  # Beta(a, a)
    warmup_epochs: int | None = None  # epochs of plain CE before the first clean/noisy split; null = by
    # how many labels the SLM learns from (slm.trainer.resolve_warmup)
    rampup_epochs: int = 2
    rounds: int = 3
    query_fraction: float = 0.1  # P
    prototypes: int = 20  # Q, texts shown when generating demos
    generated_per_class: int = 10
    generation_time_s: float | None = 120.0  # no new demo-generation try after this; the short classes are
    # then topped up with texts labelled zero-shot (null = no limit)
    # Whose label stands where the LLM labelled a text (texts it never labelled get the SLM's under every rule):
    # 'llm' (default): the LLM's always; 'auto': the SLM's prediction where its calibrated probability of being
    # right beats the LLM label's (both judged given both models' labels, docs/METHOD.md section 7); 'slm': the
    # SLM's wherever it put the LLM's label in its noisy split (`disputed`). With GPT-3.5's MR labels 'auto' was
    # 0-0.3 pt below 'llm' at every round, never above (BENCHMARKS.md, "Export quality per LLM spend"), so 'llm'
    # stays the default; 'slm' where the SLM is the stronger model (the demo's 0.5B LLM, section 8b).
    label_of_record: Literal["llm", "slm", "auto"] = "llm"
    # Stop sending texts to the LLM once the export's estimated accuracy (the lower end of its interval) reaches
    # this; null = spend the rounds and budget given.
    target_accuracy: float | None = None

    def validate(self) -> None:
        _check(self.demos_per_prompt >= 0, "demos_per_prompt must be >= 0")
        _check(self.demo_group_size >= 1, "demo_group_size must be >= 1 (1 = retrieve per query)")
        _check(0.0 < self.tau < 1.0, "tau must be in (0, 1)")
        _check(0.0 < self.clean_ratio <= 1.0, "clean_ratio must be in (0, 1]")
        _check(self.medoids_per_class >= 1, "medoids_per_class must be >= 1")
        _check(self.mixup_alpha > 0, "mixup_alpha must be > 0")
        _check(
            (self.warmup_epochs or 0) >= 0 and self.rampup_epochs >= 0,
            "warmup_epochs and rampup_epochs must be >= 0 (warmup_epochs null = chosen by label count)",
        )
        _check(self.rounds >= 1, "rounds must be >= 1")
        _check(0.0 < self.query_fraction <= 1.0, "query_fraction must be in (0, 1]")
        _check(
            self.prototypes >= 1 and self.generated_per_class >= 1, "prototypes and generated_per_class must be >= 1"
        )
        _check(
            self.generation_time_s is None or self.generation_time_s > 0,
            "generation_time_s must be > 0 (null = no time box)",
        )
        _check(
            self.target_accuracy is None or 0.0 < self.target_accuracy <= 1.0,
            "target_accuracy must be in (0, 1] (a share of the pool labelled right) or null",
        )


@dataclass(frozen=True)
class Price:
    """A model's token prices, in money units (e.g. USD) per million tokens."""

    input: float
    output: float
    cached_input: float | None = None  # null = same as input
    batch_discount: float = 0.5  # share off all three in llm.mode batch (OpenAI's Batch API: 50%)

    def validate(self) -> None:
        _check(self.input >= 0 and self.output >= 0 and (self.cached_input or 0) >= 0, "prices must be >= 0")
        _check(0.0 <= self.batch_discount < 1.0, "batch_discount must be in [0, 1)")


@dataclass(frozen=True)
class BudgetConfig:
    """Hard caps on what the LLM may cost; null = no cap. `max_cost` needs a price for the job's model."""

    max_requests: int | None = None
    max_tokens: int | None = None
    max_cost: float | None = None
    prices: dict[str, Price] = field(default_factory=dict)  # model name -> per-million-token prices

    def validate(self) -> None:
        for name in ("max_requests", "max_tokens", "max_cost"):
            v = getattr(self, name)
            _check(v is None or v >= 0, f"{name} must be >= 0 or null")


@dataclass(frozen=True)
class RayConfig:
    """Where the actors run. No address (and no RAY_ADDRESS) = a local Ray started for the job."""

    address: str | None = None
    local_cpus: int = 0  # CPUs of the local Ray; 0 = all of this machine's
    annotators: int = 2  # annotator actors; they split the job's concurrency and rate limits
    scorers: int = 1  # embedding / batch-inference actors
    chunk_size: int = 16  # requests per annotator task (prompts sharing a prefix stay together)
    max_restarts: int = 5  # replacements of dead actors per run before it gives up
    annotator_resources: dict[str, float] = field(default_factory=dict)  # e.g. {annotator: 1} to pin
    scorer_resources: dict[str, float] = field(default_factory=dict)
    trainer_resources: dict[str, float] = field(default_factory=dict)
    trainer_gpu: Literal["auto", "always", "never"] = "auto"  # auto = a GPU when the cluster has one

    def validate(self) -> None:
        _check(self.local_cpus >= 0, "local_cpus must be >= 0 (0 = all)")
        _check(self.annotators >= 1 and self.scorers >= 1, "annotators and scorers must be >= 1")
        _check(self.chunk_size >= 1, "chunk_size must be >= 1")
        _check(self.max_restarts >= 0, "max_restarts must be >= 0")


@dataclass(frozen=True)
class ServiceConfig:
    """`freeal-stream serve`: where data comes in and what starts a round."""

    host: str = "127.0.0.1"  # any other address needs a bearer token (token_env)
    port: int = 8765  # 0 = any free port (the URL is written to state_dir/service.json)
    token_env: str = "FREEAL_SERVICE_TOKEN"
    allowed_hosts: list[str] = field(default_factory=list)  # more Host names the API answers to; "*" = any
    inbox: str | None = None  # folder watched for new data files; null = state_dir/inbox
    min_new_items: int = 1  # a round starts once this many never-annotated items wait...
    round_every_s: float = 0.0  # ...or, when > 0, at most this long after the first one arrived
    poll_s: float = 1.0  # how often the inbox and the pool are looked at

    def validate(self) -> None:
        _check(0 <= self.port <= 65535, "port must be in [0, 65535]")
        _check(all(h.strip() for h in self.allowed_hosts), "allowed_hosts must be host names, e.g. [labels.example]")
        _check(self.min_new_items >= 1, "min_new_items must be >= 1")
        _check(self.round_every_s >= 0 and self.poll_s > 0, "round_every_s must be >= 0 and poll_s > 0")


@dataclass(frozen=True)
class StrategyConfig:
    """Which query strategy picks each budgeted round's texts, and its parameters."""

    name: str = "random"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobConfig:
    """A whole job. Relative paths are resolved against the job file's folder."""

    name: str
    data: DataConfig
    task: TaskConfig
    llm: LLMConfig = field(default_factory=LLMConfig)
    slm: SLMConfig = field(default_factory=SLMConfig)
    freeal: FreeALConfig = field(default_factory=FreeALConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    state_dir: str = ".freeal/{name}"
    seed: int = 0
    source_file: str = field(default="", compare=False)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir.format(name=self.name))

    @property
    def data_path(self) -> Path:
        return Path(self.data.path)

    @property
    def inbox_path(self) -> Path:
        return Path(self.service.inbox) if self.service.inbox else self.state_path / "inbox"


_FIXES = {
    "path": "give the data file's path, relative to the job file",
    "classes": "write e.g. 'classes: {positive: [positive, good], negative: [negative, bad]}'",
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, file: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted to the dataclass/typed form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, file)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                file, where, f"'{value}' is not allowed", "use one of: " + ", ".join(repr(a) for a in args)
            )
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, where, file)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(
                file,
                where,
                f"expected a mapping, got {type(value).__name__}",
                _FIXES.get(where.rsplit(".", 1)[-1], "write it as 'key: value' lines"),
            )
        kt, vt = args
        return {_coerce(k, kt, f"{where}.{k}", file): _coerce(v, vt, f"{where}.{k}", file) for k, v in value.items()}
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]  # a single verbalizer word may be written without a list
        if not isinstance(value, list):
            raise ConfigError(
                file, where, f"expected a list, got {type(value).__name__}", "write it as [a, b] or as '- a' lines"
            )
        return [_coerce(v, args[0], f"{where}[{i}]", file) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(
            file,
            where,
            f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}",
            f"write a {_type_name(tp)} value",
        )
    return value


def _build(cls: type, raw: Any, where: str, file: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            file,
            where or "(top level)",
            f"expected a mapping, got {type(raw).__name__}",
            "write the section as 'key: value' lines",
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "allowed: " + ", ".join(fields)
            raise ConfigError(file, f"{where}.{key}".lstrip("."), "unknown key", hint)
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}".lstrip(".")
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(
                    file,
                    path,
                    "missing required field",
                    _FIXES.get(name, f"add '{name}:' to the '{where or 'top'}' section"),
                )
            continue
        kwargs[name] = _coerce(raw[name], hints[name], path, file)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            msg = str(e)
            first = msg.split(" ", 1)[0]
            sub = f"{where}.{first}".lstrip(".") if first in fields else (where or "(top level)")
            raise ConfigError(file, sub, msg, "change the value in the job file") from None
    return obj


def parse_job(raw: dict[str, Any], file: str | Path = "<job>") -> JobConfig:
    """Validate a job given as a dict (as read from YAML); relative paths resolve against `file`'s folder."""
    file = str(file)
    job: JobConfig = _build(JobConfig, raw, "", file)
    if not job.name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(file, "name", f"'{job.name}' is not a simple name", "use letters, digits, '-' and '_'")
    base = Path(file).resolve().parent if file != "<job>" else Path.cwd()
    data_path = Path(os.path.expanduser(job.data.path))
    state = _state_dir(job.state_dir, job.name, base, file)
    inbox = job.service.inbox
    if inbox is not None:
        inbox = str((base / Path(os.path.expanduser(inbox))).resolve())
    strategy = job.strategy
    file_part, sep, cls = strategy.name.rpartition(":")
    if sep and file_part.endswith(".py") and not Path(file_part).is_absolute():  # path/to/file.py:Class
        strategy = dataclasses.replace(strategy, name=f"{(base / file_part).resolve()}:{cls}")
    job = dataclasses.replace(
        job,
        strategy=strategy,
        data=dataclasses.replace(job.data, path=str((base / data_path).resolve())),
        service=dataclasses.replace(job.service, inbox=inbox),
        state_dir=str(state).replace("{", "{{").replace("}", "}}"),  # state_path formats it again
        source_file=file,
    )
    return job


# Folders a state directory may not be: it is made private (0700) and filled with the job's files.
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr")


def _state_dir(template: str, name: str, base: Path, file: str) -> Path:
    """The job's state directory, resolved; refused when the template holds a placeholder other than
    {name}, or when it is a folder the job must not take over (the root, a top-level or system folder, the
    home folder or one above it)."""
    fix = "use {name} as the only placeholder (write {{ and }} for literal braces)"
    try:
        fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(file, "state_dir", f"'{template}' is not a valid path template ({e})", fix) from None
    if any(f != "name" or conv or spec for f, conv, spec in fields):
        raise ConfigError(file, "state_dir", f"'{template}' has a placeholder other than {{name}}", fix)
    path = (base / Path(os.path.expanduser(template.format(name=name)))).resolve()
    home = Path.home().resolve()
    if (
        len(path.parts) <= 2
        or path == home
        or path in home.parents
        or any(path == Path(t) or Path(t) in path.parents for t in _SYSTEM_TREES)
    ):
        raise ConfigError(
            file,
            "state_dir",
            f"'{template}' is {path}, a folder the job would take over (its files, inbox and permissions)",
            "name a folder of its own, e.g. '.freeal/{name}' (the default)",
        )
    return path


MAX_JOB_FILE_BYTES = 1 << 20  # a job file is a page of settings
MAX_JOB_NODES = 100_000  # values a job may hold once YAML aliases are expanded (a job has a few hundred)


def load_job(path: str | Path) -> JobConfig:
    """Read and validate a job YAML file (safe_load; its size, and its size with aliases expanded, capped:
    an alias bomb would otherwise be expanded when the job is stored)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(path, "(file)", "file not found", "check the path to the job YAML")
    if path.stat().st_size > MAX_JOB_FILE_BYTES:
        raise ConfigError(
            path, "(file)", f"the file is {path.stat().st_size} bytes, over 1 MiB", "check that this is the job file"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(path, "(file)", f"not valid YAML: {e}", "fix the YAML syntax") from None
    except RecursionError:
        raise ConfigError(path, "(file)", "it is nested too deeply", "write a flat job file") from None
    _check_expanded_size(raw, path)
    return parse_job(raw, path)


def _check_expanded_size(raw: Any, path: Path) -> None:
    """Refuse a document that refers to itself, or whose aliases expand to over MAX_JOB_NODES values.

    Counted without expanding: each distinct node once, its size remembered (aliases share nodes)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in open_nodes:
            raise ConfigError(path, "(file)", "an alias refers to itself", "remove the self-referring alias")
        if key not in sizes:
            open_nodes.add(key)
            children = [c for kv in node.items() for c in kv] if isinstance(node, dict) else node
            sizes[key] = 1 + sum(size(c) for c in children)
            open_nodes.discard(key)
            if sizes[key] > MAX_JOB_NODES:
                raise ConfigError(
                    path,
                    "(file)",
                    f"its aliases expand to more than {MAX_JOB_NODES} values (an alias bomb?)",
                    "write the values out, or use fewer nested aliases",
                )
        return sizes[key]

    try:
        size(raw)
    except RecursionError:
        raise ConfigError(path, "(file)", "it is nested too deeply", "write a flat job file") from None


def job_to_dict(job: JobConfig) -> dict[str, Any]:
    """The job as plain data, for storing next to the state (no secrets: keys live only in the env)."""
    d = dataclasses.asdict(job)
    d.pop("source_file", None)
    return d
