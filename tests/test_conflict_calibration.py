"""The dial's calibration command: how the default is read off the table, and its inputs checked first."""
import pandas as pd
import pytest

from flowopd_lib.diagnostics import conflict_calibration as calibration


def row(setting, teacher, metric, diff, half=0.03):
    return {"setting": setting, "teacher": teacher, "metric": metric, "diff": diff, "low": diff - half, "high": diff + half}


def test_the_default_is_the_smallest_setting_with_both_conflicts():
    table = pd.DataFrame([
        row(0.0, "pickscore", "geneval", +0.05), row(0.0, "geneval", "pickscore", +0.10),
        row(0.5, "pickscore", "geneval", -0.05), row(0.5, "geneval", "pickscore", -0.01),  # covers 0
        row(0.75, "pickscore", "geneval", -0.10), row(0.75, "geneval", "pickscore", -0.06),
        row(1.0, "pickscore", "geneval", -0.20), row(1.0, "geneval", "pickscore", -0.10),
    ])
    assert calibration.default_setting(table) == 0.75
    # a teacher lowering its own metric is no conflict; nor is the PickScore teacher alone
    alone = pd.DataFrame([row(0.5, "pickscore", "geneval", -0.1), row(0.5, "geneval", "geneval", -0.1),
                          row(0.5, "pickscore", "deqa", -0.1)])
    assert calibration.default_setting(alone) is None


def test_only_teachers_whose_rewards_read_pickscore_are_trained_per_setting():
    assert calibration.run_setting("pickscore", 0.5) == 0.5 and calibration.run_setting("deqa", 0.5) == 0.5
    assert calibration.run_setting("geneval", 0.5) == 0.0 and calibration.run_setting("ocr", 0.75) == 0.0


@pytest.mark.parametrize("argv, said", [
    (["--settings", "0.123"], "no PickScore proxy for conflict=0.123"),
    (["--settings", "1.5"], "conflict=1.5 is not a number in [0, 1]"),
    (["--settings", "0", "--tasks", "pickscroe"], "no such recipe"),
    (["--settings", "0", "--adapter", "geneval=/nowhere"], "--adapter geneval=/nowhere"),
])
def test_inputs_are_checked_before_anything_is_trained(tmp_path, monkeypatch, capsys, argv, said):
    monkeypatch.setattr(calibration.teachers, "train", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(SystemExit) as exit_:
        calibration.cli.entry(calibration.main)([*argv, "--out", str(tmp_path / "cal")])
    assert exit_.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "cal").exists()


def test_the_shipped_calibration_reads_default_half_with_the_papers_sign():
    table = calibration.shipped_table()
    assert calibration.default_setting(table) == 0.5
    at = table.set_index(["setting", "teacher", "metric"])
    assert at.loc[(0.5, "pickscore", "geneval"), "high"] < 0 < at.loc[(0.0, "pickscore", "geneval"), "high"]
