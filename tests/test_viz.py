"""Figures from metrics.csv (viz.py)."""
import pandas as pd

from flowopd_lib import viz


def test_compare_runs_draws_one_panel_per_metric_and_one_line_per_run(tmp_path):
    for run, scale in (("kl", 1.0), ("pg_detached", 3.0)):
        (tmp_path / run).mkdir()
        pd.DataFrame({"step": [1, 2, 3], "teacher_kl/geneval": [6.0, 5.0, 4.0 * scale],
                      "teacher_kl/ocr": [14.0, None, 12.0 * scale], "loss": [1.0, 0.5, 0.2]}
                     ).to_csv(tmp_path / run / "metrics.csv", index=False)
    fig = viz.compare_runs({r: tmp_path / r for r in ("kl", "pg_detached")}, "teacher_kl/", path=tmp_path / "kl.png")
    assert [ax.get_title() for ax in fig.axes] == ["teacher_kl/geneval", "teacher_kl/ocr"]
    assert all(len(ax.lines) == 2 for ax in fig.axes)
    assert list(fig.axes[1].lines[1].get_ydata()) == [14.0, 36.0]  # the missing value is skipped
    assert (tmp_path / "kl.png").stat().st_size > 0


def test_curve_ends_reads_first_and_mean_of_last(tmp_path):
    pd.DataFrame({"step": [1, 2, 3, 4], "teacher_kl/ocr": [14.0, 30.0, 10.0, 12.0], "loss": [1, 1, 1, 1]}
                 ).to_csv(tmp_path / "metrics.csv", index=False)
    table = viz.curve_ends({"kl": tmp_path}, "teacher_kl/", last=2)
    assert table.loc["kl", "teacher_kl/ocr"] == "14.0 -> 11.0" and list(table.columns) == ["teacher_kl/ocr"]
