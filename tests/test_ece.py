"""ECE with 10 equal-width right-closed bins, against hand-computed values."""

import json

import pytest

from onevlm.calibration.ece import bin_index, expected_calibration_error, read_predictions
from onevlm.cli import main


@pytest.mark.parametrize(
    "confidence,index",
    [
        (0.0, 0),  # exactly 0 goes to the first bin
        (0.05, 0),
        (0.1, 0),  # an edge belongs to the bin it closes
        (0.1000001, 1),
        (0.3, 2),
        (0.1 + 0.2, 2),  # 0.30000000000000004 is still the edge 0.3
        (0.7, 6),
        (0.6 + 0.1, 6),  # 0.7 as floating point arithmetic gives it
        (0.95, 9),
        (1.0, 9),
    ],
)
def test_bin_edges(confidence, index):
    assert bin_index(confidence, 10) == index


def test_hand_computed_ece():
    conf = [0.1, 0.3, 0.35, 0.9, 0.95, 1.0]
    correct = [0, 1, 0, 1, 1, 0]
    result = expected_calibration_error(conf, correct)
    # bins: (0,.1]:{.1 wrong} (.2,.3]:{.3 right} (.3,.4]:{.35 wrong} (.8,.9]:{.9 right} (.9,1]:{.95 right, 1.0 wrong}
    expected = (0.1 + 0.7 + 0.35 + 0.1 + 2 * abs(0.5 - 0.975)) / 6
    assert result.ece == pytest.approx(expected)
    counts = [b.count for b in result.bins]
    assert counts == [1, 0, 1, 1, 0, 0, 0, 0, 1, 2]
    assert result.bins[9].accuracy == pytest.approx(0.5)
    assert result.bins[9].confidence == pytest.approx(0.975)
    assert result.bins[1].accuracy is None  # empty bins carry no statistics and no weight


def test_perfectly_calibrated_and_worst_case():
    assert expected_calibration_error([1.0, 1.0], [1, 1]).ece == pytest.approx(0.0)
    assert expected_calibration_error([1.0, 1.0], [0, 0]).ece == pytest.approx(1.0)
    assert expected_calibration_error([0.0], [1]).ece == pytest.approx(1.0)


def test_other_bin_counts():
    result = expected_calibration_error([0.25, 0.75], [1, 0], n_bins=2)
    assert [b.count for b in result.bins] == [1, 1]
    assert result.ece == pytest.approx(0.75)
    assert expected_calibration_error([0.5], [1], n_bins=2).bins[0].count == 1  # 0.5 closes (0, 0.5]


def test_invalid_input():
    with pytest.raises(ValueError):
        expected_calibration_error([], [])
    with pytest.raises(ValueError):
        expected_calibration_error([1.2], [1])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [2])


def test_csv_and_cli(tmp_path, capsys):
    path = tmp_path / "pred.csv"
    path.write_text("confidence,correct\n0.1,0\n0.3,1\n0.35,0\n0.9,1\n0.95,1\n1.0,0\n")
    conf, correct = read_predictions(path)
    assert conf[1] == 0.3 and correct == [0, 1, 0, 1, 1, 0]
    plot = tmp_path / "rel.png"
    assert main(["calibration", "ece", str(path), "--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ece"] == pytest.approx((0.1 + 0.7 + 0.35 + 0.1 + 0.95) / 6)
    assert len(out["bins"]) == 10
    assert out["bins"][2] == {"lo": 0.2, "hi": 0.3, "count": 1, "accuracy": 1.0, "confidence": 0.3}
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_names_the_bad_line(tmp_path, capsys):
    path = tmp_path / "pred.csv"
    path.write_text("confidence,correct\n0.1,0\n1.7,1\n")
    assert main(["calibration", "ece", str(path)]) == 1
    assert "pred.csv: line 3" in capsys.readouterr().err
