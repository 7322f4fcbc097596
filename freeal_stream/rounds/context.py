"""What every step of a round works with: the job, its session's actors and store, the pool, the verbalizer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from freeal_stream.config import STATIC_ENCODER, JobConfig, LLMConfig, SLMConfig
from freeal_stream.llm.verbalizer import Verbalizer
from freeal_stream.progress import Progress
from freeal_stream.rounds.pool import Pool
from freeal_stream.session import Session
from freeal_stream.slm.encoder import choose_encoder
from freeal_stream.slm.static_encoder import distilled_dir
from freeal_stream.store import Store


@dataclass
class RoundContext:
    session: Session
    progress: Progress

    @property
    def job(self) -> JobConfig:
        return self.session.job

    @property
    def store(self) -> Store:
        return self.session.store

    @cached_property
    def llm(self) -> LLMConfig:
        """The job's LLM settings with the model name the endpoint serves."""
        return dataclasses.replace(self.job.llm, model=self.session.model_name)

    @cached_property
    def verbalizer(self) -> Verbalizer:
        return Verbalizer(self.job.task.classes)

    @property
    def n_classes(self) -> int:
        return len(self.job.task.classes)

    @property
    def arrays_dir(self) -> Path:
        return self.job.state_path / "arrays"

    @cached_property
    def encoder(self) -> str:
        """The job's frozen encoder. `auto` is chosen once, by the pool's size when the first round starts, and
        kept in the store, so every later round (however the pool grows) and every resumed run use the same one."""
        choice = choose_encoder(self.job.slm, self.store.count_items(), self.store.get_meta("slm_encoder"))
        self.store.set_meta("slm_encoder", choice.name)
        self.say(choice.why)
        if choice.name == STATIC_ENCODER and not distilled_dir().is_dir():
            self.say(
                f"{STATIC_ENCODER} is distilled from the bundled MiniLM on its first use (about a minute on a "
                f"quiet core; kept in {distilled_dir().parent})"
            )
        return choice.name

    @cached_property
    def slm(self) -> SLMConfig:
        """The job's SLM settings with the frozen encoder resolved (what the trainer builds its model with)."""
        return dataclasses.replace(self.job.slm, encoder=self.encoder)

    @cached_property
    def pool(self) -> Pool:
        return Pool(
            self.store,
            self.arrays_dir,
            self.session.scorers,
            self.encoder,
            self.job.slm.max_length,
            self.job.task.class_names,
            self.progress,
        )

    def say(self, msg: str) -> None:
        self.progress.say(msg)
