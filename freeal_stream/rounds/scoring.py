"""Scoring the pool with a round's SLM, shard by shard over the scorer actors, into the round's array files.

Used once per round after training (every item gets the SLM's logits: its label wherever the LLM gave none),
and again only for items that arrived since (a resumed run reads the files instead of scoring again).
"""

from __future__ import annotations

import hashlib

from freeal_stream.actors.scorers import ShardInput, ShardScores
from freeal_stream.rounds.arrays import RowArray
from freeal_stream.rounds.context import RoundContext
from freeal_stream.rounds.pool import SHARD_ROWS, TEXT_SHARD_ROWS
from freeal_stream.rounds.state import round_arrays


def score_pool(
    ctx: RoundContext, round_: int, files: dict[str, bytes], mode: str, fresh: bool = False
) -> tuple[RowArray, RowArray]:
    """Round `round_`'s (logits, embeddings) arrays with every pool item scored; `fresh` starts them over
    (a retrained model), else only items missing from them are scored. In head mode the embeddings are the
    frozen encoder's (the SLM is a head over them), so only logits are written."""
    pool = ctx.pool
    frozen = pool.frozen()
    logits_path, emb_path = round_arrays(ctx.arrays_dir, round_)
    logits = None if fresh else RowArray.open(logits_path)
    if logits is None:
        logits = RowArray.create(logits_path, ctx.n_classes)
    emb = frozen
    if mode == "finetune":
        opened = None if fresh else RowArray.open(emb_path)
        emb = opened if opened is not None and opened.rows >= logits.rows else RowArray.create(emb_path, frozen.width)
    start = min(logits.rows, emb.rows)
    if start >= pool.size:
        return logits, emb
    todo = pool.size - start
    ctx.say(f"scoring {todo:,} items with round {round_}'s SLM ({len(ctx.session.scorers.actors)} scorer actors)")
    done = 0
    ctx.progress.update(f"round {round_} score", 0, todo)

    def shards():
        if mode == "head":
            for s in range(start, pool.size, SHARD_ROWS):
                yield s, ShardInput(emb=frozen.read(s, min(s + SHARD_ROWS, pool.size)))
        else:
            for s, cols in pool.shards(start, size=TEXT_SHARD_ROWS):
                yield s, ShardInput(texts=cols.texts)

    def write(at: int, scores: ShardScores) -> None:
        nonlocal done
        logits.write(at, scores.logits)
        if scores.emb is not None:
            emb.write(at, scores.emb)
        done += len(scores.logits)
        ctx.progress.update(f"round {round_} score", done, todo)

    tag = f"round-{round_}-" + hashlib.sha1(b"".join(files[k] for k in sorted(files))).hexdigest()[:12]
    ctx.session.scorers.score_shards(tag, files, shards(), write)
    if mode == "finetune":
        emb.commit(pool.size)
    logits.commit(pool.size)
    return logits, emb
