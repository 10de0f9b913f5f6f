"""Algorithm 2 (cutoff sweep) against hand-computed cases and the paper's table 1."""

import json

import pytest

from onevlm.calibration.cutoffs import FIRST, SECOND, CutoffRow, Cutoffs, fit_cutoffs, label_for, read_rows, sweep
from onevlm.cli import main


def test_paper_table1_stage1_midpoint():
    # Rows whose only optimal interval is the paper's stage-1 interval [0.417100, 0.434750).
    fit = sweep([0.1, 0.4171, 0.43475, 0.5], [FIRST, FIRST, SECOND, SECOND])
    assert fit.intervals == ((0.4171, 0.43475),)
    assert fit.score == 4
    assert fit.tau == pytest.approx(0.425925, abs=1e-9)


def test_paper_table1_stage2_midpoint():
    fit = sweep([0.2, 0.4368, 0.4374, 0.9], [FIRST, FIRST, SECOND, SECOND])
    assert fit.intervals == ((0.4368, 0.4374),)
    assert fit.tau == pytest.approx(0.4371, abs=1e-9)


def test_paper_table1_stage3_two_intervals_widest_wins():
    # Table 1, stage 3: [0.001100, 0.001334) and [0.001985, 0.003030); tau* = 0.002508.
    fit = sweep([0.0011, 0.001334, 0.001985, 0.00303], [FIRST, SECOND, FIRST, SECOND])
    assert fit.intervals == ((0.0011, 0.001334), (0.001985, 0.00303))
    assert fit.score == 3
    assert fit.tau == pytest.approx(0.0025075, abs=1e-9)
    assert round(fit.tau, 6) == pytest.approx(0.002508, abs=1e-6)


def test_equal_width_tie_takes_the_lowest_interval():
    # (0.2, 0.4] and (0.6, 0.8] both score 3; their widths differ only by float noise.
    fit = sweep([0.2, 0.4, 0.6, 0.8], [FIRST, SECOND, FIRST, SECOND])
    assert fit.intervals == ((0.2, 0.4), (0.6, 0.8))
    assert fit.tau == pytest.approx(0.3)


def test_all_first_puts_tau_above_every_p2():
    fit = sweep([0.1, 0.3], [FIRST, FIRST])
    assert fit.intervals == ((0.3, 1.0),)
    assert fit.score == 2
    assert fit.tau == pytest.approx(0.65)


def test_all_second_puts_tau_below_every_p2():
    fit = sweep([0.1, 0.3], [SECOND, SECOND])
    assert fit.intervals == ((0.0, 0.1),)
    assert fit.score == 2
    assert fit.tau == pytest.approx(0.05)


def test_equal_values_are_consumed_together():
    # One A and one B at 0.3: crossing 0.3 changes nothing, both sides score 1.
    fit = sweep([0.3, 0.3], [SECOND, FIRST])
    assert fit.intervals == ((0.0, 0.3), (0.3, 1.0))
    assert fit.score == 1
    assert fit.tau == pytest.approx(0.65)


def test_runner_up_at_zero_and_one():
    assert sweep([0.0], [SECOND]).intervals == ((0.0, 0.0),)
    assert sweep([0.0], [SECOND]).tau == 0.0
    # p2 == 1 can never be kept FIRST with tau in [0, 1]: the empty interval (1, 1] is dropped.
    fit = sweep([1.0], [FIRST])
    assert fit.intervals == ((0.0, 1.0),)
    assert fit.score == 0


def test_the_fitted_tau_reproduces_the_best_score():
    p2 = [0.05, 0.12, 0.12, 0.2, 0.31, 0.33, 0.4, 0.47]
    labels = [FIRST, SECOND, FIRST, FIRST, SECOND, SECOND, FIRST, SECOND]
    fit = sweep(p2, labels)
    correct = sum((p >= fit.tau) == (l == SECOND) for p, l in zip(p2, labels))
    assert correct == fit.score
    # No cutoff in a fine grid does better.
    best_grid = max(sum((p >= t / 1000) == (l == SECOND) for p, l in zip(p2, labels)) for t in range(1001))
    assert best_grid == fit.score


def test_label_rule():
    assert label_for("a", "b", "b") == SECOND
    assert label_for("a", "b", "a") == FIRST
    assert label_for("a", "a", "a") == FIRST
    assert label_for("a", "b", "c") == FIRST  # neither right: FIRST by definition
    assert label_for("a", None, "a") == FIRST


