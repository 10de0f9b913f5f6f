"""Shared fixtures. Every test builds what it needs in a temp dir; models load offline."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Gemma 3's real vocabulary is fetched once by `make test` (onevlm fetch-vocabulary) into the user's cache
# folder: the tests read it from there (before the session's own cache replaces ONEVLM_CACHE_DIR).
VOCABULARY_CACHE = Path(os.environ.get("ONEVLM_CACHE_DIR") or Path.home() / ".cache" / "onevlm")
# The sentence model's ONNX export and the card-text vectors go to a cache folder of this test session
# (subprocesses inherit it), never to the user's ~/.cache; removed at exit.
_CACHE = tempfile.TemporaryDirectory(prefix="onevlm-test-cache-")
os.environ.setdefault("ONEVLM_CACHE_DIR", _CACHE.name)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "dicom_samples"


def gemma3_vocabulary() -> Path:
    """The cache folder holding Gemma 3's fetched vocabulary; fails the test, saying how to fetch it, when missing."""
    from onevlm.vlm.gemma3_vocabulary import VocabularyError, require_vocabulary

    try:
        require_vocabulary(VOCABULARY_CACHE)
    except VocabularyError as exc:
        pytest.fail(f"{exc} (make test fetches it)")
    return VOCABULARY_CACHE
CARDS = REPO / "model_cards"


def pydicom_file(name: str) -> Path:
    """A file from pydicom's test data or pydicom-data, never downloaded."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"pydicom test file {name} is not installed (pydicom-data is a dev dependency)")
    return Path(path)


def write_card(folder: Path, number: int, modality: str, caption: str, findings: list[str],
               codes: list[str], body_parts: list[str], task_type: str = "classification") -> Path:
    """Write one valid card YAML file (for tests that need their own small repository)."""
    path = folder / f"MODEL_{number:02d}.yaml"
    path.write_text(textwrap.dedent(f"""\
        id: MODEL_{number:02d}
        modality: {modality}
        task_caption: {caption}
        task_type: {task_type}
        findings: [{', '.join(findings)}]
        specialty: radiology
        intended_use: Research triage of {modality} images.
        out_of_scope: Clinical diagnosis.
        training_data:
          - name: Example dataset
            citation: "Author A. Title. Journal. 2020."
        metrics: []
        dicom:
          modalities: [{', '.join(codes)}]
          body_parts: [{', '.join(body_parts)}]
        """))
    return path


@pytest.fixture()
def small_cards(tmp_path: Path) -> Path:
    """A six-card repository with known modalities and captions."""
    folder = tmp_path / "cards"
    folder.mkdir()
    write_card(folder, 1, "brain CT scan", "Detects intracranial hemorrhage in non-contrast head CT slices.",
               ["intracranial hemorrhage", "normal"], ["CT"], ["HEAD", "BRAIN"])
    write_card(folder, 2, "brain CT scan", "Segments ischemic stroke lesions in head CT.",
               ["ischemic stroke"], ["CT"], ["HEAD", "BRAIN"], task_type="segmentation")
    write_card(folder, 3, "brain MRI scan", "Classifies brain tumor types in T1-weighted MRI slices.",
               ["glioma", "meningioma", "normal"], ["MR"], ["HEAD", "BRAIN"])
    write_card(folder, 4, "kidney MRI scan", "Segments kidneys and renal tumors in abdominal MRI.",
               ["renal tumor"], ["MR"], ["KIDNEY", "ABDOMEN"], task_type="segmentation")
    write_card(folder, 5, "chest X-ray scan", "Classifies pneumonia versus normal in chest radiographs.",
               ["pneumonia", "normal"], ["CR", "DX"], ["CHEST"])
    write_card(folder, 6, "liver CT scan", "Segments liver tumors in contrast-enhanced abdominal CT.",
               ["liver tumor"], ["CT"], ["LIVER", "ABDOMEN"], task_type="segmentation")
    return folder


@pytest.fixture(scope="session")
def encoder():
    """The bundled all-MiniLM-L6-v2 sentence encoder, loaded once per test session."""
    from onevlm.backends.embedded.text_encoder import shared_encoder

    return shared_encoder()


@pytest.fixture(scope="session")
def gemma3_tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Gemma 3 VLM on Gemma 3's real vocabulary, processor and chat template (built once per session)."""
    from onevlm.vlm.synthetic import build_synthetic_model

    return build_synthetic_model("tiny", tmp_path_factory.mktemp("gemma3-tiny") / "model", tokenizer="gemma3",
                                 vocabulary_cache=gemma3_vocabulary())


@pytest.fixture(scope="session")
def word_tiny_dir(tmp_path_factory) -> Path:
    """The tiny random VLM with the word-level tokenizer on the shipped cards (built once per session; read only)."""
    from onevlm.vlm.synthetic import build_synthetic_model

    return build_synthetic_model("tiny", tmp_path_factory.mktemp("word-tiny") / "model")


@pytest.fixture(scope="session")
def gemma3_tiny(gemma3_tiny_dir):
    """``gemma3_tiny_dir`` loaded once per session on the CPU (float32); a test that scripts its answers removes the script."""
    from onevlm.vlm.loading import LoadOptions, load_model

    return load_model(gemma3_tiny_dir, LoadOptions(device="cpu", dtype="fp32"))


@pytest.fixture(scope="session")
def shipped_cards():
    from onevlm.cards import CardRepository

    return CardRepository.load(CARDS)


@pytest.fixture(scope="session")
def embedded_router(shipped_cards, encoder):
    """The default router: shipped cards + embedded backend, no cutoffs."""
    from onevlm.backends.embedded import EmbeddedBackend
    from onevlm.router import Router

    return Router(shipped_cards, EmbeddedBackend(shipped_cards, encoder=encoder))


#: The descriptive fields of ct_head_routine_brain.dcm (it names its anatomy in several of them).
DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName", "PerformedProcedureStepDescription",
                "RequestedProcedureDescription")


def header_variant(path: Path, source: Path = SAMPLES / "ct_head_routine_brain.dcm", **fields) -> Path:
    """A copy of ``source`` at ``path`` with every description removed, then ``fields`` set (a header variant)."""
    import pydicom

    ds = pydicom.dcmread(source)
    for keyword in DESCRIPTIONS:
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path
