"""Process-wide settings every onevlm entry point (CLI, MONAI Deploy apps, services) applies."""

from __future__ import annotations

import logging
import os
import sys
import warnings

NOISY_LOGGERS = ("sentence_transformers", "transformers", "httpx", "huggingface_hub", "urllib3", "highdicom", "wsidicom")
THREADS_ENV = "ONEVLM_THREADS"
#: Thread-count variables the numeric libraries read once, at import.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: Third-party messages that name no problem the user has, or one they cannot act on.
SILENCED_MESSAGES = (
    # bitsandbytes on CPU without the optional `kernels` package: 4-bit matmuls use its reference path
    "Failed to load CPU gemm_4bit_forward from kernels-community",
    # pydicom on a file cut short, twice (its logger and a UserWarning); onevlm reports the file once, as
    # "<file>: pixel data truncated: N of M bytes" (onevlm.dicom.pixel_data)
    "End of file reached before delimiter",
)


def cpu_threads() -> int:
    """CPU threads for model computation: ``ONEVLM_THREADS``, else all cores but one (at least 1).

    One core stays free for the rest of the process (the listener, the exporter, decoding) and for
    other processes: OpenMP threads that compete for busy cores spin and slow down by an order of
    magnitude (a CPU fine-tuning step: 6.5 s with every core under load, 0.66 s with one thread).

    Raises
    ------
    ValueError
        When ``ONEVLM_THREADS`` is not a positive integer.
    """
    configured = os.environ.get(THREADS_ENV, "").strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {configured!r}")
        return int(configured)
    return max(1, (os.cpu_count() or 1) - 1)


class _SilenceMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in SILENCED_MESSAGES)


def quiet_transformers() -> None:
    """transformers' weight-loading progress bars off (call where transformers is imported anyway)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def configure_runtime(log_level: int = logging.WARNING, threads: int | None = None) -> None:
    """Offline model loading, thread counts, lenient DICOM header reading and quiet third-party logs.

    - ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``: every model loads from a local folder;
      nothing is fetched from a hub (unless the caller set these variables otherwise).
    - Threads: ``threads`` (else :func:`cpu_threads`) for torch, onnxruntime and BLAS, set before
      they are imported (``OMP_NUM_THREADS`` set by the caller wins).
    - pydicom reads headers from many vendors; value-representation nits must not stop routing.
    - Third-party chatter stays off the console; nothing heavy is imported here.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    count = threads if threads is not None else cpu_threads()
    if count < 1:
        raise ValueError(f"threads must be at least 1, got {count}")
    os.environ[THREADS_ENV] = str(count)
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(count))
    if "torch" in sys.modules:  # imported before us: its pool size is already fixed, adjust it
        sys.modules["torch"].set_num_threads(count)
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # Source files often hold single-component patient names; derived objects copy them as is.
    warnings.filterwarnings("ignore", message="The string .* is unlikely to represent the intended person name")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(log_level, logging.WARNING))
    silence = _SilenceMessages()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _SilenceMessages) for f in handler.filters):
            handler.addFilter(silence)
    if "transformers" in sys.modules:
        quiet_transformers()
