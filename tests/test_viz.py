"""Figures from metrics.csv (viz.py)."""
import pandas as pd

from flowopd_lib import viz


def test_compare_runs_draws_one_panel_per_metric_and_one_line_per_run(tmp_path):
    for run, scale in (("kl", 1.0), ("pg_detached", 3.0)):
        (tmp_path / run).mkdir()
        pd.DataFrame({"step": [1, 2, 3], "teacher_kl/geneval": [6.0, 5.0, 4.0 * scale],
                      "teacher_kl/ocr": [14.0, None, 12.0 * scale], "teacher_kl/ocr_se": [1.0, 1.0, 1.0],
                      "loss": [1.0, 0.5, 0.2]}
                     ).to_csv(tmp_path / run / "metrics.csv", index=False)
    fig = viz.compare_runs({r: tmp_path / r for r in ("kl", "pg_detached")}, "teacher_kl/", path=tmp_path / "kl.png")
    assert [ax.get_title() for ax in fig.axes] == ["teacher_kl/geneval", "teacher_kl/ocr"]  # no panel for an s.e.
    assert all(len(ax.lines) == 2 for ax in fig.axes)
    assert list(fig.axes[1].lines[1].get_ydata()) == [14.0, 36.0]  # the missing value is skipped
    assert (tmp_path / "kl.png").stat().st_size > 0


def test_curve_ends_reads_first_and_mean_of_last(tmp_path):
    pd.DataFrame({"step": [1, 2, 3, 4], "teacher_kl/ocr": [14.0, 30.0, 10.0, 12.0], "loss": [1, 1, 1, 1]}
                 ).to_csv(tmp_path / "metrics.csv", index=False)
    table = viz.curve_ends({"kl": tmp_path}, "teacher_kl/", last=2)
    assert table.loc["kl", "teacher_kl/ocr"] == "14.0 -> 11.0" and list(table.columns) == ["teacher_kl/ocr"]


def test_an_evaluation_curve_with_one_point_is_a_labelled_marker_with_its_error_bar(tmp_path):
    metrics = pd.DataFrame({"step": [1, 2, 3], "loss": [1.0, 0.5, 0.2], "eval/ocr": [None, None, 0.41],
                            "eval/ocr_se": [None, None, 0.03]})
    fig = viz.plot_curves(metrics, ["eval/ocr"], "evaluation", path=tmp_path / "eval.png")
    ax = fig.axes[0]
    assert "one evaluation, at step 3" in ax.get_title()
    assert [t.get_text() for t in ax.texts] == ["0.410"]
    assert len(ax.collections) == 1  # the ± 1 s.e. bar
    low, high = ax.get_xlim()
    assert low < 3 < high and abs((low + high) / 2 - 3) < 1e-6  # centred, not pinned to an axis edge


def test_a_curve_with_many_points_is_a_line_without_labels():
    metrics = pd.DataFrame({"step": range(50), "loss": [1.0 / (i + 1) for i in range(50)]})
    ax = viz.plot_curves(metrics, ["loss"], "loss").axes[0]
    assert ax.get_title() == "loss" and not ax.texts and len(ax.lines[0].get_xdata()) == 50


def test_paired_changes_draw_one_panel_per_metric_without_layout_warnings(tmp_path, recwarn):
    changes = pd.DataFrame({"model": ["teacher"] * 2, "metric": ["geneval", "ocr"], "diff": [0.2, 0.0],
                            "low": [0.1, -0.05], "high": [0.3, 0.05], "verdict": ["up", "no difference"]}
                           ).set_index(["model", "metric"])
    fig = viz.changes_figure(changes, "teacher minus base", path=tmp_path / "c.png")
    assert [ax.get_title() for ax in fig.axes] == ["geneval - base", "ocr - base"]
    assert not [w for w in recwarn if "layout" in str(w.message)]
