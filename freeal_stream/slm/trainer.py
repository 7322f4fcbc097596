"""Robust self-training of the SLM on noisy LLM labels (docs/METHOD.md section 3), in two modes.

`finetune` trains the whole encoder + a linear head; `head` freezes the encoder (embeddings computed once,
cached on disk) and trains a small MLP, for pools too large to fine-tune on. Both share one loop: only
how a batch's head inputs are produced differs (`_FrozenInputs` / `_TextInputs`).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from freeal_stream.config import STATIC_ENCODER, FreeALConfig, SLMConfig
from freeal_stream.slm.augment import feature_noise, perturb
from freeal_stream.slm.encoder import Encoder, cached_embed, choose_encoder, load_encoder
from freeal_stream.slm.model import SLM, Mode
from freeal_stream.slm.robust import alpha_ramp, classwise_clean_split, gmm_clean_split, kl_consistency, mixup, soft_ce

LR_WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
EMBED_BATCH = 64
# Head mode runs cfg.epochs as configured, but an epoch there is at least HEAD_MIN_STEPS steps: with few labelled
# rows (a budgeted round 1) one pass is a few dozen steps, warm-up would end with a near-untrained head and the
# GMM split then follows the class prior. Head steps cost microseconds. Figures: BENCHMARKS.md, "Figures behind
# the defaults".
HEAD_MIN_STEPS = 100
# freeal.warmup_epochs: null picks the warm-up by how many labels the SLM learns from: on few, noisy labels a
# longer warm-up fits the noise before the split; on many, a split after one epoch is made by a barely trained
# model. Figures: BENCHMARKS.md 4b.4.
SHORT_WARMUP, LONG_WARMUP, LONG_WARMUP_MIN_LABELS = 1, 3, 500


@dataclass(frozen=True)
class Recipe:
    """Ablation switches; Recipe() is the full robust recipe.

    `per_class_split` fits the clean/noisy GMM within each LLM label instead of once over all rows (the paper's
    form is per_class_split=False; docs/METHOD.md section 3): one global fit discards a whole class as 'noisy'
    whenever the model still leans to the other class. Figures: BENCHMARKS.md, "Figures behind the defaults".
    """

    gmm: bool = True
    consistency: bool = True
    mixup: bool = True
    per_class_split: bool = True

    @classmethod
    def plain_ce(cls) -> Recipe:
        """Ordinary CE on all labelled rows: the baseline the robust recipe must beat."""
        return cls(gmm=False, consistency=False, mixup=False)


@dataclass
class SLMResult:
    probs: np.ndarray  # (n, C) softmax for every text passed in
    embeddings: np.ndarray  # (n, d) L2-normalised sentence embeddings (demo selection, retrieval)
    losses: np.ndarray  # (n,) CE w.r.t. the given label after training; NaN where label == -1
    clean: np.ndarray  # (n,) bool, clean split of the final losses (False where label == -1;
    #   every labelled row when the recipe has no GMM)
    mode: str  # 'finetune' | 'head'
    history: list[dict]  # per epoch: epoch, alpha, loss terms, n_clean, n_pool, rows, seconds, samples_per_s
    model: SLM


def resolve_mode(cfg: SLMConfig, n_items: int, n_labelled: int) -> str:
    """'auto' fine-tunes when it is both affordable and worth it, else trains a head on frozen embeddings.

    Affordable: n_items <= finetune_max_items (a pass over the pool costs ~1/32 s a text on a CPU).
    Worth it: n_labelled >= finetune_min_labels. On few labels a fine-tuned encoder gets too few steps
    and a frozen one with the robust recipe is better and ~10x faster; on many, fine-tuning wins
    (BENCHMARKS.md sections 3 and 4b.5).
    """
    if cfg.mode != "auto":
        return cfg.mode
    if cfg.encoder == STATIC_ENCODER:
        return "head"  # a static encoder has nothing to fine-tune
    if n_items <= cfg.finetune_max_items and n_labelled >= cfg.finetune_min_labels:
        return "finetune"
    return "head"


def resolve_warmup(freeal: FreeALConfig, n_labelled: int, epochs: int) -> int:
    """The configured warm-up, or (null) 1 epoch on few labels and 3 on LONG_WARMUP_MIN_LABELS or more,
    but never so long that fewer than one of `epochs` is left for the recipe (a chosen default must not
    silently turn it into plain CE)."""
    if freeal.warmup_epochs is not None:
        return freeal.warmup_epochs
    long_enough = LONG_WARMUP if n_labelled >= LONG_WARMUP_MIN_LABELS else SHORT_WARMUP
    return max(SHORT_WARMUP, min(long_enough, epochs - 1))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


class _Inputs(Protocol):
    """Head inputs (normalised sentence embeddings) for rows of the training set."""

    def orig(self, idx: np.ndarray) -> torch.Tensor: ...
    def aug(self, idx: np.ndarray) -> torch.Tensor: ...
    def frozen(self, idx: np.ndarray) -> np.ndarray: ...


class _FrozenInputs:
    """Head mode: everything is a lookup into embeddings computed once."""

    def __init__(self, emb: np.ndarray, view_emb: np.ndarray | None, has_view: np.ndarray | None, device: torch.device):
        self.emb = torch.from_numpy(emb).to(device)
        self.view_emb = None if view_emb is None else torch.from_numpy(view_emb).to(device)
        self.has_view = None if has_view is None else torch.from_numpy(has_view).to(device)

    def orig(self, idx: np.ndarray) -> torch.Tensor:
        return self.emb[torch.from_numpy(idx).to(self.emb.device)]

    def aug(self, idx: np.ndarray) -> torch.Tensor:
        noisy = feature_noise(self.orig(idx))
        if self.view_emb is None:
            return noisy
        assert self.has_view is not None  # given with view_emb
        t = torch.from_numpy(idx).to(self.emb.device)
        return torch.where(self.has_view[t, None], self.view_emb[t], noisy)  # rows without a view: noise

    def frozen(self, idx: np.ndarray) -> np.ndarray:
        return self.emb[torch.from_numpy(idx).to(self.emb.device)].cpu().numpy()


class _TextInputs:
    """Fine-tune mode: every batch goes through the (trainable) encoder."""

    def __init__(self, model: SLM, texts: Sequence[str], views: Sequence[str | None] | None, rng: np.random.Generator):
        self.model, self.texts, self.views, self.rng = model, texts, views, rng

    @property
    def encoder(self) -> Encoder:
        enc = self.model.encoder
        assert isinstance(enc, Encoder)  # fine-tune mode: SLM refuses the static encoder
        return enc

    def orig(self, idx: np.ndarray) -> torch.Tensor:
        enc = self.encoder
        return enc(enc.tokenize([self.texts[i] for i in idx]))

    def aug(self, idx: np.ndarray) -> torch.Tensor:
        enc = self.encoder
        views = [None if self.views is None else self.views[i] for i in idx]
        return enc(
            enc.tokenize(
                [v if v is not None else perturb(enc.cut(self.texts[i]), self.rng) for i, v in zip(idx, views)]
            )
        )

    def frozen(self, idx: np.ndarray) -> np.ndarray:
        return self.model.encoder.embed([self.texts[i] for i in idx], EMBED_BATCH)


def per_sample_ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's cross-entropy against its label: the loss the small-loss split and the demo filter rank by."""
    return F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels).long(), reduction="none").numpy()


