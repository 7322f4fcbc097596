"""The trained small model: encoder + classification head, with prediction, embedding and save/load.

The head always reads the L2-normalised mean-pooled sentence embedding, so the embeddings handed to
demo selection and retrieval are exactly what the classifier sees (and what mixup mixes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from freeal_stream.config import STATIC_ENCODER
from freeal_stream.private_files import private_dir
from freeal_stream.slm.encoder import cached_embed, load_encoder

Mode = Literal["finetune", "head"]
HEAD_DROPOUT = 0.1
_WEIGHTS, _META = "slm.safetensors", "slm.json"


def build_head(dim: int, hidden: int, n_classes: int) -> nn.Module:
    """Linear when hidden == 0, else a one-hidden-layer MLP (frozen features need the extra capacity)."""
    if hidden == 0:
        return nn.Linear(dim, n_classes)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(HEAD_DROPOUT), nn.Linear(hidden, n_classes))


class SLM(nn.Module):
    """Encoder + head. In head mode the encoder is frozen, is not saved, and its embeddings may be cached."""

    def __init__(
        self,
        encoder: str,
        mode: Mode,
        n_classes: int,
        max_length: int,
        head_hidden: int,
        device: str | torch.device = "cpu",
        cache_dir: Path | None = None,
    ):
        super().__init__()
        self.mode, self.n_classes, self.head_hidden = mode, n_classes, head_hidden
        self.cache_dir = cache_dir
        if mode == "finetune" and encoder == STATIC_ENCODER:
            raise ValueError(
                f"encoder '{STATIC_ENCODER}' is static, with nothing to fine-tune: train it in head mode, "
                "or fine-tune a transformer encoder such as all-MiniLM-L6-v2"
            )
        self.encoder = load_encoder(encoder, max_length, device)
        self.head = build_head(self.encoder.dim, head_hidden if mode == "head" else 0, n_classes).to(device)
        if mode == "head":
            self.encoder.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, d) L2-normalised sentence embeddings as the head sees them."""
        if self.mode == "head":
            return cached_embed(self.encoder, texts, self.cache_dir, batch_size)
        return self.encoder.embed(texts, batch_size)

    @torch.no_grad()
    def logits_from_embeddings(self, emb: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        was_training = self.training
        self.eval()
        out = [
            self.head(torch.from_numpy(emb[i : i + batch_size]).to(self.device)).float().cpu()
            for i in range(0, len(emb), batch_size)
        ]
        self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, self.n_classes), dtype=np.float32)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, C) class probabilities."""
        logits = self.logits_from_embeddings(self.embed(texts, batch_size))
        return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()

    def save(self, directory: str | Path) -> Path:
        """Weights (head only in head mode) + a JSON that says how to rebuild the model."""
        directory = private_dir(Path(directory))
        module = self.head if self.mode == "head" else self
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(directory / _WEIGHTS))
        meta = {
            "encoder": self.encoder.name,
            "mode": self.mode,
            "n_classes": self.n_classes,
            "max_length": self.encoder.max_length,
            "head_hidden": self.head_hidden,
        }
        (directory / _META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", cache_dir: Path | None = None) -> SLM:
        directory = Path(directory)
        meta = json.loads((directory / _META).read_text(encoding="utf-8"))
        model = cls(
            meta["encoder"],
            meta["mode"],
            meta["n_classes"],
            meta["max_length"],
            meta["head_hidden"],
            device=device,
            cache_dir=cache_dir,
        )
        module = model.head if model.mode == "head" else model
        module.load_state_dict(load_file(str(directory / _WEIGHTS), device=str(model.device)))
        model.eval()
        return model


def model_files(model: SLM) -> dict[str, bytes]:
    """The saved model as file name -> bytes: how a model travels between nodes (no shared disk needed)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="freeal-slm-") as tmp:
        return read_model_files(model.save(tmp))


def read_model_files(directory: str | Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.name in (_WEIGHTS, _META)}


def model_mode(files: dict[str, bytes]) -> str:
    """The mode ('head' | 'finetune') of a model given as files."""
    return json.loads(files[_META])["mode"]


def write_model_files(files: dict[str, bytes], directory: str | Path) -> Path:
    """Write `model_files` output as a loadable model folder (weights first, the JSON that names it last)."""
    directory = private_dir(Path(directory))
    for name in sorted(files, key=lambda n: n == _META):
        tmp = directory / (name + ".tmp")
        tmp.write_bytes(files[name])
        tmp.replace(directory / name)
    return directory
