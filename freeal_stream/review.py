"""Human review: pick the rows where a human label is worth most, write them for Label Studio, Argilla or a
spreadsheet, and read the reviewers' labels back (source 'human': they win over every model label, train
the SLM as clean labels, and are never sent to the LLM again).

What is picked (`pick_for_review`): a `random_share` of the rows drawn at random, so the reviewed rows also
measure the export's accuracy without bias; then the LLM labels the SLM disputes, the rows of rare classes,
and the least confident rows, each least confident first. Each row says why it was picked.

What is read back (`read_review_file`): Label Studio's JSON, JSON-MIN and CSV exports, Argilla's records JSON
(`dataset.records.to_json`, nested or flat), and the CSV this module writes with its `label` column filled
in. A row nobody labelled is skipped; a bad row (an id not stored, a label not a class, reviewers who
disagree) is quarantined with the file, the row and the fix, like a bad data row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freeal_stream.errors import UserError
from freeal_stream.records import HumanLabel, ReviewRow
from freeal_stream.sources import Problem

FORMATS = ("csv", "labelstudio", "argilla")
SUFFIX = {"csv": ".csv", "labelstudio": ".json", "argilla": ".argilla.json"}
QUESTION = "label"  # Label Studio's Choices name / Argilla's LabelQuestion name
TEXT_FIELD = "text"
AGENT = "freeal-stream"
CSV_COLUMNS = (
    "item_id",
    "text",
    "label",
    "suggested_label",
    "suggested_by",
    "confidence",
    "llm_label",
    "slm_label",
    "disputed",
    "reason",
)
DISPUTED_SHARE, RARE_SHARE = 0.4, 0.3  # of the rows not drawn at random (unused quota moves on)
REASONS = ("random", "disputed", "rare class", "least confident")


class ReviewFileError(UserError):
    """A review file that cannot be read as a whole (nothing of it is stored)."""


# ---- which rows ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReviewPick:
    """The rows to review, and the rows reviewed before that join the random sample (see `pick_for_review`)."""

    rows: list[ReviewRow]
    joined_random: list[str]

    def counts(self) -> dict[str, int]:
        return {r: sum(x.reason == r for x in self.rows) for r in REASONS}


def pick_for_review(
    store: Any, n: int, rule: str, n_classes: int, random_share: float = 0.2, seed: int = 0
) -> ReviewPick:
    """Up to `n` never-reviewed labelled rows: random ones first, then disputed, rare-class, least confident.

    The random rows are the next ones of one seeded order over all labelled rows; rows in it that were reviewed
    before (for another reason) join the random sample without being asked again, so the sample stays uniform.
    """
    picked: list[ReviewRow] = []

    def take(k: int, reason: str, order: str, where: str = "true", params: dict[str, Any] | None = None) -> None:
        if k > 0:
            rows = store.review_candidates(
                rule, k, order=order, where=where, params=params, exclude=[r.item_id for r in picked]
            )
            picked.extend(dataclasses.replace(r, reason=reason) for r in rows)

    sample = store.random_sample_ids(rule, round(n * random_share), str(seed))
    fresh = [i for i, reviewed in sample if not reviewed]
    take(len(fresh), "random", "md5(id || $seed)", "list_contains($ids, id)", {"seed": str(seed), "ids": fresh})
    rest = n - len(picked)
    take(round(rest * DISPUTED_SHARE), "disputed", "confidence NULLS FIRST", "disputed")
    counts = store.label_class_counts(rule)
    total = sum(counts.values())
    rare = sorted(c for c in range(n_classes) if counts.get(c, 0) < total / n_classes / 2)
    quota = round(rest * RARE_SHARE)
    for k, c in enumerate(rare):  # share the quota among the rare classes, what one leaves going to the next
        take(
            (quota - sum(r.reason == "rare class" for r in picked)) // (len(rare) - k),
            "rare class",
            "confidence NULLS FIRST",
            "label = $c",
            {"c": c},
        )
    take(n - len(picked), "least confident", "confidence NULLS FIRST")
    return ReviewPick(picked, [i for i, reviewed in sample if reviewed])


# ---- writing the queue ---------------------------------------------------------------------------------
def write_queue(rows: Sequence[ReviewRow], path: Path, fmt: str, class_names: Sequence[str]) -> list[Path]:
    """Write the rows for a review tool; returns the files written (Label Studio: the tasks and the project's
    labelling config)."""
    name = lambda i: None if i is None else class_names[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            for r in rows:
                w.writerow(
                    [
                        r.item_id,
                        r.text,
                        "",
                        name(r.label),
                        r.source,
                        _rounded(r.confidence),
                        name(r.llm_label),
                        name(r.slm_label),
                        r.disputed,
                        r.reason,
                    ]
                )
        return [path]
    if fmt == "labelstudio":
        tasks = [
            {
                "data": {TEXT_FIELD: r.text, "item_id": r.item_id, "reason": r.reason, "source": r.source},
                "predictions": [
                    {
                        "model_version": AGENT,
                        "score": r.confidence,
                        "result": [
                            {
                                "from_name": QUESTION,
                                "to_name": TEXT_FIELD,
                                "type": "choices",
                                "value": {"choices": [name(r.label)]},
                            }
                        ],
                    }
                ],
            }
            for r in rows
        ]
        path.write_text(json.dumps(tasks, ensure_ascii=False, indent=1), encoding="utf-8")
        config = path.with_name(path.name.removesuffix(".json") + ".labelstudio.xml")
        config.write_text(labelstudio_config(class_names), encoding="utf-8")
        return [path, config]
    if fmt == "argilla":
        records = [
            {
                "id": r.item_id,
                "fields": {TEXT_FIELD: r.text},
                "metadata": {},
                "suggestions": {QUESTION: {"value": name(r.label), "score": r.confidence, "agent": AGENT}},
                "responses": {},
                "vectors": {},
                "_server_id": None,
            }
            for r in rows
        ]
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
        return [path]
    raise ValueError(f"review format must be one of {FORMATS}, not {fmt!r}")


def labelstudio_config(class_names: Sequence[str]) -> str:
    """The labelling interface for a Label Studio project: the text and one single-choice question."""
    choices = "\n".join(f'    <Choice value="{_xml(c)}"/>' for c in class_names)
    return (
        f'<View>\n  <Text name="{TEXT_FIELD}" value="${TEXT_FIELD}"/>\n'
        f'  <Choices name="{QUESTION}" toName="{TEXT_FIELD}" choice="single" showInLine="true">\n'
        f"{choices}\n  </Choices>\n</View>\n"
    )


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def how_to_review(fmt: str, files: Sequence[Path], job_file: str) -> str:
    """What to do with the files written (printed by `review export`)."""
    back = f"then `freeal-stream review import {job_file} EXPORTED_FILE`"
    if fmt == "csv":
        return (
            f"fill in the `label` column of {files[0]} (leave it empty where you did not review; "
            f"`suggested_label` is the label the export has now), {back.replace('EXPORTED_FILE', str(files[0]))}"
        )
    if fmt == "labelstudio":
        return (
            f"in Label Studio: create a project with the labelling config in {files[1]}, import {files[0]} "
            f"(the current labels come in as predictions), review, export as JSON, JSON-MIN or CSV, {back}"
        )
    return (
        f"in Argilla: create a dataset with settings fields=[rg.TextField('{TEXT_FIELD}')], "
        f"questions=[rg.LabelQuestion('{QUESTION}', labels=[...the job's classes])], then "
        f"`dataset.records.from_json('{files[0]}')`; review, `dataset.records.to_json('reviewed.json')`, {back}"
    )


# ---- reading the reviewers' labels ---------------------------------------------------------------------
@dataclass(frozen=True)
class ReviewedRow:
    """One row of a review tool's export: the item, its labels (empty: not reviewed), where it was."""

    location: str
    line: int | None
    item_id: str | None
    labels: tuple[str, ...]
    reviewer: str | None
    raw: str


