"""diagnostics.curves: chained runs share one update axis; the table and errors name what is there."""
import pandas as pd
import pytest

from flowopd_lib import viz
from flowopd_lib.diagnostics import curves
from flowopd_lib.safe_files import FileError
from guards import refused


def write_run(directory, steps, kl):
    directory.mkdir()
    rows = {"step": steps, "kl_ref": kl, "eval/geneval": [None if s % 2 else 0.1 * s for s in steps]}
    pd.DataFrame(rows).to_csv(directory / "metrics.csv", index=False)
    return directory


def test_chained_runs_continue_the_update_count_and_the_table_takes_each_windows_last_value(tmp_path):
    first = write_run(tmp_path / "a", [1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4])
    second = write_run(tmp_path / "b", [1, 2, 3], [1.0, 2.0, 3.0])
    metrics = curves.chained_metrics([first, second])
    assert metrics["step"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert metrics["stage"].tolist() == ["a"] * 4 + ["b"] * 3
    table = curves.every(metrics, ["kl_ref", "eval/geneval"], 3)
    assert table.index.tolist() == [3, 6, 7]  # the last window ends where the run does
    assert table["kl_ref"].tolist() == [0.3, 2.0, 3.0]          # updates 3, 6 (b's 2nd), 7 (b's 3rd)
    # the last value present in each window: a's update 2; b's update 2 (= 6); none in 7
    assert table["eval/geneval"].round(3).fillna(-1).tolist() == [0.2, 0.2, -1]
    fig = viz.panels({"b": metrics}, ["kl_ref"], logy=("kl_ref",), path=tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
    assert [line.get_xdata()[0] for line in fig.axes[0].lines[1:]] == [4]  # the second stage starts after 4


def test_cli_plots_chains_and_single_runs_side_by_side(tmp_path, capsys):
    first = write_run(tmp_path / "a", [1, 2], [0.1, 0.2])
    second = write_run(tmp_path / "b", [1, 2], [0.3, 0.4])
    other = write_run(tmp_path / "c", [1, 2, 3], [0.5, 0.6, 0.7])
    curves.main([f"{first}+{second}", str(other), "--columns", "kl_ref", "--every", "2", "--out", str(tmp_path / "f.png")])
    printed = capsys.readouterr().out
    assert "\nb\n" in printed and "\nc\n" in printed and (tmp_path / "f.png").exists()
    assert "same name" in refused(capsys, curves.main, [str(other), f"{first}+{other}", "--columns", "kl_ref"])
    said = refused(capsys, curves.main, [str(other), "--columns", "kl_rf"])
    assert "no run has column(s) ['kl_rf']; they have ['eval/geneval', 'kl_ref', 'step']" in said


def test_missing_runs_and_columns_are_named(tmp_path):
    with pytest.raises(FileError, match="training run's output folder"):
        curves.chained_metrics([tmp_path])
    metrics = curves.chained_metrics([write_run(tmp_path / "a", [1, 2], [0.1, 0.2])])
    with pytest.raises(KeyError, match=r"no column \['eval/ocr'\].*there are \['eval/geneval', 'kl_ref', 'step'\]"):
        curves.every(metrics, ["eval/ocr"], 10)


def test_every_and_out_are_checked_before_anything_is_read_or_drawn(tmp_path, capsys):
    """Issue 35 #11: `--every 0` or negative was accepted; `--out` into a missing folder was a raw
    matplotlib traceback after the tables were printed."""
    run = write_run(tmp_path / "a", [1, 2], [0.1, 0.2])
    for every in ("0", "-3"):
        said = refused(capsys, curves.main, [str(run), "--columns", "kl_ref", "--every", every])
        assert f"--every: {every}" in said
    said = refused(capsys, curves.main, [str(run), "--columns", "kl_ref", "--out", str(tmp_path / "missing" / "f.png")])
    assert str(tmp_path / "missing") in said and not (tmp_path / "missing").exists()
    said = refused(capsys, curves.main, [str(run), "--columns", "kl_ref", "--out", str(tmp_path / "f.pnk")])
    assert ".pnk" in said and "png" in said
    said = refused(capsys, curves.main, [str(tmp_path / "nowhere"), "--columns", "kl_ref"])
    assert "nowhere" in said
