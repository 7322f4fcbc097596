"""The coordinator: FreeAL rounds as a short state machine over what the store holds.

A round goes plan -> annotate -> train -> demo pool, and records each phase as it completes, so a rerun
resumes where a killed run stopped: a stored plan rebuilds the same requests (answers already paid for come
from the store), a trained round is not trained again. The steps live in `freeal_stream.rounds`:
planning (which texts, which demos, what the budget pays for), annotation, training and scoring, metrics.
"""

from __future__ import annotations

import dataclasses
import time
from enum import Enum
from typing import Any

import numpy as np

from freeal_stream.progress import Progress
from freeal_stream.rounds.annotation import annotate, warn_if_one_class
from freeal_stream.rounds.context import RoundContext
from freeal_stream.rounds.metrics import PhaseClock, format_round, round_metrics
from freeal_stream.rounds.planning import RoundPlan, plan_round, stored_plan
from freeal_stream.rounds.state import SLMState, softmax, state_after
from freeal_stream.rounds.training import select_demos, train_round
from freeal_stream.session import Session
from strategies.registry import load_strategy


class Phase(str, Enum):  # noqa: UP042 (StrEnum would change str() and format() of a member)
    """Where a round stands (stored as its value in `rounds.phase`)."""

    ANNOTATING = "annotating"  # the plan is stored; requests are being sent
    ANNOTATED = "annotated"  # every planned answer is stored
    TRAINED = "trained"  # the SLM is trained, the pool scored with it, the scores stored
    DONE = "done"  # the demo pool and the round's figures are stored


class FreeALRun:
    """Runs a job's rounds with a session's actors; all state goes to (and comes back from) the store."""

    def __init__(self, session: Session, progress: Progress | None = None):
        self.ctx = RoundContext(session, progress or Progress())
        self.strategy = load_strategy(session.job.strategy.name, session.job.strategy.params)
        self.latest: SLMState | None = None  # the state after the last round this run finished

    def run(self, last_round: int | None = None) -> list[dict[str, Any]]:
        """Rounds 1..last_round (default: the job's `freeal.rounds`) that are not done yet; their figures."""
        for round_ in range(1, (last_round or self.ctx.job.freeal.rounds) + 1):
            if not self.run_round(round_):
                break
        return [r["metrics"] for r in self.ctx.store.rounds() if r["phase"] == Phase.DONE.value]

    def next_round(self) -> int:
        rounds = self.ctx.store.rounds()
        return (rounds[-1]["round"] + (rounds[-1]["phase"] == Phase.DONE.value)) if rounds else 1

    def run_round(self, round_: int) -> bool:
        """Run (or finish) one round; False when the run should stop (nothing left to annotate, budget spent)."""
        ctx, phase = self.ctx, self._phase(round_)
        if phase is Phase.DONE:
            return True
        started, spent_before = time.time(), ctx.store.spent()  # round 1's cost includes generating its demos
        clock = PhaseClock()
        ctx.pool.refresh()
        before = state_after(ctx, round_ - 1)
        plan = self._plan(round_, phase, before)
        clock.lap("plan")
        if plan is None:
            return False
        if phase in (None, Phase.ANNOTATING):
            annotate(ctx, plan)
            warn_if_one_class(ctx, round_)
            phase = self._enter(round_, Phase.ANNOTATED)
            clock.lap("annotate")
        if phase is Phase.ANNOTATED:
            phase = self._enter(round_, Phase.TRAINED, model_path=str(train_round(ctx, round_)))
            clock.lap("train")
        trained = state_after(ctx, round_)
        demos, clean = select_demos(ctx, round_, trained)
        self.latest = dataclasses.replace(trained, demos=tuple(demos))
        clock.lap("demos")
        metrics = round_metrics(ctx, self.latest, started, len(plan), clean, spent_before, clock.laps)
        self._enter(round_, Phase.DONE, metrics=metrics)
        ctx.say(format_round(metrics))
        if ctx.session.guard.refused:
            ctx.say("budget exhausted: stopping after this round")
            return False
        return True

    def _plan(self, round_: int, phase: Phase | None, before: SLMState) -> RoundPlan | None:
        """A new round's plan (stored before anything is sent), or the stored plan of a round under way."""
        ctx, fr = self.ctx, self.ctx.job.freeal
        if phase is not None:
            stored = stored_plan(ctx, round_, before)
            step = {Phase.ANNOTATING: "annotation", Phase.ANNOTATED: "training", Phase.TRAINED: "the demo pool"}
            ctx.say(f"round {round_}: resuming at {step[phase]} (its plan of {len(stored)} texts is stored)")
            return stored
        plan = plan_round(ctx, round_, before, self.strategy)
        if plan is not None:
            ctx.store.set_round_plan(round_, list(plan.items))
            self._enter(round_, Phase.ANNOTATING)
            ctx.say(
                f"round {round_}/{max(fr.rounds, round_)}: {len(plan)} texts to the LLM "
                f"({'refinement' if fr.schedule == 'full' and round_ > 1 else fr.schedule})"
            )
        return plan

    def _phase(self, round_: int) -> Phase | None:
        stored = {r["round"]: r["phase"] for r in self.ctx.store.rounds()}.get(round_)
        return None if stored is None else Phase(stored)

    def _enter(self, round_: int, phase: Phase, **extra: Any) -> Phase:
        self.ctx.store.set_phase(round_, self.ctx.job.freeal.schedule, phase.value, **extra)
        return phase

    def label_new_with_slm(self) -> int:
        """Score the items no round has seen with the latest SLM (no LLM cost), for when no round can run."""
        done = [r["round"] for r in self.ctx.store.rounds() if r["phase"] == Phase.DONE.value]
        if not done:
            return 0
        self.ctx.pool.refresh()
        new = self.ctx.store.unscored_positions()
        if len(new):
            state = state_after(self.ctx, done[-1])
            assert state.logits is not None  # a done round has an SLM
            self.ctx.store.add_scores(
                state.round, new, softmax(state.logits.gather(new)), np.full(len(new), np.nan), np.zeros(len(new), bool)
            )
        return len(new)
