"""All durable state of a job in one DuckDB file.

The store is the only writer of the file (DuckDB allows one writing process and prefers bulk writes), so
every other part hands it batches. It is also the LLM answer cache: a request's key is its primary key,
which makes the cache, the resume log and the billing record one table.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from freeal_stream.errors import UserError
from freeal_stream.llm import answer_check
from freeal_stream.llm.client import ChatAnswer, ChatRequest
from freeal_stream.llm.ratelimit import estimate_usage
from freeal_stream.private_files import private_dir, private_file
from freeal_stream.records import Annotation, Demo, HumanLabel, ItemColumns, PlanItem, ReviewRow

# 2: dense pool positions (items.pos); per-item probabilities out of slm_scores (they live in array files);
#    llm_answers' token counts BIGINT, answers carry `malformed` and `usage_estimated`
# 3: human labels and the review queue
# 4: calibrated probabilities in slm_scores (p_right, llm_p_right: the `auto` label of record)
SCHEMA_VERSION = 4
# The store process's DuckDB memory: large joins and sorts spill to `<state>/duckdb.tmp` beyond it, so a pool
# of millions is labelled and exported in bounded memory.
MEMORY_LIMIT = "1GB"

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS items (
    seq BIGINT PRIMARY KEY, id VARCHAR UNIQUE NOT NULL, text VARCHAR NOT NULL, view VARCHAR,
    gold VARCHAR, content_hash VARCHAR NOT NULL, ingested_at DOUBLE NOT NULL, pos BIGINT);
CREATE TABLE IF NOT EXISTS llm_answers (
    key VARCHAR PRIMARY KEY, model VARCHAR, request JSON, content VARCHAR, finish_reason VARCHAR,
    prompt_tokens BIGINT, completion_tokens BIGINT, cached_tokens BIGINT, top_logprobs JSON,
    latency_s DOUBLE, attempts INTEGER, created_at DOUBLE, malformed VARCHAR, usage_estimated BOOLEAN);
CREATE TABLE IF NOT EXISTS llm_failures (
    key VARCHAR NOT NULL, model VARCHAR, error VARCHAR NOT NULL, attempts INTEGER, created_at DOUBLE);
CREATE TABLE IF NOT EXISTS annotations (
    item_id VARCHAR NOT NULL, round INTEGER NOT NULL, request_key VARCHAR NOT NULL, label INTEGER,
    confidence DOUBLE, demo_ids JSON, PRIMARY KEY (item_id, round));
CREATE TABLE IF NOT EXISTS slm_scores (
    round INTEGER NOT NULL, item_id VARCHAR NOT NULL, pred INTEGER NOT NULL, confidence DOUBLE NOT NULL,
    loss DOUBLE, clean BOOLEAN, p_right DOUBLE, llm_p_right DOUBLE, PRIMARY KEY (round, item_id));
CREATE TABLE IF NOT EXISTS demo_pools (
    round INTEGER NOT NULL, position INTEGER NOT NULL, demo_id VARCHAR NOT NULL, text VARCHAR NOT NULL,
    label INTEGER NOT NULL, source VARCHAR NOT NULL, PRIMARY KEY (round, position));
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, kind VARCHAR, phase VARCHAR, started_at DOUBLE, finished_at DOUBLE,
    model_path VARCHAR, metrics JSON);
CREATE TABLE IF NOT EXISTS round_plan (
    round INTEGER NOT NULL, position INTEGER NOT NULL, item_id VARCHAR NOT NULL, demo_ids JSON NOT NULL,
    PRIMARY KEY (round, position));
CREATE TABLE IF NOT EXISTS ingested_files (
    digest VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, ingested_at DOUBLE NOT NULL);
CREATE TABLE IF NOT EXISTS llm_batches (
    submission VARCHAR PRIMARY KEY, model VARCHAR NOT NULL, requests INTEGER NOT NULL,
    prompt_tokens BIGINT NOT NULL, file_id VARCHAR, batch_id VARCHAR, state VARCHAR NOT NULL, detail VARCHAR,
    created_at DOUBLE NOT NULL, updated_at DOUBLE NOT NULL, collected_at DOUBLE);
CREATE TABLE IF NOT EXISTS llm_batch_requests (
    submission VARCHAR NOT NULL, position INTEGER NOT NULL, key VARCHAR NOT NULL, request JSON,
    answered BOOLEAN NOT NULL, PRIMARY KEY (submission, key));
CREATE TABLE IF NOT EXISTS quarantine (
    key VARCHAR PRIMARY KEY, source VARCHAR NOT NULL, location VARCHAR NOT NULL, line BIGINT,
    action VARCHAR NOT NULL, reason VARCHAR NOT NULL, detail VARCHAR NOT NULL, item_id VARCHAR,
    raw VARCHAR NOT NULL, created_at DOUBLE NOT NULL);
"""

# Human review (`freeal-stream review`): what a reviewer said about an item, and the rows last sent for review
# with the label they were shown (what the reviewer checked: the unbiased accuracy check compares the two).
# `reason` says why a row was picked ('random' rows measure the export's accuracy without bias).
_HUMAN_DDL = """
CREATE TABLE IF NOT EXISTS human_labels (
    item_id VARCHAR PRIMARY KEY, label INTEGER NOT NULL, shown_label INTEGER, reason VARCHAR NOT NULL,
    file VARCHAR NOT NULL, reviewer VARCHAR, imported_at DOUBLE NOT NULL);
CREATE TABLE IF NOT EXISTS review_queue (
    item_id VARCHAR PRIMARY KEY, reason VARCHAR NOT NULL, label INTEGER, source VARCHAR, confidence DOUBLE,
    queued_at DOUBLE NOT NULL);
"""

# The label of record per item, by the job's `freeal.label_of_record` rule; texts the LLM never labelled get the
# SLM's prediction under every rule. Where the LLM did label a text, the rule says when the SLM's prediction
# replaces it (`slm_wins`): 'llm' never; 'slm' where a later (or same-round) SLM put the LLM's label in its noisy
# split (`disputed`, marked under every rule so a user can review them); 'auto' where that SLM's calibrated
# probability of being right is higher than the LLM label's (`rounds.quality`: both given both models' labels).
# `p_right` is the label of record's calibrated probability of being right (NULL where no calibrated round has
# scored the item); `confidence` is that probability where there is one, else the model's own confidence.
# One layer per source, first match wins: a higher-priority source is one more CTE and one more WHEN.
LABEL_RULES = ("llm", "slm", "auto")
_SLM_WINS = {"llm": "false", "slm": "disputed", "auto": "coalesce(scored_after AND slm_p > llm_p, false)"}

