"""Table-4 metrics against hand-computed cases."""

import pytest

from onevlm.specialty.metrics import classification_scores, iou, localisation_scores, multilabel_scores, plot_confusion
from onevlm.specialty.samples import NormalisedBox


def test_classification_scores_hand_computed():
    gold = [0, 0, 1, 1, 2]
    pred = [0, 1, 1, None, 2]  # one wrong class, one unparseable
    s = classification_scores(gold, pred, 3)
    assert s.accuracy == pytest.approx(3 / 5) and s.unparseable == 1
    # per class F1: c0 = 2*1*0.5/(1.5) = 0.667; c1: precision 1/2, recall 1/2 -> 0.5; c2: 1.0
    assert s.f1_macro == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert s.f1_weighted == pytest.approx((2 * 2 / 3 + 2 * 0.5 + 1 * 1.0) / 5)


def test_multilabel_scores():
    gold = [{0, 2}, set(), {1}]
    pred = [{0, 2}, {1}, None]
    s = multilabel_scores(gold, pred, 3)
    assert s["subset_accuracy"] == pytest.approx(1 / 3)
    assert s["label_accuracy"] == pytest.approx(5 / 9)  # the unparseable row is wrong on all 3 labels
    assert s["unparseable"] == 1


def test_localisation_scores():
    a = NormalisedBox(0.1, 0.1, 0.5, 0.5, 0)
    shifted = NormalisedBox(0.15, 0.1, 0.55, 0.5, 0)  # IoU 0.35/0.45 = 0.778
    far = NormalisedBox(0.6, 0.6, 0.9, 0.9, 0)
    assert iou(a, shifted) == pytest.approx(0.35 * 0.4 / (0.16 + 0.16 - 0.35 * 0.4))
    s = localisation_scores([[a], [a], [], [a], []], [[shifted], [far], [], [shifted, far], None])
    # 1 matched; 2 wrong place; 3 no box, none predicted: right; 4 extra box: wrong; 5 unparseable: wrong
    assert s["bbox_localisation_accuracy"] == pytest.approx(2 / 5)
    assert s["region_localisation_accuracy"] == pytest.approx(2 / 3)


def test_confusion_png(tmp_path):
    path = plot_confusion([0, 1, 1], [0, 1, None], ["a", "b"], tmp_path / "cm.png", "test")
    assert path.read_bytes()[:4] == b"\x89PNG"
