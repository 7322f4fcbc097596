"""The trainer actor: robust self-training of the SLM in its own process (on a GPU when there is one).

It returns the scores and the model's files instead of writing them, so the coordinator (next to the
state directory) stores them; a trainer on another node needs no shared disk. `messages` can be polled
while `train` runs (the actor takes two calls at once), which is how the coordinator shows progress.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray

from freeal_stream.config import FreeALConfig, RayConfig, SLMConfig
from freeal_stream.slm.model import model_files
from freeal_stream.slm.trainer import SLMResult, train_slm


@ray.remote(max_restarts=0, max_concurrency=2)
class Trainer:
    def __init__(self, threads: int):
        import torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(threads)
        self._messages: list[str] = []

    def train(self, texts: Sequence[str], labels: np.ndarray, n_classes: int, slm: SLMConfig, freeal: FreeALConfig,
              views: Sequence[str | None] | None, seed: int, cache_dir: str | None
              ) -> tuple[SLMResult, dict[str, bytes]]:
        cache = Path(cache_dir) if cache_dir else None
        if cache is not None and not _writable(cache):
            cache = None   # a node without the coordinator's disk: embed without the cache
        result = train_slm(texts, labels, n_classes, slm, freeal, views=views, seed=seed, cache_dir=cache,
                           progress=self._messages.append)
        files = model_files(result.model)
        result.model = None   # the files travel instead (small in head mode; no pickled torch modules)
        return result, files

    def messages(self) -> list[str]:
        """Progress lines since the last call."""
        out, self._messages[:] = list(self._messages), []
        return out

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.access(path, os.W_OK)
    except OSError:
        return False


def start_trainer(cfg: RayConfig, threads: int, has_gpu: bool) -> Any:
    """The trainer actor: 1 CPU, plus 1 GPU when the job wants one and the cluster has one."""
    gpus = 1 if cfg.trainer_gpu == "always" or (cfg.trainer_gpu == "auto" and has_gpu) else 0
    return Trainer.options(num_cpus=1, num_gpus=gpus, resources=cfg.trainer_resources).remote(threads)