@dataclass
class ReviewRead:
    labels: list[HumanLabel] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    not_reviewed: int = 0


def read_review_file(path: Path, class_names: Sequence[str], known: Any) -> ReviewRead:
    """The labels in a review tool's export, checked: `known(ids)` says which item ids are stored."""
    rows = list(_rows(path))
    stored = known([r.item_id for r in rows if r.item_id])
    classes = {c.strip().casefold(): k for k, c in enumerate(class_names)}
    out, seen = ReviewRead(), dict[str, tuple[int, str]]()
    for r in rows:
        if not r.labels:
            out.not_reviewed += 1
            continue
        verdict = _verdict(r, stored, classes, class_names)
        if isinstance(verdict, tuple):
            out.problems.append(_problem(r, *verdict))
            continue
        item_id = str(r.item_id)  # _verdict refused the rows without one
        earlier = seen.get(item_id)
        if earlier is None:
            seen[item_id] = (verdict, r.location)
            out.labels.append(HumanLabel(item_id, verdict, r.reviewer))
        elif earlier[0] != verdict:
            out.problems.append(
                _problem(
                    r,
                    "reviewers disagree",
                    f"item '{r.item_id}' was labelled "
                    f"'{class_names[earlier[0]]}' by {earlier[1]}. Fix: settle on one label "
                    "and export again",
                )
            )
            out.labels = [h for h in out.labels if h.item_id != item_id]
    return out