def _lr_factor(progress: float) -> float:
    """Linear warm-up over the first LR_WARMUP_FRACTION of training, then linear decay to 0."""
    if progress < LR_WARMUP_FRACTION:
        return progress / LR_WARMUP_FRACTION
    return max(0.0, (1.0 - progress) / (1.0 - LR_WARMUP_FRACTION))


def _optimizer(model: SLM, cfg: SLMConfig) -> torch.optim.Optimizer:
    """The head always learns at head_learning_rate: at the encoder's lr a fresh head barely moves."""
    groups = [{"params": list(model.head.parameters()), "lr": cfg.head_learning_rate}]
    if model.mode == "finetune":
        groups.append({"params": list(model.encoder.parameters()), "lr": cfg.learning_rate})
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)


def _clean_split(losses: np.ndarray, labels: np.ndarray, tau: float, seed: int, recipe: Recipe) -> np.ndarray:
    if recipe.per_class_split:
        return classwise_clean_split(losses, labels, tau, seed)[0]
    return gmm_clean_split(losses, tau, seed)[0]


@dataclass
class _Split:
    clean: np.ndarray  # row indices of D_l (supervised terms)
    pool: np.ndarray  # row indices for L_cr_u: D_u plus rows without a label


def _split(
    model: SLM,
    inputs: _Inputs,
    labels: np.ndarray,
    epoch: int,
    freeal: FreeALConfig,
    recipe: Recipe,
    warmup: int,
    seed: int,
    trusted: np.ndarray | None = None,
) -> _Split:
    labelled, unlabelled = np.flatnonzero(labels >= 0), np.flatnonzero(labels < 0)
    if recipe.gmm and epoch > warmup:
        losses = per_sample_ce(model.logits_from_embeddings(inputs.frozen(labelled)), labels[labelled])
        mask = _clean_split(losses, labels[labelled], freeal.tau, seed + epoch, recipe)
        if trusted is not None:
            mask |= trusted[labelled]
    else:
        mask = np.ones(len(labelled), dtype=bool)
    pool = np.concatenate([labelled[~mask], unlabelled]) if recipe.consistency else unlabelled[:0]
    return _Split(labelled[mask], pool)


