"""What a finished round leaves for the next one: its SLM, that SLM's view of the pool, and its demo pool.

Round 0 is the state before any SLM: the frozen encoder's embeddings and the demos the LLM generated. A
round's SLM logits (and, in fine-tune mode, its embeddings) are `RowArray` files, so a resumed run reads them
instead of scoring the pool again, and items that arrive later are scored into the same files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from freeal_stream.llm.demo_generation import generate_demos
from freeal_stream.records import Demo
from freeal_stream.rounds.arrays import RowArray
from freeal_stream.slm.model import model_mode, read_model_files

if TYPE_CHECKING:
    from freeal_stream.rounds.context import RoundContext
    from freeal_stream.rounds.pool import Pool


@dataclass(frozen=True)
class SLMState:
    round: int
    files: dict[str, bytes]  # the trained model (empty in round 0), to score items that arrive later
    mode: str | None  # 'head' | 'finetune' (None in round 0)
    logits: RowArray | None  # (pool, C) the SLM's logits (None in round 0)
    emb: RowArray  # the space retrieval and selection use: frozen, or the fine-tuned encoder's
    demos: tuple[Demo, ...]

    @property
    def trained(self) -> bool:
        return self.logits is not None

    def predictions(self) -> np.ndarray:
        """The SLM's class per pool position (-1 before any SLM), read a shard at a time."""
        if self.logits is None:
            return np.full(self.emb.rows, -1, dtype=np.int64)
        return np.concatenate([block.argmax(1) for _, block in self.logits.shards(65536)] or [np.zeros(0, int)])


def round_arrays(arrays_dir: Path, round_: int) -> tuple[Path, Path]:
    """Where round `round_`'s logits and (fine-tune) embeddings are kept."""
    return arrays_dir / f"round-{round_}-logits.f32", arrays_dir / f"round-{round_}-emb.f32"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


class PoolTexts(Sequence[str]):
    """The pool's texts as a read-only sequence fetched item by item (demo generation draws a few dozen)."""

    def __init__(self, pool: Pool):
        self.pool = pool

    def __len__(self) -> int:
        return self.pool.size

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self.pool.texts([i])[0]


def initial_demos(ctx: RoundContext) -> list[Demo]:
    """Round 0's pool: demos the LLM writes itself from unlabelled prototypes (or the stored ones)."""
    stored = ctx.store.demo_pool(0)
    if stored or ctx.job.freeal.demos_per_prompt == 0:
        return stored
    ctx.say("generating demonstrations from unlabelled prototypes")
    fr = ctx.job.freeal
    generated = generate_demos(
        ctx.session.annotators,
        ctx.llm,
        ctx.job.task.description,
        ctx.verbalizer,
        PoolTexts(ctx.pool),
        prototypes=fr.prototypes,
        per_class=fr.generated_per_class,
        seed=ctx.job.seed,
        progress=lambda d, t, _l: ctx.progress.update("demo generation", d, t),
        time_box_s=fr.generation_time_s,
        say=ctx.say,
    )
    demos = [Demo(f"gen-{n}", text, label, source) for n, (text, label, source) in enumerate(generated)]
    ctx.store.set_demo_pool(0, demos)
    return demos


def state_after(ctx: RoundContext, round_: int) -> SLMState:
    """The pool as seen after round `round_` (0 = before any SLM: the frozen encoder, generated demos), from
    what is stored; items that arrived since are scored now."""
    if round_ == 0:
        return SLMState(0, {}, None, None, ctx.pool.frozen(), tuple(initial_demos(ctx)))
    info = next(r for r in ctx.store.rounds() if r["round"] == round_)
    files = read_model_files(info["model_path"])
    mode = model_mode(files)
    from freeal_stream.rounds.scoring import score_pool  # scoring writes the arrays this module names

    logits, emb = score_pool(ctx, round_, files, mode)
    return SLMState(round_, files, mode, logits, emb, tuple(ctx.store.demo_pool(round_)))
