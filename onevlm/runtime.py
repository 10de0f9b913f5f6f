"""Process-wide settings every onevlm entry point (CLI, MONAI Deploy apps, services) applies."""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("sentence_transformers", "transformers", "httpx", "huggingface_hub", "urllib3", "highdicom", "wsidicom")


def configure_runtime(log_level: int = logging.WARNING) -> None:
    """Offline model loading, lenient DICOM header reading and quiet third-party logs.

    - ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``: every model loads from a local folder;
      nothing is fetched from a hub (unless the caller set these variables otherwise).
    - pydicom reads headers from many vendors; value-representation nits must not stop routing.
    - transformers' weight-loading progress bars and INFO chatter stay off the console.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # Source files often hold single-component patient names; derived objects copy them as is.
    warnings.filterwarnings("ignore", message="The string .* is unlikely to represent the intended person name")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(log_level, logging.WARNING))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
