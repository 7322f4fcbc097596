"""Large, realistic, labelled text pools made deterministically from MR's sentences (for scale benchmarks).

MR has 10,662 movie-review sentences with a gold polarity. A synthetic text joins the first half (cut at a
word boundary) of one sentence with the second half of another sentence *of the same polarity*, so it reads
like a review sentence and keeps a meaningful label: 5,331 x 5,331 halves per class give ~57M distinct texts,
of which the first `n` a seeded RNG draws (duplicates skipped) are used. Same `n` and seed, same texts.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections.abc import Iterator
from pathlib import Path


def mr_sentences(data_dir: Path) -> list[tuple[str, str]]:
    """(text, gold label) of MR's train and test sentences."""
    rows = []
    for part in ("train", "test"):
        with open(Path(data_dir) / "mr" / f"{part}.csv", encoding="utf-8", newline="") as f:
            rows += [(r["text"], r["label"]) for r in csv.DictReader(f)]
    return rows


def _halves(text: str) -> tuple[str, str]:
    words = text.split()
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def recombined(data_dir: Path, n: int, seed: int = 0) -> Iterator[tuple[str, str, str]]:
    """`n` distinct (id, text, gold label) rows, as the module docstring says."""
    by_label: dict[str, list[tuple[str, str]]] = {}
    for text, label in mr_sentences(data_dir):
        if len(text.split()) >= 4:
            by_label.setdefault(label, []).append(_halves(text))
    labels = sorted(by_label)
    rng = random.Random(seed)
    seen: set[bytes] = set()
    made = 0
    while made < n:
        label = labels[rng.randrange(len(labels))]
        halves = by_label[label]
        head, tail = halves[rng.randrange(len(halves))][0], halves[rng.randrange(len(halves))][1]
        text = f"{head} {tail}".strip()
        key = hashlib.sha1(text.encode()).digest()[:8]  # not hash(): salted per process
        if key in seen:
            continue
        seen.add(key)
        yield f"s{made:07d}", text, label
        made += 1


def write_pool(data_dir: Path, n: int, out: Path, seed: int = 0) -> Path:
    """The pool as a CSV (id, text, label), written once and reused while its size and seed match."""
    out = Path(out)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".csv.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerows(recombined(data_dir, n, seed))
    tmp.replace(out)
    return out
