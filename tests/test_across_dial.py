"""diagnostics.across_dial: each method's paired distance to the teachers, per conflict setting."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from flowopd_lib.diagnostics import across_dial


def study(folder, gap: float, seed: int = 0):
    """A summary folder: base, teachers, a merge `gap` below each teacher, a student in two seeds
    (one `gap` below, one exactly the teacher): per-sample scores keyed by adapter directory."""
    rng = np.random.default_rng(seed)
    main = {"base": None, **{f"teacher {t}": f"/t/{t}" for t in across_dial.DISTILLED},
            "merge (cold start)": "/m", "Flow-OPD (merge init)": "/s0", "Flow-OPD (merge init, seed 1)": "/s1"}
    rows = []
    for task in across_dial.DISTILLED:
        difficulty = rng.uniform(0.2, 0.6, 40)
        level = {"base": 0.0, f"teacher {task}": 0.3, "merge (cold start)": 0.3 - gap,
                 "Flow-OPD (merge init)": 0.3 - gap, "Flow-OPD (merge init, seed 1)": 0.3}
        for label, directory in main.items():
            rows.append(pd.DataFrame({"model": str(directory), "metric": task, "prompt": range(40), "sample": 0,
                                      "stratum": task, "value": difficulty + level.get(label, 0.1)}))
    (folder / "summary").mkdir(parents=True)
    pd.concat(rows).to_csv(folder / "summary" / "scores.csv", index=False)
    (folder / "summary" / "parameters.yaml").write_text(yaml.safe_dump({"main": main}))


def test_each_method_is_measured_against_the_teacher_of_each_task_and_seeds_are_pooled(tmp_path):
    study(tmp_path / "a", gap=0.1)
    table = across_dial.distances(*across_dial.labelled_scores(tmp_path / "a"), setting=0.5, n_boot=200)
    row = table.set_index(["method", "task"])
    assert set(row.index.get_level_values("method")) == {"teacher - base", "merge (cold start)", "Flow-OPD (merge init)"}
    assert np.allclose(row.loc[("teacher - base", "ocr"), "diff"], 0.3)
    assert np.allclose(row.loc[("merge (cold start)", "geneval"), ["diff", "low", "high"]], -0.1)  # no noise: exact
    assert np.isclose(row.loc[("Flow-OPD (merge init)", "pickscore"), "diff"], -0.05)  # two seeds, -0.1 and 0
    assert (table["setting"] == 0.5).all()


def test_the_command_writes_a_table_and_a_figure_across_settings(tmp_path):
    study(tmp_path / "zero", gap=0.0)
    study(tmp_path / "half", gap=0.2)
    across_dial.main(["--run", f"0={tmp_path / 'zero'}", "--run", f"0.5={tmp_path / 'half'}", "--out", str(tmp_path / "o")])
    table = pd.read_csv(tmp_path / "o" / "across_dial.csv")
    merge = table[(table["method"] == "merge (cold start)") & (table["task"] == "ocr")].set_index("setting")["diff"]
    assert np.allclose(merge[0.0], 0.0) and np.allclose(merge[0.5], -0.2)
    assert (tmp_path / "o" / "across_dial.png").stat().st_size > 0


@pytest.mark.parametrize("run, said", [("half=x", "SETTING=RUN_DIR"), ("1.5=x", "in \\[0, 1\\]"),
                                       ("0.5=/no/such/run", "is missing: run the study.s summary stage")])
def test_a_bad_run_is_one_line_and_exit_2_before_anything(run, said, tmp_path):
    done = subprocess.run([sys.executable, "-m", "flowopd_lib.diagnostics.across_dial", "--run", run, "--out",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 2 and not (tmp_path / "o").exists()
    assert len(done.stderr.strip().splitlines()) == 1
    import re
    assert re.search(said, done.stderr) or said.replace("\\", "") in done.stderr


def test_notebook_05_draws_the_comparison_across_the_dial(tmp_path):
    """Notebook 05's `dial_runs`: the same table as the command, from the same two studies."""
    study(tmp_path / "zero", gap=0.0)
    study(tmp_path / "half", gap=0.2)
    table = across_dial.measure({0: tmp_path / "zero", "0.5": str(tmp_path / "half")})
    assert sorted(set(table["setting"])) == [0.0, 0.5]
    with pytest.raises(across_dial.cli.UserError, match="scores.csv is missing|parameters.yaml is missing"):
        across_dial.measure({0.5: tmp_path / "nowhere"})
