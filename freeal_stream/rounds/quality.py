"""How good the export is, without gold: each round's calibration, the per-item probabilities the `auto` label of
record compares, and the export's expected accuracy with an interval (docs/METHOD.md section 7).

After a round's SLM is trained, fold SLMs trained with one fold of the LLM labels hidden give every LLM-labelled
item logits from a model that never fitted its label (cross-fitting); `dawid_skene.fit_calibration` fits the
SLM's temperature and the LLM's confusion matrix on them. Then, per item:

  * `p_right`: P(the SLM's prediction is right): its calibrated probability, or, where the LLM labelled the
    item, the posterior given both models (the SLM side from the out-of-fold logits);
  * `llm_p_right`: P(the LLM's label is right) given both (NaN where the LLM gave none).

The export's expected accuracy is the mean, over the pool, of P(the label of record is right); its interval
covers the calibration's own uncertainty (the fit redone on bootstrap resamples of the LLM-labelled items) and
the pool's finite size, not the model's assumptions (bench/bench_pool_quality.py measures those against gold).
The pool is read a shard at a time; only the LLM-labelled rows' out-of-fold logits are held whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from freeal_stream.dawid_skene import Calibration, fit_calibration
from freeal_stream.rounds.arrays import RowArray
from freeal_stream.rounds.context import RoundContext

FOLDS = {"head": 5, "finetune": 2}  # fold SLMs per round: heads are cheap; a fine-tune costs a full training
CALIBRATION_ITEMS = 20_000  # LLM labels the folds hide, at most (all of them below): what the fit needs
BOOTSTRAP = 100  # refits of the calibration for the interval
INTERVAL = 0.9  # the interval's coverage
SAMPLE = 100_000  # pool positions the bootstrap re-evaluates (all of a smaller pool)
COVERAGE = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # thresholds of the coverage table
_META = "quality/round-{}"


@dataclass(frozen=True)
class OutOfFold:
    """Logits of labelled pool positions (sorted) from fold SLMs that did not train on their labels and, in
    fine-tune mode, the fold SLMs' mean logits of the positions the SLM had no label for (`judged_positions`,
    sorted)."""

    positions: np.ndarray
    logits: np.ndarray
    judged_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    judged_logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The logits of these positions; zeros (no opinion) for a labelled position no fold held out (above
        CALIBRATION_ITEMS labels), since the round's own SLM, trained on its label, is no judge of it."""
        return _lookup(self.positions, self.logits, positions, np.zeros((len(positions), self.logits.shape[1])))

    def judge(self, positions: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The logits whose calibrated probabilities say how likely the round's SLM (`logits` at `positions`) is
        right: the fold SLMs' mean where the trainer gave one (fine-tune mode: its few folds learn from a
        fraction of the labels, and the calibration fitted on them does not carry over to the round's SLM,
        which is surer: round 2 of the MR bench read +10 points), else the round's SLM's own."""
        return _lookup(self.judged_positions, self.judged_logits, positions, logits)


def _lookup(keys: np.ndarray, values: np.ndarray, positions: np.ndarray, default: np.ndarray) -> np.ndarray:
    """`values` rows of `positions` found in the sorted `keys`, `default`'s rows elsewhere."""
    out = np.array(default, dtype=np.float32)
    if not len(keys):
        return out
    k = np.minimum(np.searchsorted(keys, positions), len(keys) - 1)
    found = keys[k] == positions
    out[found] = values[k[found]]
    return out


@dataclass(frozen=True)
class ItemProbabilities:
    """Per row: P(right) of the SLM's prediction and of the LLM's label (NaN where there is none)."""

    p_right: np.ndarray
    llm_p_right: np.ndarray


def item_probabilities(
    cal: Calibration, logits: np.ndarray, oof: np.ndarray, llm: np.ndarray, judge: np.ndarray | None = None
) -> ItemProbabilities:
    """Both models' P(right) for rows with the round's SLM `logits`, `oof` logits (read where `llm` >= 0) and
    the LLM's labels `llm` (-1 = none); `judge`: the logits whose calibrated probabilities judge the SLM's
    prediction where the LLM gave no label (`OutOfFold.judge`; default `logits`)."""
    has = llm >= 0
    post = cal.probs(logits if judge is None else judge)
    if has.any():
        post[has] = cal.posteriors(oof[has], llm[has])
    rows = np.arange(len(llm))
    p_llm = np.full(len(llm), np.nan)
    p_llm[has] = post[rows[has], llm[has]]
    return ItemProbabilities(post[rows, logits.argmax(1)], p_llm)