def test_fit_by_stage_and_rows_from_csv(tmp_path):
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("stage,p2,label\n1,0.1,FIRST\n1,0.4171,FIRST\n1,0.43475,SECOND\n1,0.5,second\n3,0.2,FIRST\n")
    fits = fit_cutoffs(read_rows(csv_path))
    assert sorted(fits) == [1, 3]
    assert fits[1].tau == pytest.approx(0.425925)
    assert fits[3].intervals == ((0.2, 1.0),)
    cutoffs = Cutoffs.from_fits(fits)
    assert (cutoffs.stage1, cutoffs.stage2, cutoffs.stage3) == (pytest.approx(0.425925), None, pytest.approx(0.6))


def test_bad_rows_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("stage,p2,label\n1,0.2,FIRST\n2,0.3,MAYBE\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3"):
        read_rows(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("stage,p2\n1,0.2\n")
    with pytest.raises(ValueError, match="missing column"):
        read_rows(missing)
    with pytest.raises(ValueError):
        CutoffRow(stage=1, p2=1.5, label=FIRST)


def test_cutoffs_file_formats(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"1": 0.4, "3": 0.0025}))
    assert Cutoffs.load(plain) == Cutoffs(0.4, None, 0.0025)
    fitted = tmp_path / "fitted.json"
    fitted.write_text(json.dumps({"2": {"intervals": [[0.1, 0.2]], "score": 3, "tau": 0.15}}))
    assert Cutoffs.load(fitted) == Cutoffs(None, 0.15, None)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"4": 0.2}))
    with pytest.raises(ValueError, match="bad.json: unknown stage"):
        Cutoffs.load(bad)
    out_of_range = tmp_path / "range.json"
    out_of_range.write_text(json.dumps({"1": 1.5}))
    with pytest.raises(ValueError, match="range.json"):
        Cutoffs.load(out_of_range)


def test_cli_fit_json(tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("stage,p2,label\n3,0.0011,FIRST\n3,0.001334,SECOND\n3,0.001985,FIRST\n3,0.00303,SECOND\n")
    out = tmp_path / "cutoffs.json"
    assert main(["cutoffs", "fit", str(rows), "--json", "-o", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["3"]["intervals"] == [[0.0011, 0.001334], [0.001985, 0.00303]]
    assert printed["3"]["score"] == 3
    assert printed["3"]["tau"] == pytest.approx(0.0025075)
    assert Cutoffs.load(out).stage3 == pytest.approx(0.0025075)


def test_cli_fit_reports_bad_file(tmp_path, capsys):
    assert main(["cutoffs", "fit", str(tmp_path / "nope.csv")]) == 1
    assert "nope.csv" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [0, 4, -1])
def test_a_stage_outside_1_to_3_is_refused_at_fit_time(tmp_path, capsys, stage):
    with pytest.raises(ValueError, match=f"stage must be 1, 2 or 3, got {stage}"):
        CutoffRow(stage=stage, p2=0.2, label=FIRST)
    rows = tmp_path / "rows.csv"
    rows.write_text(f"stage,p2,label\n1,0.2,FIRST\n{stage},0.3,SECOND\n")
    with pytest.raises(ValueError, match=rf"rows\.csv: line 3: stage must be 1, 2 or 3, got {stage}"):
        read_rows(rows)
    # the CLI writes no cutoffs file that `route --cutoffs` would then refuse
    out = tmp_path / "cutoffs.json"
    assert main(["cutoffs", "fit", str(rows), "-o", str(out)]) == 1
    assert f"rows.csv: line 3: stage must be 1, 2 or 3, got {stage}" in capsys.readouterr().err
    assert not out.exists()


def test_fitted_cutoffs_load_for_every_stage(tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("stage,p2,label\n1,0.2,FIRST\n1,0.4,SECOND\n2,0.1,FIRST\n3,0.3,SECOND\n")
    out = tmp_path / "cutoffs.json"
    assert main(["cutoffs", "fit", str(rows), "-o", str(out)]) == 0
    capsys.readouterr()
    loaded = Cutoffs.load(out)  # what `route --cutoffs` reads
    assert loaded.stage1 is not None and loaded.stage2 is not None and loaded.stage3 is not None


def test_cli_fit_reports_an_unwritable_output(tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("stage,p2,label\n1,0.2,FIRST\n1,0.4,SECOND\n")
    out = tmp_path / "no_such_folder" / "cutoffs.json"
    assert main(["cutoffs", "fit", str(rows), "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"error: {out}: cannot write: No such file or directory\n"
