"""The trainer actor: robust self-training of the SLM in its own process (on a GPU when there is one).

It gets the rows to train on (the labelled ones and a sample of the rest for the consistency term) and
returns the model's files instead of writing them, so a trainer on another node needs no shared disk; the
scorers then score the whole pool with those files. `messages` can be polled while `train` runs (the actor
takes two calls at once), and `step` says where the current epoch is, which is how the coordinator shows progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from freeal_stream.config import FreeALConfig, RayConfig, SLMConfig
from freeal_stream.slm.model import model_files
from freeal_stream.slm.trainer import TrainingData, fit_slm, out_of_fold_logits


@dataclass(frozen=True)
class TrainedSLM:
    """A trained model as files (they travel between nodes), with its mode and per-epoch history."""

    files: dict[str, bytes]
    mode: str
    history: list[dict]


@ray.remote(max_restarts=0, max_concurrency=2)  # type: ignore[call-overload]  # Ray's stub lacks max_concurrency
class Trainer:
    def __init__(self, threads: int):
        import torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(threads)
        self._messages: list[str] = []
        self._step: tuple[int, int, int] | None = None  # (epoch, step, steps) of the training under way

    def train(self, data: TrainingData, n_classes: int, slm: SLMConfig, freeal: FreeALConfig, seed: int) -> TrainedSLM:
        self._step = None
        fitted = fit_slm(data, n_classes, slm, freeal, seed=seed, progress=self._messages.append, on_step=self._on_step)
        return TrainedSLM(model_files(fitted.model), fitted.mode, fitted.history)

    def _on_step(self, epoch: int, step: int, steps: int) -> None:
        self._step = (epoch, step, steps)

    def step(self) -> tuple[int, int, int] | None:
        """(epoch, step, steps) of the training under way, None before its first step."""
        return self._step

    def out_of_fold(
        self,
        data: TrainingData,
        n_classes: int,
        slm: SLMConfig,
        freeal: FreeALConfig,
        folds: int,
        held_out: int,
        seed: int,
    ) -> np.ndarray:
        """Logits of labelled rows from fold models that did not see their label (calibration); progress by
        message per fold, not by step."""
        self._step = None
        return out_of_fold_logits(
            data, n_classes, slm, freeal, folds, held_out=held_out, seed=seed, progress=self._messages.append
        )

    def messages(self) -> list[str]:
        """Progress lines since the last call."""
        out, self._messages[:] = list(self._messages), []
        return out

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def start_trainer(cfg: RayConfig, threads: int, has_gpu: bool) -> Any:
    """The trainer actor: 1 CPU, plus 1 GPU when the job wants one and the cluster has one."""
    gpus = 1 if cfg.trainer_gpu == "always" or (cfg.trainer_gpu == "auto" and has_gpu) else 0
    # mypy does not apply the @ray.remote class decorator, so it cannot see ActorClass.options
    return Trainer.options(  # type: ignore[attr-defined]
        num_cpus=1, num_gpus=gpus, resources=cfg.trainer_resources
    ).remote(threads)