def slm_wins(rule: str, probs: ItemProbabilities, llm: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Where the SLM's prediction is the label of record (as store._LABELS_SQL decides it for a fresh round)."""
    has = llm >= 0
    if rule == "llm":
        return ~has
    if rule == "slm":
        return ~has | ~clean
    return ~has | (probs.p_right > np.nan_to_num(probs.llm_p_right, nan=-1.0))


@dataclass
class Tally:
    """Sums over the pool, a shard at a time, of P(the label of record is right): the point estimate and the
    coverage table."""

    n: int = 0
    total: float = 0.0
    slm_labels: int = 0
    kept: np.ndarray = field(default_factory=lambda: np.zeros(len(COVERAGE)))
    kept_sum: np.ndarray = field(default_factory=lambda: np.zeros(len(COVERAGE)))

    def add(self, p: np.ndarray, wins: np.ndarray) -> None:
        self.n += len(p)
        self.total += float(p.sum())
        self.slm_labels += int(wins.sum())
        for k, t in enumerate(COVERAGE):
            self.kept[k] += (p >= t).sum()
            self.kept_sum[k] += p[p >= t].sum()

    def coverage(self) -> list[dict[str, Any]]:
        """Keeping only the labels at least this likely right: what share of the pool, how right on average."""
        return [
            {"threshold": t, "share": round(float(n / self.n), 4), "accuracy": round(float(s / n), 4) if n else None}
            for t, n, s in zip(COVERAGE, self.kept, self.kept_sum)
        ]


def fit_round_calibration(oof: OutOfFold, labels: np.ndarray, n_classes: int) -> Calibration | None:
    return fit_calibration(oof.logits, labels[oof.positions], n_classes)


def interval(
    rule: str,
    cal: Calibration,
    logits: np.ndarray,
    oof: np.ndarray,
    llm: np.ndarray,
    clean: np.ndarray,
    human: np.ndarray,
    fitted_on: tuple[np.ndarray, np.ndarray],
    seed: int,
    judge: np.ndarray | None = None,
) -> tuple[float, float]:
    """The estimate's interval from the rows given (the pool or a uniform sample of it): the labels of record
    are fixed by the fitted calibration; each bootstrap refit (on resampled `fitted_on` = (oof logits, labels)
    of every LLM-labelled row) re-scores those same labels, plus the pool's own luck (binomial). A human label
    (`human`) is right by fiat. `judge`: as for `item_probabilities`."""
    judge = logits if judge is None else judge
    probs = item_probabilities(cal, logits, oof, llm, judge)
    wins = slm_wins(rule, probs, llm, clean)
    chosen = np.where(wins, logits.argmax(1), llm)
    rows, has = np.arange(len(llm)), llm >= 0
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP):
        at = rng.choice(len(fitted_on[1]), len(fitted_on[1]))
        refit = fit_calibration(fitted_on[0][at], fitted_on[1][at], logits.shape[1])
        if refit is None:
            continue
        post = refit.probs(judge)
        if has.any():
            post[has] = refit.posteriors(oof[has], llm[has])
        q = np.where(human, 1.0, post[rows, chosen])
        draws.append(q.mean() + rng.normal(0.0, np.sqrt((q * (1 - q)).sum()) / len(q)))
    tail = (1 - INTERVAL) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def store_quality(
    ctx: RoundContext,
    round_: int,
    cal: Calibration,
    tally: Tally,
    labels: np.ndarray,
    human: np.ndarray,
    logits: RowArray,
    oof: OutOfFold,
    clean: np.ndarray,
) -> dict[str, Any]:
    """The round's calibration and the export's estimate (point from `tally`, the interval from a sample of the
    pool), stored for `round_quality`; returns the estimate. `labels`: the LLM's (-1: none); `human`: rows a
    human labelled."""
    rule = ctx.job.freeal.label_of_record
    sample = np.arange(len(labels))
    if len(sample) > SAMPLE:
        sample = np.sort(np.random.default_rng(ctx.job.seed + round_).choice(sample, SAMPLE, replace=False))
    llm = labels[sample]
    oof_rows = np.full((len(sample), ctx.n_classes), np.nan, dtype=np.float32)
    has = llm >= 0
    oof_rows[has] = oof.at(sample[has])
    slm_rows = logits.gather(sample)
    low, high = interval(
        rule,
        cal,
        slm_rows,
        oof_rows,
        llm,
        clean[sample],
        human[sample],
        (oof.logits, labels[oof.positions]),
        ctx.job.seed + round_,
        oof.judge(sample, slm_rows),
    )
    point = tally.total / tally.n
    est = {
        "accuracy": round(point, 4),
        "low": round(min(low, point), 4),
        "high": round(max(high, point), 4),
        "interval": INTERVAL,
        "rule": rule,
        "items": tally.n,
        "slm_labels": round(tally.slm_labels / tally.n, 4),
        "coverage": tally.coverage(),
    }
    ctx.store.set_meta(_META.format(round_), json.dumps({"calibration": cal.to_json(), "estimate": est}))
    return est


def round_quality(ctx: RoundContext, round_: int) -> dict[str, Any]:
    """What `store_quality` stored for the round: {calibration, estimate}, or {} when it could not calibrate."""
    stored = ctx.store.get_meta(_META.format(round_))
    return json.loads(stored) if stored else {}


def target_reached(ctx: RoundContext, round_: int) -> str | None:
    """Why no more should be spent, when round `round_`'s estimate of the export's accuracy (its interval's lower
    end) has reached `freeal.target_accuracy`; else None."""
    target = ctx.job.freeal.target_accuracy
    est = round_quality(ctx, round_).get("estimate") if target is not None and round_ > 0 else None
    if est is None or est["low"] < target:
        return None
    return (
        f"the export's estimated accuracy after round {round_}, {est['accuracy']:.3f} [{est['low']:.3f}, "
        f"{est['high']:.3f}], has reached freeal.target_accuracy {target:.3f}"
    )