def _verdict(
    r: ReviewedRow, stored: set[str], classes: dict[str, int], class_names: Sequence[str]
) -> int | tuple[str, str]:
    """A reviewed row's class index, or (reason, detail) of why it cannot be used."""
    if not r.item_id:
        return "review row without item id", "no item id. Fix: keep the `item_id` field the file was exported with"
    if r.item_id not in stored:
        return (
            "review of an unknown item",
            f"item id '{r.item_id}' is not in this job's state. Fix: import the "
            "review into the job it was exported from",
        )
    given = {lab.strip().casefold() for lab in r.labels}
    unknown = sorted(g for g in given if g not in classes)
    if unknown:
        return (
            "review label not a class",
            f"label {unknown[0]!r} is not one of {list(class_names)}. Fix: correct "
            "the label (the class names are case- and space-insensitive)",
        )
    if len(given) > 1:
        return (
            "reviewers disagree",
            f"item '{r.item_id}' has the labels {sorted(given)}. Fix: settle on one label "
            "in the review tool and export again",
        )
    return classes[given.pop()]


def _problem(r: ReviewedRow, reason: str, detail: str) -> Problem:
    return Problem("quarantined", reason, f"{r.location}: {detail}", r.location, r.line, r.raw, r.item_id)


def _rows(path: Path) -> Iterator[ReviewedRow]:
    """The rows of a review file, whatever tool and format wrote it."""
    if not path.is_file():
        raise ReviewFileError(f"{path}: review file not found. Fix: give the file the review tool exported")
    if path.suffix.lower() in (".csv", ".tsv"):
        yield from _csv_rows(path)
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReviewFileError(
            f"{path}: not a JSON file ({e}). Fix: export from the review tool as JSON (Label "
            "Studio: JSON or JSON-MIN; Argilla: dataset.records.to_json), or as CSV"
        ) from None
    if isinstance(data, dict):
        data = data.get("records", data.get("tasks"))
    if not isinstance(data, list):
        raise ReviewFileError(
            f"{path}: expected a JSON list of tasks or records. Fix: export the whole project from the review tool"
        )
    for k, rec in enumerate(data):
        raw = json.dumps(rec, ensure_ascii=False)[:2000]
        if not isinstance(rec, dict):
            yield ReviewedRow(f"[{k}]", k, None, ("?",), None, raw)
        elif "data" in rec and ("annotations" in rec or "predictions" in rec):
            yield _labelstudio_task(rec, k, raw)
        elif "fields" in rec or any(key.startswith(f"{QUESTION}.responses") for key in rec):
            yield _argilla_record(rec, k, raw)
        else:
            yield _flat_row(rec, f"[{k}]", k, raw)


def _csv_rows(path: Path) -> Iterator[ReviewedRow]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        fields = reader.fieldnames or []
        if "item_id" not in fields or QUESTION not in fields:
            raise ReviewFileError(
                f"{path}: needs the columns 'item_id' and '{QUESTION}'; it has {fields}. Fix: "
                "keep the columns `review export` wrote (Label Studio's CSV export has them)"
            )
        for row in reader:
            line = reader.line_num
            yield _flat_row(row, f"line {line}", line, json.dumps(row, ensure_ascii=False))


def _flat_row(rec: dict[str, Any], location: str, line: int | None, raw: str) -> ReviewedRow:
    """A CSV row or a JSON-MIN object: `item_id` and `label` (a string, or {'choices': [...]})."""
    return ReviewedRow(
        location, line, _str(rec.get("item_id")), _choices(rec.get(QUESTION)), _str(rec.get("annotator")), raw
    )


def _labelstudio_task(task: dict[str, Any], k: int, raw: str) -> ReviewedRow:
    """A task of Label Studio's JSON export: every annotation not cancelled gives its choice."""
    labels: list[str] = []
    reviewers = []
    for ann in task.get("annotations") or []:
        if not isinstance(ann, dict) or ann.get("was_cancelled"):
            continue
        for res in ann.get("result") or []:
            if isinstance(res, dict) and res.get("type") == "choices" and res.get("from_name", QUESTION) == QUESTION:
                labels.extend(_choices(res.get("value")))
        reviewers.append(_str(ann.get("completed_by")))
    data = task["data"] if isinstance(task.get("data"), dict) else {}
    return ReviewedRow(
        f"task[{k}]", k, _str(data.get("item_id")), tuple(labels), ",".join(r for r in reviewers if r) or None, raw
    )


