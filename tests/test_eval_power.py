"""diagnostics.eval_power: the paired interval's half-width against the evaluation's size."""
import numpy as np
import pandas as pd

from flowopd_lib.diagnostics.eval_power import half_widths


def synthetic_scores(prompts: int, samples: int, shift: float, noise: float, seed: int = 0) -> pd.DataFrame:
    """Per-sample rows of two models: each prompt has its own difficulty (shared, so pairing removes it),
    each sample its own noise."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 0.3, prompts)
    rows = []
    for model, offset in (("base", 0.0), ("teacher", shift)):
        for j in range(samples):
            values = difficulty + offset + rng.normal(0, noise, prompts)
            rows.append(pd.DataFrame({"model": model, "metric": "ocr", "prompt": range(prompts), "sample": j,
                                      "stratum": "ocr", "value": values}))
    return pd.concat(rows, ignore_index=True)


def test_a_constant_shift_is_decided_exactly_and_pairing_removes_prompt_difficulty():
    table = half_widths(synthetic_scores(60, 2, shift=0.1, noise=0.0), "ocr", [30, 60], [1, 2])
    assert np.allclose(table["diff"], 0.1) and np.allclose(table["half_width"], 0.0, atol=1e-12)


def test_the_half_width_falls_with_prompts_and_samples():
    table = half_widths(synthetic_scores(200, 8, shift=0.1, noise=0.5), "ocr", [50, 200], [1, 8]).set_index(
        ["prompts", "samples"])["half_width"]
    assert table[(200, 1)] < table[(50, 1)] and table[(200, 8)] < table[(200, 1)]
    assert abs(table[(200, 1)] / table[(50, 1)] - 0.5) < 0.15  # ~1/sqrt(prompts)


def test_each_task_is_sampled_on_the_decisive_protocols_draws_in_its_worlds_setting(monkeypatch):
    from flowopd_lib import evaluation, teachers
    from flowopd_lib.diagnostics import eval_power
    from flowopd_lib.rewards import conflict

    asked = {}

    def record(views, tasks, n_prompts, **k):
        asked[tasks[0]] = (n_prompts, conflict.get())
    monkeypatch.setattr(eval_power.evaluation, "sample_scores", record)
    for task in teachers.shipped(world_name="dial"):
        eval_power.sample_table(task, samples=1, world_name="dial")
        assert asked[task] == (evaluation.DECISIVE["eval_prompts"][task], teachers.WORLDS["dial"].conflict)
    assert asked and conflict.get() == 0.0  # the setting ends with the sampling


def test_the_decisive_row_is_the_protocols_own_sizes():
    from flowopd_lib import evaluation
    from flowopd_lib.diagnostics import eval_power

    n, k = evaluation.DECISIVE["eval_prompts"]["ocr"], evaluation.DECISIVE["eval_samples"]["ocr"]
    table = eval_power.grid("ocr", synthetic_scores(n, 8, shift=0.1, noise=0.5), samples=8)
    decisive = table[table["decisive"]]
    assert len(decisive) == 1 and (decisive["prompts"].iloc[0], decisive["samples"].iloc[0]) == (n, k)


def test_a_named_evaluation_replaces_the_sizes_and_an_unknown_name_is_refused():
    import pytest

    from flowopd_lib import evaluation

    assert evaluation.protocol_sizes(None, 90, 1) == (90, 1)
    assert evaluation.protocol_sizes("decisive", 90, 1) == (evaluation.DECISIVE["eval_prompts"],
                                                            evaluation.DECISIVE["eval_samples"])
    with pytest.raises(ValueError, match=r"eval_protocol='decisiv'.*\['decisive'\]"):
        evaluation.protocol_sizes("decisiv", 90, 1)


def test_the_decisive_draws_fit_the_shipped_test_files():
    """A study spec naming the decisive evaluation must not stop at its first job on a too-small file."""
    from flowopd_lib import data, evaluation

    for task, n in evaluation.DECISIVE["eval_prompts"].items():
        assert len(data.prompts(task, n, "test", 0)) == n


def test_the_results_page_states_a_named_evaluations_sizes(tmp_path):
    import json

    import yaml

    from flowopd_lib import evaluation, summary

    (tmp_path / "summary").mkdir()
    (tmp_path / "provenance.json").write_text(json.dumps({"git": {"commit": "abc"}, "argv": ["runs.py"]}))
    (tmp_path / "summary" / "parameters.yaml").write_text(yaml.safe_dump(
        {"eval_protocol": "decisive", "eval_prompts": 90, "eval_samples": 1}))
    line = summary.provenance_lines(tmp_path)[-1]
    assert "eval_protocol decisive" in line and f"eval_prompts {evaluation.DECISIVE['eval_prompts']}" in line
    assert "eval_prompts 90" not in line


def test_the_shipped_measurement_reaches_every_target_at_the_decisive_protocol():
    """assets/measured/eval_power_dial: for each measured task the decisive row exists and is within its target,
    and the quick one (90 x 1) is not: what issue 36 D asked the evaluation to reach."""
    from flowopd_lib.diagnostics import eval_power

    table = eval_power.shipped()
    assert set(table["task"]) <= set(eval_power.TARGETS) and "geneval" in set(table["task"])
    decisive = table[table["evaluation"] == "decisive"]
    assert decisive["half_width"].notna().all() and (decisive["half_width"] <= decisive["target"]).all()
    quick = table[table["evaluation"] == "quick"]
    assert (quick["half_width"] > quick["target"]).all()


def test_a_task_without_a_shipped_teacher_is_refused_before_any_sampling(tmp_path, monkeypatch, capsys):
    import pytest

    from flowopd_lib import teachers
    from flowopd_lib.diagnostics import eval_power

    monkeypatch.setattr(teachers, "ASSETS", tmp_path / "teachers")  # a world with only an OCR teacher
    (tmp_path / "teachers_dial" / "ocr").mkdir(parents=True)
    (tmp_path / "teachers_dial" / "ocr" / "adapter.json").write_text("{}")
    monkeypatch.setattr(eval_power.evaluation, "sample_scores", lambda *a, **k: pytest.fail("sampled"))
    monkeypatch.setattr(eval_power.models, "load_base", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as exit_:
        eval_power.main(["--world", "dial", "--tasks", "ocr", "geneval", "--samples", "8", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "no shipped geneval teacher in the dial world" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
