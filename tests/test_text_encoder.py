"""The embedded backend's sentence encoder: the ONNX runtime gives the reference's vectors and the
router's answers, caches only card texts on disk, and survives a damaged cache."""

from __future__ import annotations

import numpy as np
import pytest

from onevlm.backends.embedded import EmbeddedBackend
from onevlm.backends.embedded.text_encoder import TextEncoder, TextEncoderError, export_onnx

REAL_EXPORT = export_onnx  # the tests below patch the module's name; the copy helper may still need it
from onevlm.inputs import load_input
from onevlm.router import Router

from conftest import SAMPLES, pydicom_file

#: Real DICOM beyond dicom_samples/: CT, MR, CR, US, NM, non-images (pydicom's and pydicom-data's files).
PYDICOM_FILES = ["17106", "4950", "emri_small.dcm", "RG1_J2KI.dcm", "RG3_J2KI.dcm", "explicit_VR-UN.dcm",
                 "examples_overlay.dcm", "color-pl.dcm", "OBXXXX1A_rle.dcm", "JPEG2000.dcm", "CT_small.dcm",
                 "MR_small.dcm", "rtplan.dcm", "reportsi.dcm"]


@pytest.fixture(scope="module")
def reference():
    """The sentence-transformers runtime (torch): what the ONNX runtime must reproduce."""
    return TextEncoder(runtime="sentence-transformers")


def test_onnx_vectors_equal_the_reference_on_every_card_text(encoder, reference, shipped_cards):
    assert encoder.runtime == "onnx"
    texts = ([c.task_caption for c in shipped_cards] + list(shipped_cards.findings)
             + [f"{m}; primary abnormality: Normal" for m in shipped_cards.modalities]
             + ["CT HEAD WO CONTRAST", "suspected subdural hemorrhage after fall", "x" * 3000])  # truncated at 256
    onnx, torch_vectors = encoder.encode(texts), reference.encode(texts)
    assert onnx.shape == torch_vectors.shape == (len(texts), 384)
    assert np.abs(onnx - torch_vectors).max() < 1e-5
    assert np.allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)


def test_the_router_answers_the_same_with_either_runtime(embedded_router, reference, shipped_cards):
    router = Router(shipped_cards, EmbeddedBackend(shipped_cards, encoder=reference))
    paths = sorted(SAMPLES.glob("*.dcm")) + [pydicom_file(name) for name in PYDICOM_FILES]
    items = [load_input(path) for path in paths]
    for onnx, torch_decision in zip(embedded_router.route_many(items), router.route_many(items)):
        assert [s.chosen for s in onnx.stages] == [s.chosen for s in torch_decision.stages], onnx.input
        for a, b in zip(onnx.stages, torch_decision.stages):
            assert [c.answer for c in a.candidates] == [c.answer for c in b.candidates], onnx.input
            assert [c.p for c in a.candidates] == pytest.approx([c.p for c in b.candidates], abs=1e-5)
        assert (onnx.outcome.outcome, onnx.cards) == (torch_decision.outcome.outcome, torch_decision.cards)


def test_only_card_texts_reach_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEVLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("onevlm.backends.embedded.text_encoder.export_onnx", _copy_export)
    first = TextEncoder()
    first.similarity(["PATIENT SMITH^JOHN headache"], ["Classifies hemorrhage in head CT.", "glioma"])
    stored = np.load(next(tmp_path.glob("minilm-*-vectors.npz")))
    assert sorted(stored["texts"]) == ["Classifies hemorrhage in head CT.", "glioma"]  # no header text on disk
    second = TextEncoder()
    calls = []
    original = second._model.encode
    monkeypatch.setattr(second._model, "encode", lambda texts: calls.append(list(texts)) or original(texts))
    vectors = second.encode(["glioma", "meningioma"])
    assert calls == [["meningioma"]]  # glioma came from the cache
    assert np.allclose(vectors[0], first.encode(["glioma"])[0])


def test_a_damaged_cache_is_rebuilt_and_a_bad_folder_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ONEVLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("onevlm.backends.embedded.text_encoder.export_onnx", _copy_export)
    TextEncoder().encode(["glioma"], persist=True)
    store = next(tmp_path.glob("minilm-*-vectors.npz"))
    store.write_bytes(b"not an npz")
    again = TextEncoder()
    assert "ignoring the unreadable embedding cache" in caplog.text
    assert again.encode(["glioma"]).shape == (1, 384)
    with pytest.raises(TextEncoderError, match="no_model_here: not a sentence-transformers model folder"):
        TextEncoder(tmp_path / "no_model_here")
    with pytest.raises(TextEncoderError, match="text runtime must be one of onnx, sentence-transformers"):
        TextEncoder(runtime="tensorflow")


def _copy_export(model_dir, out):
    """The session's ONNX export copied in (exporting costs seconds; the first test of a session does it)."""
    import shutil
    from pathlib import Path

    import conftest

    session = Path(conftest._CACHE.name)
    existing = next(session.glob("minilm-*.onnx"), None)
    if existing is None:
        existing = REAL_EXPORT(model_dir, session / out.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(existing, out)
    return out


def test_a_cache_folder_that_cannot_be_written_costs_speed_not_the_service(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ONEVLM_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr("onevlm.backends.embedded.text_encoder.export_onnx", _copy_export)
    encoder = TextEncoder()
    assert encoder.runtime == "onnx" and encoder.encode(["glioma"], persist=True).shape == (1, 384)
    assert "exporting to" in caplog.text and "cannot write the embedding cache" in caplog.text
