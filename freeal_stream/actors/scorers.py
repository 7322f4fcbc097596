"""Scorer actors: batch inference over the pool (frozen embeddings, a trained SLM's probabilities).

Texts are cut into shards and spread over the scorers; a scorer that dies is replaced and its shard
sent again (inference has no side effects, so a retry is always safe). Scorer work runs while nothing else
does (the coordinator waits, the annotators and the trainer are idle), so each scorer then uses its share
of its node's cores, not just the one CPU Ray books for it: `slm.threads` is only the floor.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import ray
from ray.exceptions import RayActorError

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1, max_restarts=0)
class Scorer:
    def __init__(self, max_length: int):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.max_length = max_length
        self._encoder: tuple[str, Any] | None = None   # (encoder name, encoder)
        self._model: tuple[str, Any] | None = None     # (model tag, SLM)

    def embed(self, encoder: str, texts: list[str], threads: int) -> np.ndarray:
        """Frozen-encoder embeddings (round 1's retrieval, head-mode inputs) on `threads` cores."""
        import torch

        torch.set_num_threads(threads)
        if self._encoder is None or self._encoder[0] != encoder:
            from freeal_stream.slm.encoder import load_encoder

            self._encoder = (encoder, load_encoder(encoder, self.max_length))
        return self._encoder[1].embed(texts)

    def score(self, tag: str, files: dict[str, bytes], texts: list[str], threads: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """(probs, embeddings) of `texts` under the model whose files are given (loaded once per tag)."""
        import torch

        torch.set_num_threads(threads)
        if self._model is None or self._model[0] != tag:
            from freeal_stream.slm.model import SLM, write_model_files

            with tempfile.TemporaryDirectory(prefix="freeal-slm-") as tmp:
                self._model = (tag, SLM.load(write_model_files(files, tmp)))
        model = self._model[1]
        emb = model.embed(texts)
        probs = torch.softmax(torch.from_numpy(model.logits_from_embeddings(emb)), dim=-1).numpy()
        return probs, emb   # computed exactly as the trainer computes them, so a resumed run matches

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def cores(self) -> tuple[str, int]:
        """(node id, cores this process may run on)."""
        return ray.get_runtime_context().get_node_id(), len(os.sched_getaffinity(0))


class ScorerPool:
    """N scorers; `map` spreads shards over them and replaces the ones that die."""

    def __init__(self, max_length: int, threads: int, *, size: int, shard_size: int = 2048,
                 resources: dict[str, float] | None = None, max_restarts: int = 5):
        self.max_length, self.min_threads = max_length, threads
        self.resources = resources or {}
        self.shard_size, self.max_restarts, self.restarts = shard_size, max_restarts, 0
        self.actors = [self._new() for _ in range(size)]
        self._threads: list[int] | None = None   # per actor slot, found on first use

    def _new(self) -> Any:
        return Scorer.options(resources=self.resources).remote(self.max_length)

    def work_threads(self) -> list[int]:
        """Threads per scorer: its node's cores (as many as Ray may use there) shared among the scorers
        placed on that node, and never fewer than slm.threads. A replacement keeps its slot's count."""
        if self._threads is None:
            where = ray.get([a.cores.remote() for a in self.actors])
            cpus = {n["NodeID"]: int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"]}
            on_node = Counter(node for node, _ in where)
            self._threads = [max(self.min_threads, min(cores, cpus.get(node, cores)) // on_node[node])
                             for node, cores in where]
        return self._threads

    def embed(self, texts: Sequence[str], encoder: str) -> np.ndarray:
        threads = self.work_threads()
        parts = self._map(lambda slot, shard: self.actors[slot].embed.remote(encoder, shard, threads[slot]),
                          list(texts))
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def score(self, tag: str, files: dict[str, bytes], texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ref, threads = ray.put(files), self.work_threads()
        parts = self._map(lambda slot, shard: self.actors[slot].score.remote(tag, ref, shard, threads[slot]),
                          list(texts))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _map(self, call: Callable[[int, list[str]], Any], texts: list[str]) -> list[Any]:
        shards = [texts[s:s + self.shard_size] for s in range(0, len(texts), self.shard_size)]
        out: list[Any] = [None] * len(shards)
        todo = list(range(len(shards)))[::-1]
        running: dict[Any, tuple[int, int]] = {}   # ref -> (actor slot, shard)
        busy: set[int] = set()
        while todo or running:
            for slot in range(len(self.actors)):
                if todo and slot not in busy:
                    i = todo.pop()
                    running[call(slot, shards[i])] = (slot, i)
                    busy.add(slot)
            ready, _ = ray.wait(list(running), num_returns=1)
            slot, i = running.pop(ready[0])
            busy.discard(slot)
            try:
                out[i] = ray.get(ready[0])
            except RayActorError:
                self.restarts += 1
                if self.restarts > self.max_restarts:
                    raise
                log.warning("scorer %d died; starting a replacement", slot)
                self.actors[slot] = self._new()
                todo.append(i)
        return out

    def node_ids(self) -> list[str]:
        return ray.get([a.node_id.remote() for a in self.actors])