def _target_logits(model: SLM, inputs: _Inputs, idx: np.ndarray) -> torch.Tensor:
    """The original view's prediction as a fixed target: no grad, no dropout."""
    model.eval()
    with torch.no_grad():
        out = model.head(inputs.orig(idx))
    model.train()
    return out


def _epoch_order(rows: np.ndarray, batch_size: int, min_steps: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffled rows, passed over again (reshuffled) until there are at least `min_steps` batches."""
    parts = [rng.permutation(rows)]
    while len(rows) and len(parts) * len(rows) < min_steps * batch_size:
        parts.append(rng.permutation(rows))
    return np.concatenate(parts)


def _run_epoch(
    model: SLM,
    inputs: _Inputs,
    labels: np.ndarray,
    split: _Split,
    alpha: float,
    recipe: Recipe,
    n_classes: int,
    freeal: FreeALConfig,
    opt: torch.optim.Optimizer,
    batch_size: int,
    epoch: int,
    epochs: int,
    rng: np.random.Generator,
    on_step: Callable[[int, int, int], None] | None = None,
) -> dict[str, float]:
    """One pass over D_l; returns the mean of each loss term and `rows`, the D_l rows stepped through."""
    model.train()
    order = _epoch_order(split.clean, batch_size, HEAD_MIN_STEPS if model.mode == "head" else 1, rng)
    steps = max(1, -(-len(order) // batch_size))
    sums = dict.fromkeys(["loss", "l_clean", "l_cr_l", "l_cr_u", "l_mix"], 0.0)
    device = model.device
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * _lr_factor((epoch - 1 + step / steps) / epochs)
        idx = order[step * batch_size : (step + 1) * batch_size]
        if len(idx) == 0:
            break
        y = torch.from_numpy(labels[idx]).long().to(device)
        emb = inputs.orig(idx)
        terms = {"l_clean": F.cross_entropy(model.head(emb), y)}
        if alpha > 0 and recipe.consistency:
            terms["l_cr_l"] = F.cross_entropy(model.head(inputs.aug(idx)), y)
            if len(split.pool):
                u = rng.choice(split.pool, size=min(len(idx), len(split.pool)), replace=False)
                terms["l_cr_u"] = kl_consistency(model.head(inputs.aug(u)), _target_logits(model, inputs, u))
        if alpha > 0 and recipe.mixup:
            mixed = mixup(emb, F.one_hot(y, n_classes).float(), freeal.mixup_alpha, rng)
            terms["l_mix"] = soft_ce(model.head(mixed.emb), mixed.targets)
        loss = terms["l_clean"] + alpha * sum(
            (v for k, v in terms.items() if k != "l_clean"), torch.zeros((), device=device)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        sums["loss"] += loss.item()
        for k, v in terms.items():
            sums[k] += v.item()
        if on_step is not None:
            on_step(epoch, step + 1, steps)
    return {**{k: v / steps for k, v in sums.items()}, "rows": len(order)}


@dataclass(frozen=True)
class TrainingData:
    """The rows one SLM trains on, aligned: `labels` (-1 = no label: the row only enters L_cr_u) and, by mode,
    the rows' frozen embeddings (head) or their texts (fine-tune), each with its consistency view where there
    is one (head: `view_emb` where `has_view`; fine-tune: `views`, None = model-free perturbation)."""

    labels: np.ndarray
    emb: np.ndarray | None = None
    view_emb: np.ndarray | None = None
    has_view: np.ndarray | None = None
    texts: Sequence[str] | None = None
    views: Sequence[str | None] | None = None
    trusted: np.ndarray | None = None  # rows whose label is clean by fiat (a human's): never in the noisy split

    @property
    def mode(self) -> Mode:
        return "head" if self.emb is not None else "finetune"

    def check(self, n_classes: int) -> None:
        rows = len(self.emb) if self.emb is not None else len(self.texts or [])
        if (self.emb is None) == (self.texts is None):
            raise ValueError("give either frozen embeddings (head mode) or texts (fine-tune mode)")
        if len(self.labels) != rows:
            raise ValueError(f"{rows} texts but {len(self.labels)} labels")
        for name in ("view_emb", "has_view", "views", "trusted"):
            col = getattr(self, name)
            if col is not None and len(col) != rows:
                what = name.replace("_emb", "s").replace("has_view", "views")
                raise ValueError(f"{rows} texts but {len(col)} {what}")
        if n_classes < 2:
            raise ValueError("n_classes must be >= 2")
        if len(self.labels) and (self.labels.min() < -1 or self.labels.max() >= n_classes):
            raise ValueError(f"labels must be in [-1, {n_classes - 1}] (-1 = no label)")


@dataclass
class FittedSLM:
    model: SLM
    mode: str
    history: list[dict]  # per epoch: epoch, alpha, loss terms, n_clean, n_pool, rows, seconds, samples_per_s


def fit_slm(
    data: TrainingData,
    n_classes: int,
    cfg: SLMConfig,
    freeal: FreeALConfig,
    *,
    recipe: Recipe = Recipe(),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
) -> FittedSLM:
    """Train an SLM from scratch on `data` with the robust recipe (docs/METHOD.md section 3); `progress` gets
    a line per epoch, `on_step(epoch, step, steps)` is called after every optimiser step."""
    labels = np.asarray(data.labels, dtype=np.int64)
    data.check(n_classes)
    say = progress or (lambda _msg: None)
    torch.set_num_threads(cfg.threads)
    rng = seed_everything(seed)
    n_labelled = int((labels >= 0).sum())
    model = SLM(cfg.encoder, data.mode, n_classes, cfg.max_length, cfg.head_hidden, resolve_device(cfg.device))
    epochs, warmup, rampup = cfg.epochs, resolve_warmup(freeal, n_labelled, cfg.epochs), freeal.rampup_epochs
    inputs: _Inputs
    if data.emb is not None:
        inputs = _FrozenInputs(data.emb, data.view_emb, data.has_view, model.device)
    else:
        inputs = _TextInputs(model, data.texts or [], data.views, rng)

    opt = _optimizer(model, cfg)
    if n_labelled == 0:  # e.g. the LLM gave no usable answer this round: report, don't crash the run
        say("no labelled rows: nothing to learn from, the SLM's predictions are its untrained head's")
    history: list[dict] = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        split = _split(model, inputs, labels, epoch, freeal, recipe, warmup, seed, data.trusted)
        t1 = time.perf_counter()
        alpha = alpha_ramp(epoch, warmup, rampup) if recipe.consistency or recipe.mixup else 0.0
        terms = _run_epoch(
            model,
            inputs,
            labels,
            split,
            alpha,
            recipe,
            n_classes,
            freeal,
            opt,
            cfg.batch_size,
            epoch,
            epochs,
            rng,
            on_step,
        )
        t2 = time.perf_counter()
        rec = {
            "epoch": epoch,
            "alpha": alpha,
            **terms,
            "n_clean": len(split.clean),
            "n_pool": len(split.pool),
            "split_seconds": t1 - t0,
            "seconds": t2 - t0,
            "samples_per_s": terms["rows"] / max(t2 - t1, 1e-9),
        }
        history.append(rec)
        say(
            f"epoch {epoch}/{epochs}: loss {rec['loss']:.3f} alpha {alpha:.2f} "
            f"clean {rec['n_clean']}/{n_labelled} {rec['samples_per_s']:.0f} samples/s"
        )
    model.eval()
    return FittedSLM(model, data.mode, history)


def fold_of(labels: np.ndarray, folds: int, seed: int, held_out: int | None = None) -> np.ndarray:
    """Each labelled row's fold (0..folds-1, balanced within each class), -1 for rows without a label and, beyond
    `held_out` rows per fold, for rows no fold hides (calibration needs a few thousand, not millions)."""
    fold = np.full(len(labels), -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels[labels >= 0]):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = (np.arange(len(rows)) + rng.integers(folds)) % folds
    if held_out is not None and (fold >= 0).sum() > folds * held_out:
        for k in range(folds):
            rows = rng.permutation(np.flatnonzero(fold == k))
            fold[rows[held_out:]] = -1
    return fold


def out_of_fold_logits(
    data: TrainingData,
    n_classes: int,
    cfg: SLMConfig,
    freeal: FreeALConfig,
    folds: int,
    *,
    held_out: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Logits for labelled rows from an SLM that did not train on their label: `folds` SLMs, each trained as
    `fit_slm` trains one with one fold's labels (at most `held_out` of them) hidden; those rows stay in the
    consistency term, which uses no label. What calibration needs: a model's confidence judged on labels it never
    fitted (its own training labels it has partly memorised). Labelled rows no fold hid get NaN.

    Rows without a label get NaN in head mode and, in fine-tune mode, the fold SLMs' mean logits: there the few
    fold SLMs each learn from a fraction of the labels and are less sure than the round's SLM, so a temperature
    fitted on them does not carry over to it; the quality estimate judges those rows with the folds' mean
    instead (rounds.quality.OutOfFold.judge)."""
    labels = np.asarray(data.labels, dtype=np.int64)
    fold = fold_of(labels, folds, seed, held_out)
    out = np.full((len(labels), n_classes), np.nan, dtype=np.float32)
    unlabelled = np.flatnonzero(labels < 0) if data.emb is None else np.zeros(0, np.int64)
    ensemble = np.zeros((len(unlabelled), n_classes), dtype=np.float32)
    say = progress or (lambda _msg: None)
    fitted_folds = 0
    for k in range(folds):
        held = np.flatnonzero(fold == k)
        if not len(held):
            continue
        t0 = time.perf_counter()
        fitted = fit_slm(
            dataclasses.replace(data, labels=np.where(fold == k, -1, labels)), n_classes, cfg, freeal, seed=seed + k + 1
        )
        if data.emb is not None:
            out[held] = fitted.model.logits_from_embeddings(data.emb[held])
        else:
            assert data.texts is not None  # fine-tune data carries texts, head data embeddings
            texts = data.texts
            rows = np.concatenate([held, unlabelled]).tolist()
            scored = fitted.model.encoder.embed([texts[i] for i in rows], EMBED_BATCH)
            logits = fitted.model.logits_from_embeddings(scored)
            out[held] = logits[: len(held)]
            ensemble += logits[len(held) :]
            fitted_folds += 1
        say(f"calibration fold {k + 1}/{folds}: {len(held)} held-out labels ({time.perf_counter() - t0:.0f} s)")
    if fitted_folds:
        out[unlabelled] = ensemble / fitted_folds
    return out


def final_split(
    logits: np.ndarray, labels: np.ndarray, tau: float, seed: int, recipe: Recipe = Recipe()
) -> tuple[np.ndarray, np.ndarray]:
    """(losses, clean) of the trained model on labelled rows: each row's CE (NaN where label == -1) and the
    clean flag of the GMM small-loss split (every labelled row when the recipe has no GMM)."""
    labelled = labels >= 0
    losses = np.full(len(labels), np.nan)
    losses[labelled] = per_sample_ce(logits[labelled], labels[labelled])
    clean = labelled.copy()
    if recipe.gmm:
        clean[labelled] = _clean_split(losses[labelled], labels[labelled], tau, seed, recipe)
    return losses, clean


def train_slm(
    texts: Sequence[str],
    labels: np.ndarray,
    n_classes: int,
    cfg: SLMConfig,
    freeal: FreeALConfig,
    *,
    views: Sequence[str | None] | None = None,
    recipe: Recipe = Recipe(),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    cache_dir: Path | None = None,
) -> SLMResult:
    """Train an SLM on `labels` (-1 = no label) for `texts` and predict every text: `fit_slm` for a set that
    fits in memory (benchmarks, tests; the coordinator feeds `fit_slm` rows of the pool itself).

    `views` are augmented texts (e.g. back-translations) for the consistency terms; None, for the whole
    list or for one row, uses model-free noise. `cache_dir` stores frozen embeddings (head mode).
    `cfg.encoder: auto` is resolved by len(texts) here (the coordinator passes the job's pinned choice).
    """
    labels = np.asarray(labels, dtype=np.int64)
    cfg = dataclasses.replace(cfg, encoder=choose_encoder(cfg, len(texts)).name)
    if len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if views is not None and len(views) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(views)} views")
    say = progress or (lambda _msg: None)
    torch.set_num_threads(cfg.threads)
    mode = resolve_mode(cfg, len(texts), int((labels >= 0).sum()))
    if mode == "head":
        t0 = time.perf_counter()
        encoder = load_encoder(cfg.encoder, cfg.max_length, resolve_device(cfg.device))
        say(f"embedding {len(texts):,} texts{'' if views is None else ' + views'} (frozen {encoder.name})")
        emb = cached_embed(encoder, texts, cache_dir, EMBED_BATCH)
        has_view = None if views is None else np.array([v is not None for v in views])
        view_emb = (
            None
            if views is None
            else cached_embed(
                encoder, [v if v is not None else t for v, t in zip(views, texts)], cache_dir, EMBED_BATCH
            )
        )
        say(f"embeddings ready in {time.perf_counter() - t0:.0f} s")
        data = TrainingData(labels, emb=emb, view_emb=view_emb, has_view=has_view)
    else:
        data = TrainingData(labels, texts=texts, views=views)
    fitted = fit_slm(data, n_classes, cfg, freeal, recipe=recipe, seed=seed, progress=progress)
    embeddings = emb if mode == "head" else fitted.model.encoder.embed(texts, EMBED_BATCH)
    logits = fitted.model.logits_from_embeddings(embeddings)
    probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    losses, clean = final_split(logits, labels, freeal.tau, seed, recipe)
    return SLMResult(
        probs=probs,
        embeddings=embeddings,
        losses=losses,
        clean=clean,
        mode=mode,
        history=fitted.history,
        model=fitted.model,
    )