_LABELS_SQL = """
WITH llm AS (
    SELECT item_id, arg_max(label, round) AS label, max(round) AS round,
           arg_max(confidence, round) AS confidence
    FROM annotations WHERE label IS NOT NULL GROUP BY item_id),
slm AS (
    SELECT item_id, arg_max(pred, round) AS label, max(round) AS round,
           arg_max(confidence, round) AS confidence, arg_max(clean, round) AS clean,
           arg_max(p_right, round) AS p_right, arg_max(llm_p_right, round) AS llm_p_right
    FROM slm_scores GROUP BY item_id),
pick AS (
    SELECT i.seq, i.id, i.text, i.gold, llm.label AS llm_label, slm.label AS slm_label,
           coalesce(slm.round >= llm.round, false) AS scored_after,
           coalesce(slm.round >= llm.round AND NOT slm.clean, false) AS disputed,
           llm.round AS llm_round, slm.round AS slm_round,
           -- an Infinity logprob gives confidence NaN: null instead, as JSON (exports, /labels) has no NaN
           CASE WHEN isfinite(llm.confidence) THEN llm.confidence END AS llm_conf,
           CASE WHEN isfinite(slm.confidence) THEN slm.confidence END AS slm_conf,
           slm.p_right AS slm_p, CASE WHEN slm.round >= llm.round THEN slm.llm_p_right END AS llm_p
    FROM items i LEFT JOIN llm ON llm.item_id = i.id LEFT JOIN slm ON slm.item_id = i.id),
ruled AS (SELECT *, CASE WHEN llm_label IS NOT NULL AND NOT ({slm_wins}) THEN 'llm'
                         WHEN slm_label IS NOT NULL THEN 'slm' END AS winner FROM pick)
SELECT seq, id, text, gold,
       CASE winner WHEN 'llm' THEN llm_label WHEN 'slm' THEN slm_label END AS label,
       CASE winner WHEN 'llm' THEN 'llm round ' || llm_round WHEN 'slm' THEN 'slm round ' || slm_round END AS source,
       CASE winner WHEN 'llm' THEN coalesce(llm_p, llm_conf) WHEN 'slm' THEN coalesce(slm_p, slm_conf) END
           AS confidence,
       llm_label, slm_label, disputed,
       CASE winner WHEN 'llm' THEN llm_p WHEN 'slm' THEN slm_p END AS p_right
FROM ruled
"""


def _machine_labels_sql(rule: str) -> str:
    """The models' label of record under `rule` (one of LABEL_RULES), before any human label."""
    if rule not in LABEL_RULES:
        raise ValueError(f"label_of_record must be one of {LABEL_RULES}, not {rule!r}")
    return _LABELS_SQL.format(slm_wins=_SLM_WINS[rule])


# The first layer of the label of record: a label a human gave (`review import`) stands over every model label,
# whatever the rule, with source 'human' and confidence 1. The models' own labels and dispute flag stay visible.
_HUMAN_FIRST_SQL = """
SELECT m.seq, m.id, m.text, m.gold, coalesce(h.label, m.label) AS label,
       CASE WHEN h.label IS NOT NULL THEN 'human' ELSE m.source END AS source,
       CASE WHEN h.label IS NOT NULL THEN 1.0 ELSE m.confidence END AS confidence,
       m.llm_label, m.slm_label, m.disputed, CASE WHEN h.label IS NOT NULL THEN 1.0 ELSE m.p_right END AS p_right
FROM ({machine}) m LEFT JOIN human_labels h ON h.item_id = m.id
"""


def _labels_sql(rule: str) -> str:
    """The label-of-record query: human labels first, then the models' labels under `rule`."""
    return _HUMAN_FIRST_SQL.format(machine=_machine_labels_sql(rule))


_UNSCORED_SQL = """SELECT pos FROM items WHERE id NOT IN (
    SELECT item_id FROM slm_scores WHERE round = (SELECT max(round) FROM slm_scores))"""


def _estimate_stored(request: str) -> tuple[int, int]:
    """The pre-flight estimate (prompt, completion) of a stored request (its JSON as put_answers wrote it)."""
    r = json.loads(request)
    return estimate_usage([(m["role"], m["content"]) for m in r["messages"]], r["max_tokens"])


def _first(result: duckdb.DuckDBPyConnection) -> Any:
    """The first row, with the result drained (DuckDB 2 blocks the connection on a half-read result)."""
    rows = result.fetchall()
    return rows[0] if rows else None


def _item_columns(result: duckdb.DuckDBPyConnection) -> ItemColumns:
    rows = result.fetchall()
    cols = list(zip(*rows)) if rows else [(), (), (), ()]
    return ItemColumns(*(list(c) for c in cols))


class StateError(UserError):
    """The state directory cannot be used as asked (locked by another run, incompatible config...)."""


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    return {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]
        ).fetchall()
    }


def _answers_v2(con: duckdb.DuckDBPyConnection) -> None:
    """Bring a state file of schema 1 to this version, in one transaction (a kill leaves it as it was).

    Token counts become BIGINT (an INTEGER overflowed after the answer was paid, before it was stored);
    answers gain `malformed` and `usage_estimated`, and old answers whose usage was missing (stored as
    0) or not a sane count are charged the estimate, as new ones are, so the budget counts them.
    """
    cols = dict(
        con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'llm_answers'"
        ).fetchall()
    )
    if "usage_estimated" in cols and cols["prompt_tokens"] == "BIGINT":
        return
    con.execute("BEGIN TRANSACTION").fetchall()
    for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        if cols[name] != "BIGINT":
            con.execute(f"ALTER TABLE llm_answers ALTER COLUMN {name} SET DATA TYPE BIGINT").fetchall()
    con.execute("ALTER TABLE llm_answers ADD COLUMN IF NOT EXISTS malformed VARCHAR").fetchall()
    con.execute("ALTER TABLE llm_answers ADD COLUMN IF NOT EXISTS usage_estimated BOOLEAN DEFAULT false").fetchall()
    bad = con.execute(
        """SELECT key, request FROM llm_answers
        WHERE prompt_tokens IS NULL OR completion_tokens IS NULL OR coalesce(cached_tokens, 0) < 0
           OR prompt_tokens < 0 OR completion_tokens < 0 OR prompt_tokens + completion_tokens = 0
           OR greatest(prompt_tokens, completion_tokens) > ? OR coalesce(cached_tokens, 0) > prompt_tokens""",
        [answer_check.MAX_USAGE_TOKENS],
    ).fetchall()
    if bad:
        con.executemany(
            "UPDATE llm_answers SET prompt_tokens = ?, completion_tokens = ?, cached_tokens = 0, "
            "usage_estimated = true WHERE key = ?",
            [(*_estimate_stored(request), key) for key, request in bad],
        )
    con.execute("COMMIT").fetchall()


