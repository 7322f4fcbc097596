"""Scorer actors: batch inference over the pool (frozen embeddings, a trained SLM's logits), a shard at a time.

The coordinator hands out shards lazily (a shard's input is built only when a scorer is free to take it) and
writes each result to disk as it comes back, so memory holds a few shards, never the pool. A scorer that
dies is replaced and its shard sent again (inference has no side effects, so a retry is always safe).
Scoring runs while nothing else does (the coordinator waits, the annotators and the trainer are idle), so each
scorer then uses its share of its node's cores, not just the one CPU Ray books for it: `slm.threads` is only
the floor.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from freeal_stream.errors import ActorsDied

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInput:
    """What a scorer needs for one shard: its texts (fine-tune mode, frozen embedding) or its frozen
    embeddings (head mode: the SLM is a head over them)."""

    texts: list[str] | None = None
    emb: np.ndarray | None = None


@dataclass(frozen=True)
class ShardScores:
    logits: np.ndarray  # (n, C)
    emb: np.ndarray | None  # (n, d) the fine-tuned encoder's embeddings; None in head mode (the frozen ones)


@ray.remote(num_cpus=1, max_restarts=0)
class Scorer:
    def __init__(self, max_length: int):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.max_length = max_length
        self._encoder: tuple[str, Any] | None = None  # (encoder name, encoder)
        self._model: tuple[str, Any] | None = None  # (model tag, SLM)

    def embed(self, encoder: str, texts: list[str], threads: int) -> np.ndarray:
        """Frozen-encoder embeddings (round 1's retrieval, head-mode inputs) on `threads` cores."""
        import torch

        torch.set_num_threads(threads)
        if self._encoder is None or self._encoder[0] != encoder:
            from freeal_stream.slm.encoder import load_encoder

            self._encoder = (encoder, load_encoder(encoder, self.max_length))
        return self._encoder[1].embed(texts)

    def score(self, tag: str, files: dict[str, bytes], shard: ShardInput, threads: int) -> ShardScores:
        """The logits of a shard under the model whose files are given (loaded once per tag), computed exactly
        as the trainer computes them."""
        import torch

        torch.set_num_threads(threads)
        if self._model is None or self._model[0] != tag:
            from freeal_stream.slm.model import SLM, write_model_files

            with tempfile.TemporaryDirectory(prefix="freeal-slm-") as tmp:
                self._model = (tag, SLM.load(write_model_files(files, tmp)))
        model = self._model[1]
        emb = shard.emb if shard.emb is not None else model.embed(shard.texts or [])
        return ShardScores(model.logits_from_embeddings(emb), None if shard.emb is not None else emb)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def cores(self) -> tuple[str, int]:
        """(node id, cores this process may run on)."""
        return ray.get_runtime_context().get_node_id(), len(os.sched_getaffinity(0))


class ScorerPool:
    """N scorers kept busy with shards; the ones that die are replaced."""

    def __init__(
        self,
        max_length: int,
        threads: int,
        *,
        size: int,
        resources: dict[str, float] | None = None,
        max_restarts: int = 5,
    ):
        self.max_length, self.min_threads = max_length, threads
        self.resources = resources or {}
        self.max_restarts, self.restarts = max_restarts, 0
        self.actors = [self._new() for _ in range(size)]
        self._threads: list[int] | None = None  # per actor slot, found on first use

    def _new(self) -> Any:
        # mypy does not apply the @ray.remote class decorator, so it cannot see ActorClass.options
        return Scorer.options(resources=self.resources).remote(self.max_length)  # type: ignore[attr-defined]

    def work_threads(self) -> list[int]:
        """Threads per scorer: its node's cores (as many as Ray may use there) shared among the scorers placed on
        that node, and never fewer than slm.threads. A replacement keeps its slot's count."""
        if self._threads is None:
            where = ray.get([a.cores.remote() for a in self.actors])
            cpus = {n["NodeID"]: int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"]}
            on_node = Counter(node for node, _ in where)
            self._threads = [
                max(self.min_threads, min(cores, cpus.get(node, cores)) // on_node[node]) for node, cores in where
            ]
        return self._threads

    def embed(self, encoder: str, texts: list[str]) -> np.ndarray:
        """Embeddings of a few texts (demos, paraphrases) in one call."""
        return self._one(lambda a, threads: a.embed.remote(encoder, texts, threads))

    def embed_shards(
        self, encoder: str, shards: Iterable[tuple[int, list[str]]], on_done: Callable[[int, np.ndarray], None]
    ) -> None:
        """Frozen embeddings of each (start, texts) shard, handed to `on_done(start, emb)` as they finish."""
        self._run(shards, lambda a, threads, texts: a.embed.remote(encoder, texts, threads), on_done)

    def score_shards(
        self,
        tag: str,
        files: dict[str, bytes],
        shards: Iterable[tuple[int, ShardInput]],
        on_done: Callable[[int, ShardScores], None],
    ) -> None:
        """The model's scores of each (start, input) shard, handed to `on_done(start, scores)` as they finish."""
        ref = ray.put(files)
        self._run(shards, lambda a, threads, shard: a.score.remote(tag, ref, shard, threads), on_done)

    def _one(self, call: Callable[[Any, int], Any]) -> Any:
        done: list[Any] = []
        self._run(iter([(0, None)]), lambda a, threads, _x: call(a, threads), lambda _s, out: done.append(out))
        return done[0]

    def _run(
        self,
        shards: Iterable[tuple[int, Any]],
        call: Callable[[Any, int, Any], Any],
        on_done: Callable[[int, Any], None],
    ) -> None:
        """Up to two shards in flight per scorer; a shard is taken from `shards` only when there is room."""
        threads = self.work_threads()
        source: Iterator[tuple[int, Any]] = iter(shards)
        retry: list[tuple[int, Any]] = []
        running: dict[Any, tuple[int, Any, int, Any]] = {}  # ref -> (actor slot, actor, start, input)
        load = [0] * len(self.actors)
        exhausted = False
        while True:
            for slot in range(len(self.actors)):
                while load[slot] < 2 and (retry or not exhausted):
                    nxt = retry.pop() if retry else next(source, None)
                    if nxt is None:
                        exhausted = True
                        break
                    actor = self.actors[slot]
                    running[call(actor, threads[slot], nxt[1])] = (slot, actor, *nxt)
                    load[slot] += 1
            if not running:
                return
            ready, _ = ray.wait(list(running), num_returns=1)
            slot, actor, start, shard = running.pop(ready[0])
            load[slot] -= 1
            try:
                out = ray.get(ready[0])
            except RayActorError:
                if self.actors[slot] is actor:  # its other shard in flight fails too: replace once
                    self._replace(slot)
                retry.append((start, shard))
                continue
            on_done(start, out)

    def _replace(self, slot: int) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise ActorsDied("scorer", self.restarts, self.max_restarts)
        log.warning("scorer %d died; starting a replacement", slot)
        self.actors[slot] = self._new()

    def node_ids(self) -> list[str]:
        return ray.get([a.node_id.remote() for a in self.actors])