def _argilla_record(rec: dict[str, Any], k: int, raw: str) -> ReviewedRow:
    """An Argilla record (nested `responses: {label: [{value, user_id, status}]}` or flat `label.responses`):
    submitted responses count, drafts and discarded ones do not."""
    nested = (rec.get("responses") or {}).get(QUESTION) if isinstance(rec.get("responses"), dict) else None
    if nested is not None:
        answers = [(r.get("value"), r.get("status"), r.get("user_id")) for r in nested if isinstance(r, dict)]
    else:
        values = rec.get(f"{QUESTION}.responses") or []
        statuses = rec.get(f"{QUESTION}.responses.status") or [None] * len(values)
        users = rec.get(f"{QUESTION}.responses.users") or [None] * len(values)
        answers = list(zip(values, statuses, users))
    kept = [(v, u) for v, s, u in answers if s in (None, "submitted") and v is not None]
    labels = tuple(lab for v, _ in kept for lab in _choices(v))
    return ReviewedRow(
        f"record[{k}]", k, _str(rec.get("id")), labels, ",".join(str(u) for _, u in kept if u) or None, raw
    )


def _choices(value: Any) -> tuple[str, ...]:
    """A label as review tools write it: 'x', ['x'], {'choices': ['x']}; () when empty."""
    if isinstance(value, dict):
        value = value.get("choices")
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, list):
        return tuple(str(v) for v in value if isinstance(v, (str, int)) and str(v).strip())
    return ()


def _str(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v).strip()
    return s or None


# ---- import --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImportResult:
    new: int
    changed: int
    unchanged: int
    not_reviewed: int
    quarantined: int

    def summary(self, file: str) -> str:
        return (
            f"{file}: {self.new + self.changed + self.unchanged} human labels ({self.new} new, {self.changed} "
            f"changed, {self.unchanged} as stored already); {self.not_reviewed} rows not reviewed; "
            f"{self.quarantined} quarantined"
        )


def import_review(store: Any, path: Path, class_names: Sequence[str], rule: str) -> ImportResult:
    """Read a review file and store its labels; bad rows are quarantined under 'review FILE'. Problems are
    recorded first and both writes are idempotent, so a killed import is simply run again."""
    read = read_review_file(path, class_names, store.known_ids)
    store.add_problems(f"review {path.name}", [p.as_row() for p in read.problems])
    counts = store.add_human_labels(path.name, read.labels, rule)
    return ImportResult(counts["new"], counts["changed"], counts["unchanged"], read.not_reviewed, len(read.problems))


# ---- the accuracy check --------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def review_check(agreement: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """What the human labels say about the models' labels: agreement on all reviewed rows (picked where the
    models are weakest, so it understates the export's accuracy) and on the randomly drawn ones (an unbiased
    estimate of the export's accuracy before review, with its 95% interval)."""
    by_reason = {a["reason"]: a for a in agreement}
    if not by_reason:
        return None
    n, k = sum(a["reviewed"] for a in by_reason.values()), sum(a["agreed"] for a in by_reason.values())
    rnd = by_reason.get("random", {"reviewed": 0, "agreed": 0})
    lo, hi = wilson(rnd["agreed"], rnd["reviewed"])
    return {
        "reviewed": n,
        "agreed": k,
        "by_reason": list(by_reason.values()),
        "random": {
            **rnd,
            "accuracy": round(rnd["agreed"] / rnd["reviewed"], 4) if rnd["reviewed"] else None,
            "interval_95": [round(lo, 4), round(hi, 4)] if rnd["reviewed"] else None,
        },
    }


def format_review_check(check: dict[str, Any] | None) -> str | None:
    if check is None:
        return None
    rnd = check["random"]
    line = (
        f"human review: {check['reviewed']} rows; the models' label was right on {check['agreed']} "
        f"({check['agreed'] / check['reviewed']:.1%}; rows picked where the models are weakest, so this "
        "understates accuracy)"
    )
    if rnd["reviewed"]:
        lo, hi = rnd["interval_95"]
        line += (
            f"; on the {rnd['reviewed']} drawn at random: {rnd['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] (an "
            "unbiased check of the accuracy estimate)"
        )
    return line


def default_queue_path(state_path: Path, fmt: str) -> Path:
    return state_path / "review" / f"queue-{time.strftime('%Y%m%d-%H%M%S')}{SUFFIX[fmt]}"