def _positions_v2(con: duckdb.DuckDBPyConnection) -> None:
    """Dense pool positions (per-item arrays on disk are aligned by them); per-item JSON probabilities dropped."""
    if "pos" not in _columns(con, "items"):
        con.execute("ALTER TABLE items ADD COLUMN pos BIGINT").fetchall()
        con.execute("""UPDATE items SET pos = r.p FROM (SELECT seq AS s, row_number() OVER (ORDER BY seq) - 1 AS p
                       FROM items) r WHERE items.seq = r.s""").fetchall()
    if "probs" in _columns(con, "slm_scores"):
        con.execute("ALTER TABLE slm_scores DROP COLUMN probs").fetchall()


def _calibrated_v4(con: duckdb.DuckDBPyConnection) -> None:
    """4: the calibrated probabilities a round stores per item (`rounds.quality`), for the `auto` rule."""
    for column in ("p_right", "llm_p_right"):
        if column not in _columns(con, "slm_scores"):
            con.execute(f"ALTER TABLE slm_scores ADD COLUMN {column} DOUBLE").fetchall()


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Bring a state file written by an older version to this schema; every step is idempotent."""
    _answers_v2(con)
    _positions_v2(con)
    con.execute(_HUMAN_DDL).fetchall()  # 3: human labels and the review queue (`review export/import`)
    _calibrated_v4(con)
    con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]).fetchall()


class Store:
    """Owns the job's DuckDB file; implements the LLM answer cache protocol."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        folder = self.path.parent
        private_dir(folder, tighten=not folder.exists() or self.path.exists() or not any(folder.iterdir()))
        try:
            self.con = duckdb.connect(str(self.path))
        except duckdb.IOException as e:
            raise StateError(
                f"{self.path} is in use by another process ({e}). Fix: wait for the other "
                "freeal-stream run on this state directory to finish, or use another state_dir."
            ) from e
        private_file(self.path)
        self._exec(f"SET memory_limit = '{MEMORY_LIMIT}'")
        self._exec("SET temp_directory = ?", [str(self.path.with_suffix(".tmp"))])
        self._exec(_DDL)
        _migrate(self.con)

    @contextlib.contextmanager
    def _registered(self, name: str, table: pa.Table) -> Iterator[None]:
        """An Arrow batch visible to SQL as `name` for one statement: bulk writes without a row loop."""
        self.con.register(name, table)
        try:
            yield
        finally:
            self.con.unregister(name)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One commit for several statements: all of them land, or none."""
        self.con.begin()
        try:
            yield
        except BaseException:
            self.con.rollback()
            raise
        self.con.commit()

    def _exec(self, sql: str, params: Any = None) -> None:
        """Run a statement and drain its result: DuckDB 2 refuses new work while a result is unread."""
        self.con.execute(sql, params if params is not None else []).fetchall()

    def close(self) -> None:
        self.con.close()

    # ---- job config -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = _first(self.con.execute("SELECT value FROM meta WHERE key = ?", [key]))
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._exec("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])

    # ---- items ------------------------------------------------------------------------------------
    def add_items(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        views: Sequence[str | None],
        golds: Sequence[str | None],
        hashes: Sequence[str],
    ) -> int:
        """Insert items whose id and text are both new; returns how many were added.

        Deduplicated by id and by content hash (within the batch too, first one wins), so re-ingesting a
        file, or the same text under a second id, adds nothing and is never paid for twice. Anti joins, not
        NOT IN: DuckDB hashes the batch and streams the table past it, where NOT IN hashed the whole table for
        every batch (0.11 s against 0.2-0.3 s a 10,000-row batch at 1M items).
        """
        start = _first(self.con.execute("SELECT coalesce(max(seq), -1) + 1 FROM items"))[0]
        batch = pa.table(
            {
                "seq": pa.array(np.arange(start, start + len(ids), dtype=np.int64)),
                "id": pa.array(list(ids), pa.string()),
                "text": pa.array(list(texts), pa.string()),
                "view": pa.array(list(views), pa.string()),
                "gold": pa.array(list(golds), pa.string()),
                "content_hash": pa.array(list(hashes), pa.string()),
            }
        )
        before = self.count_items()
        with self._registered("incoming", batch):
            self._exec(
                """
                INSERT INTO items (seq, id, text, view, gold, content_hash, ingested_at, pos)
                SELECT seq, id, text, view, gold, content_hash, epoch(now()), $n + row_number() OVER (ORDER BY seq) - 1
                FROM (SELECT * FROM (incoming n ANTI JOIN items i ON i.id = n.id) m
                      ANTI JOIN items j ON j.content_hash = m.content_hash
                      QUALIFY row_number() OVER (PARTITION BY content_hash ORDER BY seq) = 1
                          AND row_number() OVER (PARTITION BY id ORDER BY seq) = 1)""",
                {"n": before},
            )
        return self.count_items() - before

    def file_ingested(self, digest: str) -> bool:
        """Whether a data file with this sha256 was ingested before (inbox: a file dropped twice)."""
        return _first(self.con.execute("SELECT count(*) FROM ingested_files WHERE digest = ?", [digest]))[0] > 0

    def remember_file(self, digest: str, name: str) -> None:
        self._exec("INSERT OR IGNORE INTO ingested_files VALUES (?, ?, epoch(now()))", [digest, name])

    def unscored_positions(self) -> np.ndarray:
        """Pool positions of the items the latest SLM round has not scored: what arrived since its pool was taken."""
        rows = self.con.execute(f"SELECT pos FROM ({_UNSCORED_SQL}) ORDER BY pos").fetchnumpy()
        return rows["pos"].astype(np.int64)

    def unscored_count(self) -> int:
        """How many `unscored_positions` there are, without moving them (the service asks every poll)."""
        return _first(self.con.execute(f"SELECT count(*) FROM ({_UNSCORED_SQL})"))[0]

    def count_items(self) -> int:
        return _first(self.con.execute("SELECT count(*) FROM items"))[0]

    def items_range(self, start: int, stop: int) -> ItemColumns:
        """The items at pool positions start .. stop (ingestion order): a shard of the pool."""
        return _item_columns(
            self.con.execute(
                """SELECT id, text, view, gold FROM items
                                                 WHERE pos >= ? AND pos < ? ORDER BY pos""",
                [start, stop],
            )
        )

    def items_at(self, positions: Sequence[int]) -> ItemColumns:
        """The items at these pool positions, in the order given."""
        wanted = pa.table(
            {
                "pos": pa.array(np.asarray(positions, dtype=np.int64)),
                "k": pa.array(np.arange(len(positions), dtype=np.int64)),
            }
        )
        with self._registered("wanted", wanted):
            return _item_columns(
                self.con.execute("""SELECT id, text, view, gold FROM items i JOIN wanted w
                                                     ON i.pos = w.pos ORDER BY w.k""")
            )

    def positions_of(self, ids: Sequence[str]) -> np.ndarray:
        """Pool positions of these ids, in the order given (-1 for an id not stored)."""
        wanted = pa.table({"id": pa.array(list(ids), pa.string()), "k": pa.array(np.arange(len(ids), dtype=np.int64))})
        with self._registered("wanted", wanted):
            rows = self.con.execute("""SELECT coalesce(i.pos, -1) FROM wanted w LEFT JOIN items i ON i.id = w.id
                                       ORDER BY w.k""").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def item_flags(self, class_names: Sequence[str], size: int) -> dict[str, np.ndarray]:
        """Small per-position columns of positions 0 .. size: `gold` (class index, -1 = none) and `has_view`."""
        rows = self.con.execute(
            """SELECT coalesce(list_position(?, gold) - 1, -1), view IS NOT NULL
                                   FROM items WHERE pos < ? ORDER BY pos""",
            [list(class_names), size],
        ).fetchnumpy()
        names = list(rows)
        return {"gold": rows[names[0]].astype(np.int64), "has_view": rows[names[1]].astype(bool)}

    def conflicting_ids(self, ids: Sequence[str], hashes: Sequence[str]) -> list[str]:
        """Ids already stored with a different text: re-ingesting must not silently change an item."""
        batch = pa.table({"id": pa.array(list(ids), pa.string()), "h": pa.array(list(hashes), pa.string())})
        with self._registered("incoming", batch):
            rows = self.con.execute("""SELECT i.id FROM items i JOIN incoming n ON i.id = n.id
                                       WHERE i.content_hash <> n.h ORDER BY i.seq""").fetchall()
        return [r[0] for r in rows]

    # ---- quarantined and flagged rows -------------------------------------------------------------
    def add_problems(self, source: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Record bad rows (location, line, action, reason, detail, item_id, raw) of one source.

        Keyed by a hash of all of it, so ingesting the same file again records nothing twice.
        """
        if not rows:
            return
        cols = list(zip(*rows))
        batch = pa.table(
            {
                "location": pa.array(cols[0], pa.string()),
                "line": pa.array(cols[1], pa.int64()),
                "action": pa.array(cols[2], pa.string()),
                "reason": pa.array(cols[3], pa.string()),
                "detail": pa.array(cols[4], pa.string()),
                "item_id": pa.array(cols[5], pa.string()),
                "raw": pa.array(cols[6], pa.string()),
            }
        )
        with self._registered("incoming", batch):
            self._exec(
                """INSERT OR IGNORE INTO quarantine
                          SELECT key, $s, location, line, action, reason, detail, item_id, raw, epoch(now())
                          FROM (SELECT *, md5(concat_ws(chr(31), $s, location, line, action, reason, detail,
                                                        item_id, raw)) AS key FROM incoming)
                          QUALIFY row_number() OVER (PARTITION BY key) = 1""",
                {"s": source},
            )

    def problem_counts(self) -> list[dict[str, Any]]:
        """Rows per (action, reason), most frequent first: what `status` reports."""
        rows = self.con.execute("""SELECT action, reason, count(*) FROM quarantine GROUP BY ALL
                                   ORDER BY 3 DESC, 1, 2""").fetchall()
        return [{"action": a, "reason": r, "count": n} for a, r, n in rows]

    def problems(self, limit: int, action: str | None = None) -> list[dict[str, Any]]:
        """The first `limit` recorded rows (optionally of one action), in the order they arrived."""
        rows = self.con.execute(
            """SELECT source, location, line, action, reason, detail, item_id, raw
                                   FROM quarantine WHERE ? IS NULL OR action = ?
                                   ORDER BY created_at, source, line LIMIT ?""",
            [action, action, limit],
        ).fetchall()
        names = ("source", "location", "line", "action", "reason", "detail", "item_id", "raw")
        return [dict(zip(names, r)) for r in rows]

    # ---- LLM answer cache (the AnswerCache protocol) ------------------------------------------------
    def get_answers(self, keys: Sequence[str]) -> dict[str, ChatAnswer]:
        """Stored answers, checked again as on the wire: one stored by an older version with a malformed
        field comes back (and is marked) as a malformed no-label answer, so it cannot break a resume."""
        if not keys:
            return {}
        with self._registered("wanted", pa.table({"key": pa.array(list(set(keys)), pa.string())})):
            rows = self.con.execute("""
                SELECT a.key, content, finish_reason, prompt_tokens, completion_tokens, cached_tokens,
                       top_logprobs, latency_s, attempts, malformed, usage_estimated
                FROM llm_answers a JOIN wanted w ON a.key = w.key""").fetchall()
        out, marked = {}, []
        for k, content, fin, pt, ct, cached, tlp, lat, att, malformed, estimated in rows:
            try:
                top = answer_check.stored_logprobs(json.loads(tlp)) if tlp else None
            except (answer_check.Malformed, ValueError) as e:
                top, malformed = None, f"stored answer: {e}"
                marked.append((malformed, k))
            out[k] = ChatAnswer(
                key=k,
                content="" if malformed else content,
                finish_reason=fin,
                prompt_tokens=pt,
                completion_tokens=ct,
                cached_tokens=cached,
                top_logprobs=top,
                latency_s=lat,
                attempts=att,
                error=None,
                from_cache=True,
                malformed=malformed,
                usage_estimated=bool(estimated),
            )
        if marked:
            self.con.executemany("UPDATE llm_answers SET malformed = ? WHERE key = ?", marked)
        return out

    def put_answers(self, pairs: Sequence[tuple[ChatRequest, ChatAnswer]]) -> None:
        """Commit answers (and failures: `error` set) in one write: a killed run must never pay for them again.

        The first answer stored under a key stands (a second put never overwrites what was paid for)."""
        answers = [(r, a) for r, a in pairs if a.error is None]
        failures = [(r, a) for r, a in pairs if a.error is not None]
        now = time.time()
        if answers:
            batch = pa.table(
                {
                    "key": [a.key for _, a in answers],
                    "model": [r.model for r, _ in answers],
                    "request": [
                        json.dumps(
                            {
                                "messages": r.as_messages(),
                                "temperature": r.temperature,
                                "max_tokens": r.max_tokens,
                                "template_version": r.template_version,
                            }
                        )
                        for r, _ in answers
                    ],
                    "content": pa.array([a.content for _, a in answers], pa.string()),
                    "finish_reason": pa.array([a.finish_reason for _, a in answers], pa.string()),
                    "prompt_tokens": pa.array([a.prompt_tokens for _, a in answers], pa.int64()),
                    "completion_tokens": pa.array([a.completion_tokens for _, a in answers], pa.int64()),
                    "cached_tokens": pa.array([a.cached_tokens for _, a in answers], pa.int64()),
                    "top_logprobs": pa.array(
                        [json.dumps(a.top_logprobs) if a.top_logprobs else None for _, a in answers], pa.string()
                    ),
                    "latency_s": pa.array([a.latency_s for _, a in answers], pa.float64()),
                    "attempts": pa.array([a.attempts for _, a in answers], pa.int32()),
                    "malformed": pa.array([a.malformed for _, a in answers], pa.string()),
                    "usage_estimated": pa.array([a.usage_estimated for _, a in answers], pa.bool_()),
                }
            )
            with self._registered("incoming", batch):
                self._exec(
                    """INSERT OR IGNORE INTO llm_answers (key, model, request, content, finish_reason,
                                  prompt_tokens, completion_tokens, cached_tokens, top_logprobs, latency_s, attempts,
                                  created_at, malformed, usage_estimated)
                              SELECT key, model, request, content, finish_reason, prompt_tokens, completion_tokens,
                                  cached_tokens, top_logprobs, latency_s, attempts, $now, malformed, usage_estimated
                              FROM incoming QUALIFY row_number() OVER (PARTITION BY key) = 1""",
                    {"now": now},
                )
        if failures:  # a request that got no answer (after its retries): nothing paid, asked again later
            self.con.executemany(
                "INSERT INTO llm_failures VALUES (?, ?, ?, ?, ?)",
                [(a.key, r.model, a.error, a.attempts, now) for r, a in failures],
            )

    def failure_counts(self) -> dict[str, int]:
        """Failed requests by kind (e.g. timeout_exhausted), over the job's life."""
        return dict(
            self.con.execute("SELECT error, count(*) FROM llm_failures GROUP BY error ORDER BY error").fetchall()
        )

    def spent(self) -> dict[str, int]:
        """What the LLM has cost so far, all models together (`usage_by_model`, summed)."""
        names = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "usage_estimated", "malformed")
        rows = self.usage_by_model()
        return {name: sum(u[name] for u in rows) for name in names}

    def usage_by_model(self) -> list[dict[str, Any]]:
        """Per model and mode (`batch`: answered through the batch API): requests and tokens of the answers of
        record (what the budget prices: the one place spend is read), how many were charged the estimate for
        want of usage, and how many were malformed."""
        rows = self.con.execute("""SELECT model, b.key IS NOT NULL, count(*), coalesce(sum(prompt_tokens), 0),
                                   coalesce(sum(cached_tokens), 0), coalesce(sum(completion_tokens), 0),
                                   count(*) FILTER (WHERE usage_estimated), count(malformed)
                                   FROM llm_answers a LEFT JOIN (SELECT DISTINCT key FROM llm_batch_requests
                                                                 WHERE answered) b ON a.key = b.key
                                   GROUP BY ALL ORDER BY 1, 2""").fetchall()
        return [
            {
                "model": m,
                "batch": b,
                "requests": n,
                "prompt_tokens": int(p),
                "cached_tokens": int(c),
                "completion_tokens": int(o),
                "usage_estimated": e,
                "malformed": bad,
            }
            for m, b, n, p, c, o, e, bad in rows
        ]

    # ---- provider batches (llm.mode: batch) --------------------------------------------------------
    # A submission is recorded with its requests before its file is uploaded, then gets the file id, then
    # the batch id and the provider's states, so a killed run finds, and polls, what it had sent.
    def add_batch(self, submission: str, model: str, prompt_tokens: int, requests: Sequence[tuple[str, str]]) -> None:
        """Record a submission about to be uploaded: its (request key, request JSON) lines, in file order."""
        now = time.time()
        batch = pa.table(
            {
                "submission": pa.array([submission] * len(requests), pa.string()),
                "position": pa.array(np.arange(len(requests), dtype=np.int32)),
                "key": pa.array([r[0] for r in requests], pa.string()),
                "request": pa.array([r[1] for r in requests], pa.string()),
            }
        )
        with self._registered("incoming", batch), self._transaction():
            self._exec(
                "INSERT OR IGNORE INTO llm_batches VALUES (?, ?, ?, ?, NULL, NULL, 'prepared', NULL, ?, ?, NULL)",
                [submission, model, len(requests), prompt_tokens, now, now],
            )
            self._exec(
                "INSERT OR IGNORE INTO llm_batch_requests SELECT submission, position, key, request, false "
                "FROM incoming"
            )  # idempotent: the store actor may run a call again after a restart

    def update_batch(
        self,
        submission: str,
        state: str,
        *,
        file_id: str | None = None,
        batch_id: str | None = None,
        detail: str | None = None,
    ) -> None:
        self._exec(
            """UPDATE llm_batches SET state = ?, file_id = coalesce(?, file_id),
                      batch_id = coalesce(?, batch_id), detail = coalesce(?, detail), updated_at = ?
                      WHERE submission = ?""",
            [state, file_id, batch_id, detail, time.time(), submission],
        )

    def open_batches(self) -> list[dict[str, Any]]:
        """Submissions whose results are not stored yet (in flight, or not yet sent), oldest first."""
        rows = self.con.execute("""SELECT submission, model, requests, prompt_tokens, file_id, batch_id, state,
                                          detail, created_at FROM llm_batches WHERE collected_at IS NULL
                                   ORDER BY created_at, submission""").fetchall()
        names = (
            "submission",
            "model",
            "requests",
            "prompt_tokens",
            "file_id",
            "batch_id",
            "state",
            "detail",
            "created_at",
        )
        return [dict(zip(names, r)) for r in rows]

    def batch_requests(self, submission: str) -> list[tuple[str, str]]:
        """(key, request JSON) of an open submission, in file order."""
        return self.con.execute(
            "SELECT key, request FROM llm_batch_requests WHERE submission = ? ORDER BY position", [submission]
        ).fetchall()

    def put_batch_results(
        self,
        answers: Sequence[tuple[ChatRequest, ChatAnswer]],
        failures: Sequence[tuple[ChatRequest, ChatAnswer]],
        submission: str,
    ) -> None:
        """Store a batch's answers (priced at the batch discount) and failures in one commit."""
        keys = [a.key for _, a in answers]
        fresh = sorted(set(keys) - set(self.get_answers(keys)))  # answered before (e.g. live): priced as it was
        with self._registered("fresh", pa.table({"key": pa.array(fresh, pa.string())})), self._transaction():
            self.put_answers([*answers, *failures])
            self._exec(
                """UPDATE llm_batch_requests SET answered = true
                          WHERE submission = ? AND key IN (SELECT key FROM fresh)""",
                [submission],
            )

    def finish_batch(self, submission: str, state: str, detail: str | None = None) -> None:
        """A submission's results are all stored: it leaves the open list (and its request texts are dropped)."""
        now = time.time()
        with self._transaction():
            self._exec(
                """UPDATE llm_batches SET state = ?, detail = coalesce(?, detail), updated_at = ?,
                          collected_at = ? WHERE submission = ?""",
                [state, detail, now, now, submission],
            )
            self._exec("UPDATE llm_batch_requests SET request = NULL WHERE submission = ?", [submission])

    def batch_counts(self) -> dict[str, int]:
        """Submissions whose results are stored, by the provider's final state (for `status`)."""
        return dict(
            self.con.execute("""SELECT state, count(*) FROM llm_batches WHERE collected_at IS NOT NULL
                                        GROUP BY state ORDER BY state""").fetchall()
        )

    # ---- annotations, scores, demos ---------------------------------------------------------------
    def add_annotations(self, round_: int, rows: Sequence[Annotation]) -> None:
        if not rows:
            return
        batch = pa.table(
            {
                "item_id": [r.item_id for r in rows],
                "round": pa.array([round_] * len(rows), pa.int32()),
                "request_key": [r.request_key for r in rows],
                "label": pa.array([r.label for r in rows], pa.int32()),
                "confidence": pa.array([r.confidence for r in rows], pa.float64()),
                "demo_ids": [json.dumps(list(r.demo_ids)) for r in rows],
            }
        )
        with self._registered("incoming", batch):
            self._exec("INSERT OR REPLACE INTO annotations SELECT * FROM incoming")

    def set_round_plan(self, round_: int, plan: Sequence[PlanItem]) -> None:
        """A round's chosen items and the demos each prompt shows, stored before any is sent: a resumed
        round rebuilds exactly these requests (same keys, so answers already paid come from the cache)."""
        self._exec("DELETE FROM round_plan WHERE round = ?", [round_])
        if plan:
            batch = pa.table(
                {
                    "round": pa.array([round_] * len(plan), pa.int32()),
                    "position": pa.array(np.arange(len(plan), dtype=np.int32)),
                    "item_id": [p.item_id for p in plan],
                    "demo_ids": [json.dumps(list(p.demo_ids)) for p in plan],
                }
            )
            with self._registered("incoming", batch):
                self._exec("INSERT INTO round_plan SELECT * FROM incoming")

    def round_plan(self, round_: int) -> list[PlanItem]:
        rows = self.con.execute(
            "SELECT item_id, demo_ids FROM round_plan WHERE round = ? ORDER BY position", [round_]
        ).fetchall()
        return [PlanItem(i, tuple(json.loads(d))) for i, d in rows]

    def annotated_in_round(self, round_: int) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT item_id FROM annotations WHERE round = ?", [round_]).fetchall()}

    def round_annotations(self, round_: int) -> dict[str, int]:
        """How a round's stored annotations came out; empty when the round has none yet."""
        n, labelled = _first(
            self.con.execute("SELECT count(*), count(label) FROM annotations WHERE round = ?", [round_])
        )
        if not n:
            return {}
        return {"requested": n, "labelled": labelled, "no_label": n - labelled, "failed": 0}

    def annotated_count(self) -> int:
        return _first(self.con.execute("SELECT count(DISTINCT item_id) FROM annotations"))[0]

    def annotated_positions(self, min_rounds: int = 1) -> np.ndarray:
        """Pool positions of the items the LLM has annotated in at least `min_rounds` rounds (the method asks
        about a text at most twice)."""
        rows = self.con.execute(
            """SELECT i.pos FROM annotations a JOIN items i ON i.id = a.item_id
                                   GROUP BY i.pos HAVING count(*) >= ? ORDER BY i.pos""",
            [min_rounds],
        ).fetchnumpy()
        return rows["pos"].astype(np.int64)

    def round_label_counts(self, round_: int) -> dict[int, int]:
        """How many of a round's LLM labels went to each class."""
        return dict(
            self.con.execute(
                "SELECT label, count(*) FROM annotations WHERE round = ? AND label IS NOT NULL GROUP BY label", [round_]
            ).fetchall()
        )

    def llm_label_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, labels) of every annotated item's latest LLM label (-1 = the LLM gave no usable label)."""
        rows = self.con.execute("""SELECT i.pos, coalesce(arg_max(a.label, a.round), -1) AS label
                                   FROM annotations a JOIN items i ON i.id = a.item_id
                                   GROUP BY i.pos ORDER BY i.pos""").fetchnumpy()
        return rows["pos"].astype(np.int64), rows["label"].astype(np.int64)

    def add_scores(
        self,
        round_: int,
        positions: np.ndarray,
        probs: np.ndarray,
        losses: np.ndarray,
        clean: np.ndarray,
        p_right: np.ndarray | None = None,
        llm_p_right: np.ndarray | None = None,
    ) -> None:
        """A round's SLM verdict on pool positions: prediction and confidence from `probs`, the CE loss and
        clean flag of the labelled ones (NaN / False elsewhere) and, from a calibrated round, the probability
        that the prediction is right and that the LLM's label is right (NaN: none)."""

        def column(values: np.ndarray | None) -> pa.Array:
            if values is None:
                return pa.nulls(len(positions), pa.float64())
            values = np.asarray(values, dtype=np.float64)
            return pa.array(values, mask=np.isnan(values))

        batch = pa.table(
            {
                "pos": pa.array(np.asarray(positions, dtype=np.int64)),
                "pred": pa.array(probs.argmax(1).astype(np.int32)),
                "confidence": pa.array(probs.max(1).astype(np.float64)),
                "loss": column(losses),
                "clean": pa.array(np.asarray(clean, dtype=bool)),
                "p_right": column(p_right),
                "llm_p_right": column(llm_p_right),
            }
        )
        with self._registered("incoming", batch):
            self._exec(
                """INSERT OR REPLACE INTO slm_scores
                          SELECT $r, i.id, n.pred, n.confidence, n.loss, n.clean, n.p_right, n.llm_p_right
                          FROM incoming n JOIN items i ON i.pos = n.pos""",
                {"r": round_},
            )

    def slm_predictions(self, round_: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, predicted class) of the items round `round_`'s SLM scored."""
        rows = self.con.execute(
            """SELECT i.pos, s.pred FROM slm_scores s JOIN items i ON i.id = s.item_id
                                   WHERE s.round = ? ORDER BY i.pos""",
            [round_],
        ).fetchnumpy()
        return rows["pos"].astype(np.int64), rows["pred"].astype(np.int64)

    def set_demo_pool(self, round_: int, demos: Sequence[Demo]) -> None:
        self._exec("DELETE FROM demo_pools WHERE round = ?", [round_])
        if demos:
            self.con.executemany(
                "INSERT INTO demo_pools VALUES (?, ?, ?, ?, ?, ?)",
                [(round_, i, d.id, d.text, int(d.label), d.source) for i, d in enumerate(demos)],
            )

    def demo_pool(self, round_: int) -> list[Demo]:
        return [
            Demo(*r)
            for r in self.con.execute(
                "SELECT demo_id, text, label, source FROM demo_pools WHERE round = ? ORDER BY position", [round_]
            ).fetchall()
        ]

    # ---- rounds -----------------------------------------------------------------------------------
    def set_phase(
        self, round_: int, kind: str, phase: str, model_path: str | None = None, metrics: dict[str, Any] | None = None
    ) -> None:
        """Record where a round stands; 'done' with metrics marks it complete for resume."""
        now = time.time()
        self._exec(
            """
            INSERT INTO rounds VALUES (?, ?, ?, ?, NULL, ?, ?)
            ON CONFLICT (round) DO UPDATE SET phase = excluded.phase,
                model_path = coalesce(excluded.model_path, rounds.model_path),
                metrics = coalesce(excluded.metrics, rounds.metrics)""",
            [round_, kind, phase, now, model_path, json.dumps(metrics) if metrics else None],
        )
        if phase == "done":
            self._exec("UPDATE rounds SET finished_at = ? WHERE round = ?", [now, round_])

    def rounds(self) -> list[dict[str, Any]]:
        rows = self.con.execute("""SELECT round, kind, phase, started_at, finished_at, model_path, metrics
                                   FROM rounds ORDER BY round""").fetchall()
        return [
            {
                "round": r[0],
                "kind": r[1],
                "phase": r[2],
                "started_at": r[3],
                "finished_at": r[4],
                "model_path": r[5],
                "metrics": json.loads(r[6]) if r[6] else {},
            }
            for r in rows
        ]

    # ---- human review -----------------------------------------------------------------------------
    def review_candidates(
        self,
        rule: str,
        n: int,
        *,
        order: str,
        where: str = "true",
        exclude: Sequence[str] = (),
        params: dict[str, Any] | None = None,
    ) -> list[ReviewRow]:
        """Up to `n` rows worth a human look: labelled, never reviewed, not in `exclude`, matching `where`, in
        `order` (SQL over the label-of-record columns: id, label, source, confidence, disputed, ...)."""
        skip = pa.table({"id": pa.array(list(exclude), pa.string())})
        with self._registered("picked", skip):
            rows = self.con.execute(
                f"""
                SELECT id, text, label, source, confidence, llm_label, slm_label, disputed
                FROM ({_labels_sql(rule)}) l
                WHERE label IS NOT NULL AND source <> 'human' AND id NOT IN (SELECT id FROM picked) AND ({where})
                ORDER BY {order}, seq LIMIT $n""",
                {"n": n, **(params or {})},
            ).fetchall()
        return [ReviewRow(i, t, lab, src, conf, ll, sl, bool(d), "") for i, t, lab, src, conf, ll, sl, d in rows]

    def label_class_counts(self, rule: str) -> dict[int, int]:
        """Labels of record per class index (unlabelled items left out)."""
        return dict(
            self.con.execute(f"""SELECT label, count(*) FROM ({_labels_sql(rule)}) WHERE label IS NOT NULL
                                         GROUP BY label""").fetchall()
        )

    def random_sample_ids(self, rule: str, k: int, seed: str) -> list[tuple[str, bool]]:
        """(id, reviewed already) of the next `k` labelled rows, in one seeded random order, that are not in the
        review's random sample yet. The sample is a prefix of that order: a row reviewed for another reason that
        falls in it joins the sample as it is (skipping it would leave the hard rows out of the sample)."""
        return self.con.execute(
            f"""SELECT l.id, h.item_id IS NOT NULL FROM ({_labels_sql(rule)}) l
                                    LEFT JOIN human_labels h ON h.item_id = l.id
                                    WHERE l.label IS NOT NULL AND coalesce(h.reason, '') <> 'random'
                                    ORDER BY md5(l.id || $seed), l.seq LIMIT $k""",
            {"seed": seed, "k": k},
        ).fetchall()

    def queue_for_review(self, rows: Sequence[ReviewRow], joined_random: Sequence[str] = ()) -> None:
        """Remember the rows sent for review with the label they show (a row sent again is replaced), and count
        the reviewed rows of `joined_random` in the random sample."""
        if joined_random:
            with self._registered("joined", pa.table({"id": pa.array(list(joined_random), pa.string())})):
                self._exec("UPDATE human_labels SET reason = 'random' WHERE item_id IN (SELECT id FROM joined)")
        if not rows:
            return
        batch = pa.table(
            {
                "item_id": [r.item_id for r in rows],
                "reason": [r.reason for r in rows],
                "label": pa.array([r.label for r in rows], pa.int32()),
                "source": [r.source for r in rows],
                "confidence": pa.array([r.confidence for r in rows], pa.float64()),
            }
        )
        with self._registered("incoming", batch):
            self._exec("""INSERT OR REPLACE INTO review_queue
                          SELECT item_id, reason, label, source, confidence, epoch(now()) FROM incoming""")

    def add_human_labels(self, file: str, labels: Sequence[HumanLabel], rule: str) -> dict[str, int]:
        """Store reviewers' labels (source 'human'); returns how many were new, changed, or as stored already.

        One statement, so an import is all or nothing; importing the same file again changes nothing. Each
        keeps the label the reviewer was shown (from the review queue; for a row never queued, the models'
        label of record now) and why it was queued ('not queued' otherwise), for the accuracy check.
        """
        if not labels:
            return {"new": 0, "changed": 0, "unchanged": 0}
        batch = pa.table(
            {
                "item_id": [h.item_id for h in labels],
                "label": pa.array([h.label for h in labels], pa.int32()),
                "reviewer": pa.array([h.reviewer for h in labels], pa.string()),
            }
        )
        with self._registered("incoming", batch):
            counts = _first(
                self.con.execute("""
                SELECT count(*) FILTER (WHERE h.item_id IS NULL), count(*) FILTER (WHERE h.label <> n.label),
                       count(*) FILTER (WHERE h.label = n.label)
                FROM incoming n LEFT JOIN human_labels h ON h.item_id = n.item_id""")
            )
            self._exec(
                f"""
                INSERT INTO human_labels
                SELECT n.item_id, n.label, coalesce(q.label, m.label), coalesce(q.reason, 'not queued'), $file,
                       n.reviewer, epoch(now())
                FROM incoming n LEFT JOIN review_queue q ON q.item_id = n.item_id
                     LEFT JOIN ({_machine_labels_sql(rule)}) m ON m.id = n.item_id
                ON CONFLICT (item_id) DO UPDATE SET label = excluded.label, file = excluded.file,
                    reviewer = excluded.reviewer, imported_at = excluded.imported_at
                WHERE human_labels.label <> excluded.label""",
                {"file": file},
            )
        return dict(zip(("new", "changed", "unchanged"), counts))

    def known_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of these ids are stored items."""
        with self._registered("wanted", pa.table({"id": pa.array(list(set(ids)), pa.string())})):
            return {r[0] for r in self.con.execute("SELECT i.id FROM items i JOIN wanted w ON i.id = w.id").fetchall()}

    def human_label_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, labels) of the items a human labelled."""
        rows = self.con.execute("""SELECT i.pos, h.label FROM human_labels h JOIN items i ON i.id = h.item_id
                                   ORDER BY i.pos""").fetchnumpy()
        return rows["pos"].astype(np.int64), rows["label"].astype(np.int64)

    def review_agreement(self) -> list[dict[str, Any]]:
        """Per reason a row was reviewed: rows, and how many of them showed the label the human gave."""
        rows = self.con.execute("""SELECT reason, count(*), count(*) FILTER (WHERE shown_label = label)
                                   FROM human_labels GROUP BY reason ORDER BY reason""").fetchall()
        return [{"reason": r, "reviewed": n, "agreed": a} for r, n, a in rows]

    # ---- outputs ----------------------------------------------------------------------------------
    def labels_rows(self, rule: str) -> list[tuple]:
        """(seq, id, text, gold, label, source, confidence, llm_label, slm_label, disputed, p_right) per item."""
        return self.con.execute(_labels_sql(rule)).fetchall()

    def labels_since(self, since: int, limit: int, class_names: Sequence[str], rule: str) -> dict[str, Any]:
        """Items with seq >= since, in ingestion order, with their label of record (null: not labelled yet)."""
        rows = self.con.execute(
            f"""SELECT seq, id, label, source, confidence FROM ({_labels_sql(rule)})
                                    WHERE seq >= ? ORDER BY seq LIMIT ?""",
            [since, limit],
        ).fetchall()
        items = [
            {"seq": q, "id": i, "label": None if lab is None else class_names[lab], "source": src, "confidence": conf}
            for q, i, lab, src, conf in rows
        ]
        return {"items": items, "next": (rows[-1][0] + 1) if rows else since}

    def gold_agreement(self, class_names: Sequence[str], rule: str) -> tuple[int, int]:
        """(items with a gold label, of which the label of record agrees): for reporting only."""
        n, right = _first(
            self.con.execute(
                f"""SELECT count(*), count(*) FILTER (WHERE list_position(?, gold) - 1 = label)
                FROM ({_labels_sql(rule)}) WHERE gold IS NOT NULL""",
                [list(class_names)],
            )
        )
        return n, right

    def export(self, path: str, fmt: str, class_names: Sequence[str], rule: str) -> int:
        """Write every item's label of record (with both models' own labels) to `path`; returns the rows."""
        self.create_label_views(class_names, rule)
        self._exec(f"""COPY (SELECT l.id, l.text, c.name AS label, l.source, l.confidence,
                                    cl.name AS llm_label, cs.name AS slm_label, l.disputed
                             FROM labels_out l LEFT JOIN class_names c ON c.idx = l.label
                             LEFT JOIN class_names cl ON cl.idx = l.llm_label
                             LEFT JOIN class_names cs ON cs.idx = l.slm_label
                             ORDER BY l.seq) TO '{path.replace("'", "''")}' (FORMAT {fmt})""")
        return self.count_items()

    def create_label_views(self, class_names: Sequence[str], rule: str) -> None:
        """Temp views `labels_out` (the label of record per item) and `class_names` (index -> name)."""
        self._exec("CREATE OR REPLACE TEMP TABLE class_names (idx INTEGER, name VARCHAR)")
        self.con.executemany("INSERT INTO class_names VALUES (?, ?)", list(enumerate(class_names)))
        self._exec(f"CREATE OR REPLACE TEMP VIEW labels_out AS {_labels_sql(rule)}")

    def labels_by_class_and_source(self, rule: str) -> list[tuple[int | None, str, int]]:
        """(class index or None, source kind: 'human' / 'llm' / 'slm' / 'none', items) for the report."""
        return self.con.execute(f"""SELECT label, coalesce(split_part(source, ' ', 1), 'none'), count(*)
                                    FROM ({_labels_sql(rule)}) GROUP BY ALL ORDER BY ALL""").fetchall()

    def confidence_histogram(self, rule: str, bins: int) -> list[tuple[str, int, int]]:
        """(source kind, bin, items) of the label of record's confidence in `bins` equal bins over [0, 1]
        (items without a confidence left out)."""
        return self.con.execute(
            f"""SELECT split_part(source, ' ', 1), least(floor(confidence * $b), $b - 1)::INT,
                                           count(*)
                                    FROM ({_labels_sql(rule)}) WHERE confidence IS NOT NULL
                                    GROUP BY ALL ORDER BY ALL""",
            {"b": bins},
        ).fetchall()

    def disputed_examples(
        self, rule: str, limit: int
    ) -> list[tuple[str, str, int | None, str, float | None, int | None, int | None]]:
        """(id, text, label, source, confidence, llm_label, slm_label) of disputed rows, least confident first."""
        return self.con.execute(
            f"""SELECT id, text, label, source, confidence, llm_label, slm_label
                                    FROM ({_labels_sql(rule)}) WHERE disputed
                                    ORDER BY confidence NULLS FIRST, seq LIMIT ?""",
            [limit],
        ).fetchall()

    def label_counts(self, rule: str) -> tuple[dict[str, int], int]:
        """(labels of record by source: 'llm', 'slm', 'none'; LLM labels the SLM disputes), in one pass."""
        rows = self.con.execute(f"""SELECT coalesce(split_part(source, ' ', 1), 'none'), count(*),
                                           count(*) FILTER (WHERE disputed)
                                    FROM ({_labels_sql(rule)}) GROUP BY 1""").fetchall()
        return {src: n for src, n, _ in rows}, sum(d for *_, d in rows)
