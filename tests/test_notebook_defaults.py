"""Every notebook at its defaults, as a new user runs it on a fresh clone: on the shipped base and teachers,
with nothing set, each page runs top to bottom without a warning box and shows its stage working.

~45 minutes (one thread, shared machine), so these run in `make notebooks` (and CI), not in `make test`, which runs each
notebook at tiny parameters (tests/test_notebooks.py). Each notebook runs in its own temporary folder
(its `runs/...` outputs land there), and its key output is checked against what the page claims.
"""
from __future__ import annotations

import pandas as pd
import pytest

from flowopd_lib import notebook
from test_notebooks import NOTEBOOKS, warning_boxes

pytestmark = pytest.mark.defaults


def run_at_defaults(name: str, tmp_path) -> "Path":
    executed = tmp_path / name
    notebook.execute(NOTEBOOKS / name, executed, {}, cwd=tmp_path)
    assert not warning_boxes(executed)
    return tmp_path / "runs"


def verdict(changes: pd.DataFrame, model: str, metric: str) -> str:
    return changes.set_index(["model", "metric"]).loc[(model, metric), "verdict"]


def test_quickstart_shows_teachers_above_the_base_and_a_measured_distillation(tmp_path):
    changes = pd.read_csv(run_at_defaults("00_quickstart.ipynb", tmp_path) / "quickstart" / "quickstart_changes.csv")
    for task in ("geneval", "pickscore"):
        assert verdict(changes, f"teacher {task}", task) == "up"
    assert verdict(changes, "Flow-OPD student", "pickscore") == "up"  # what the page says 16 updates show


def test_base_model_page_shows_the_shipped_base_and_its_headroom(tmp_path):
    out = run_at_defaults("01_base_model.ipynb", tmp_path) / "base_toy"
    assert list(pd.read_csv(out / "eval_table.csv", index_col=0).index) == ["shipped base"]
    headroom = pd.read_csv(out / "headroom_table.csv").set_index("task")
    assert (headroom.loc[["geneval", "ocr"], "headroom"] > 0.1).all()  # pass@4 - pass@1 at CFG 1: 0.35 and 0.13


def test_teacher_page_trains_a_short_pickscore_teacher_that_lifts_its_metric(tmp_path):
    out = run_at_defaults("02_teacher_grpo.ipynb", tmp_path) / "teacher_pickscore"
    assert verdict(pd.read_csv(out / "eval_changes.csv"), "pickscore", "pickscore") == "up"


def test_cold_start_page_merges_the_shipped_teachers(tmp_path):
    table = pd.read_csv(run_at_defaults("03_cold_start.ipynb", tmp_path) / "coldstart" / "coldstart_table.csv", index_col=0)
    assert {"base", "teacher geneval", "merge delta", "SFT"} <= set(table.index)
    assert table.loc["merge delta", "geneval"] > table.loc["base", "geneval"]


def test_flow_opd_page_distils_the_shipped_teachers_from_their_merge(tmp_path):
    table = pd.read_csv(run_at_defaults("04_flow_opd.ipynb", tmp_path) / "student_opd" / "opd_table.csv", index_col=0)
    assert {"base", "teacher geneval", "teacher ocr", "teacher pickscore", "student (Flow-OPD)"} <= set(table.index)
    assert table.loc["student (Flow-OPD)", "pickscore"] > table.loc["base", "pickscore"]


def test_ablations_page_tabulates_the_shipped_teachers(tmp_path):
    scores = pd.read_csv(run_at_defaults("05_ablations.ipynb", tmp_path) / "ablations" / "all_scores.csv", index_col=0)
    assert len(scores) == 5  # the base and four teachers


def test_explorer_page_saves_its_views(tmp_path):
    out = run_at_defaults("06_trajectory_explorer.ipynb", tmp_path) / "explorer"
    assert {"trajectory.png", "trajectory.gif", "compare.png", "group.png"} <= {p.name for p in out.iterdir()}
