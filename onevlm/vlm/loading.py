"""Load a local image-text-to-text model folder (MedGemma-4B-it or a synthetic model), offline."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DTYPES = ("auto", "bf16", "fp16", "fp32")


class ModelLoadError(RuntimeError):
    """A model folder cannot be used; the message names the folder and the problem."""


@dataclass(frozen=True)
class LoadOptions:
    """How to load the VLM.

    Attributes
    ----------
    device:
        ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available).
    dtype:
        ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16``, ``fp16`` or ``fp32``.
    quantize:
        ``none`` or ``nf4`` (4-bit NF4 with double quantisation through bitsandbytes).
    attn_implementation:
        ``sdpa`` (default) or ``eager``.
    """

    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantize not in ("none", "nf4"):
            raise ValueError(f"quantize must be 'none' or 'nf4', got {self.quantize!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")


@dataclass
class LoadedModel:
    """A model, its processor and what the decision log says about them."""

    model: Any
    processor: Any
    identity: dict[str, Any]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def fingerprint(model_dir: Path) -> str:
    """A cheap identity of the folder: hashes of its configs and tokenizer, sizes of its weights.

    (Hashing every weight byte of an 8 GB checkpoint at each start-up would cost minutes.)
    """
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if not path.is_file():
            continue
        if path.suffix in (".json", ".jinja", ".model", ".txt"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.suffix in (".safetensors", ".bin"):
            digest.update(f"{path.name}\0{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def check_model_dir(model_dir: str | Path) -> Path:
    """Raise :class:`ModelLoadError` unless the folder holds a model and a processor."""
    path = Path(model_dir)
    if not path.exists():
        raise ModelLoadError(f"{path}: model folder not found")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a folder (give the model folder, not a file)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no model here (config.json missing)")
    if not any((path / f).is_file() for f in PROCESSOR_FILES):
        raise ModelLoadError(f"{path}: processor missing (no processor_config.json or preprocessor_config.json)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{path}: tokenizer missing (no tokenizer.json, tokenizer.model or tokenizer_config.json)")
    if not any(p.suffix in (".safetensors", ".bin") for p in path.iterdir()):
        raise ModelLoadError(f"{path}: no weights (*.safetensors or *.bin) in the folder")
    return path


def load_model(model_dir: str | Path, options: LoadOptions | None = None) -> LoadedModel:
    """Load processor and model with ``AutoProcessor`` and ``AutoModelForImageTextToText``.

    Everything is read from ``model_dir``; nothing is downloaded (``local_files_only``).

    Raises
    ------
    ModelLoadError
        If the folder holds no model, no processor, or a model that is not image-text-to-text.
    """
    options = options or LoadOptions()
    path = check_model_dir(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from onevlm.runtime import quiet_transformers

    quiet_transformers()
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: unreadable config.json: {exc}") from exc
    supported = transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    if config.model_type not in supported:
        raise ModelLoadError(
            f"{path}: model_type '{config.model_type}' is not an image-text-to-text model "
            "(AutoModelForImageTextToText cannot load it)"
        )
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load the processor: {exc}") from exc
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ModelLoadError(f"{path}: the processor has no tokenizer or no image processor")

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "attn_implementation": options.attn_implementation}
    if options.quantize == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError("--quantize nf4 needs bitsandbytes, which is not installed") from exc
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load the model: {type(exc).__name__}: {exc}") from exc
    if options.quantize == "none":
        model = model.to(device)
    model.eval()
    synthetic = path / "onevlm_synthetic.json"
    identity = {
        "model_dir": str(path),
        "model_class": type(model).__name__,
        "model_type": config.model_type,
        "fingerprint": fingerprint(path),
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "quantize": options.quantize,
        "attn_implementation": options.attn_implementation,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    if synthetic.is_file():
        identity["synthetic"] = json.loads(synthetic.read_text())
    logger.info("loaded %s from %s on %s (%s, quantize=%s)", identity["model_class"], path, device, identity["dtype"], options.quantize)
    return LoadedModel(model=model, processor=processor, identity=identity)
