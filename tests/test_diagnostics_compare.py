"""diagnostics.compare: the rows of a study's summary, and a clear error for a row it does not have."""
import pytest
import yaml

from flowopd_lib.cli import UserError
from flowopd_lib.diagnostics import compare


def test_rows_of_joins_every_summary_table_and_unknown_rows_are_named(tmp_path, capsys):
    params = {"main": {"base": None, "student": "s/adapter"}, "mar": {"no MAR": "n/adapter"},
              "merges": {"delta": "m"}, "seed": 0}
    assert compare.rows_of(params) == {"base": None, "student": "s/adapter", "no MAR": "n/adapter", "delta": "m"}
    (tmp_path / "summary").mkdir()
    (tmp_path / "summary" / "parameters.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=r"no row\(s\) \['studnet'\].*rows: \['base', 'delta', 'no MAR', 'student'\]"):
        compare.paired(tmp_path, ["studnet"], "base")
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(tmp_path), "base"])
    assert exit_.value.code == 2 and "at least two rows" in capsys.readouterr().err


def test_rows_of_another_run_join_only_under_the_same_protocol():
    protocol = {"seed": 0, "eval_prompts": 90, "eval_steps": 20, "eval_cfg": 1.0}
    study = {**protocol, "main": {"base": None, "teacher": "t", "student": "s"}}
    mix = {**protocol, "eval_samples": 1, "main": {"base": None, "teacher": "t", "Mix": "m"}}
    assert compare.joined_rows({"study": study, "mix": mix}) == {"base": None, "teacher": "t", "student": "s",
                                                                 "Mix": "m"}
    with pytest.raises(UserError, match=r"mix was evaluated under another protocol.*'eval_cfg': \(1.0, 3.0\)"):
        compare.joined_rows({"study": study, "mix": {**mix, "eval_cfg": 3.0}})
    with pytest.raises(UserError, match=r"row 'teacher' is t in study but other in mix, and their weights differ"):
        compare.joined_rows({"study": study, "mix": {**mix, "main": {"teacher": "other"}}})


def test_a_row_in_two_runs_may_be_two_copies_of_the_same_weights(tmp_path):
    """Two runs that each merge the same teachers write equal tensors (with metadata in another order)."""
    import torch
    from safetensors.torch import save_file

    def adapter(name, value, metadata):
        (tmp_path / name).mkdir()
        save_file({"lora.A": torch.full((2, 3), value)}, tmp_path / name / "pytorch_lora_weights.safetensors", metadata)
        return str(tmp_path / name)

    merge, copy = adapter("a", 1.0, {"x": "1", "y": "2"}), adapter("b", 1.0, {"y": "2", "x": "1"})
    other = adapter("c", 2.0, {})
    protocol = {"seed": 0, "eval_prompts": 90}
    rows = compare.joined_rows({"one": {**protocol, "main": {"merge": merge}}, "two": {**protocol, "main": {"merge": copy}}})
    assert rows == {"merge": merge}
    assert not compare.same_adapter(merge, other) and not compare.same_adapter(merge, None)


def test_a_dial_summary_is_rescored_in_its_world_and_under_its_named_evaluation(tmp_path, monkeypatch):
    """A summary at conflict 0.5 under the decisive evaluation: compare scores each task at that
    setting (the PickScore proxy of the dial) and at the protocol's own sizes, as notebook 05 did."""
    import pandas as pd

    from flowopd_lib import evaluation
    from flowopd_lib.rewards import conflict

    asked = {}

    def record(views, tasks, n_prompts, samples_per_prompt, **kwargs):
        asked[tasks[0]] = (n_prompts, samples_per_prompt, conflict.get())
        return pd.DataFrame([{"model": m, "metric": tasks[0], "prompt": p, "sample": 0, "stratum": tasks[0],
                              "value": float(p + (m == "twin"))} for m in views for p in range(4)])
    monkeypatch.setattr(evaluation, "sample_scores", record)
    (tmp_path / "summary").mkdir()
    (tmp_path / "summary" / "parameters.yaml").write_text(yaml.safe_dump(
        {"main": {"base": None, "twin": None}, "base": "toy_glyph", "conflict": 0.5, "eval_protocol": "decisive",
         "eval_prompts": 90, "eval_samples": 1, "seed": 0}))
    table = compare.paired(tmp_path, ["twin"], "base")
    assert asked == {t: (evaluation.DECISIVE["eval_prompts"][t], evaluation.DECISIVE["eval_samples"][t], 0.5)
                     for t in evaluation.TASKS}
    assert conflict.get() == 0.0 and (table["diff"] == 1.0).all()


def test_a_summary_with_per_sample_scores_is_compared_from_them_without_sampling(tmp_path, monkeypatch):
    """A decisive summary is ~6,000 images a model: compare reads notebook 05's scores.csv (the very
    samples the summary's tables and claims come from) instead of generating them again. Rows of a
    second run (--with) come from its own scores.csv; a label two tables share (the MAR table's row
    naming the main table's adapter) reads the same samples."""
    import pandas as pd

    from flowopd_lib import evaluation

    def never(*args, **kwargs):
        raise AssertionError("compare sampled although the summary kept its per-sample scores")
    monkeypatch.setattr(evaluation, "sample_scores", never)

    def summary(run, main, values):
        (run / "summary").mkdir(parents=True)
        (run / "summary" / "parameters.yaml").write_text(yaml.safe_dump(
            {"main": main, "mar": {"with MAR": main["student"]} if "student" in main else {}, "seed": 0,
             "eval_prompts": 4}))
        pd.DataFrame([{"model": str(directory), "metric": metric, "prompt": p, "sample": s, "stratum": metric,
                       "value": values[str(directory)] + p}
                      for directory in main.values() for metric in ("geneval", "ocr") for p in range(4) for s in (0, 1)]
                     ).to_csv(run / "summary" / "scores.csv", index=False)

    summary(tmp_path / "study", {"base": None, "student": "s/adapter"}, {"None": 0.0, "s/adapter": 0.25})
    summary(tmp_path / "mix", {"base": None, "Mix": "m/adapter"}, {"None": 0.0, "m/adapter": 0.5})
    table = compare.paired(tmp_path / "study", ["student", "with MAR", "Mix"], "base",
                           other_runs=(tmp_path / "mix",))
    assert table.loc["student", "diff"].tolist() == [0.25, 0.25] and table.loc["with MAR", "diff"].tolist() == [0.25, 0.25]
    assert table.loc["Mix", "diff"].tolist() == [0.5, 0.5]


def test_another_run_may_be_named_by_its_summary_folder(tmp_path, monkeypatch):
    """dial_opd_methods keeps its scores in summary_merge and summary_base, dial_full in summary: a
    --with may name the other run's summary folder itself, so that the two pair (as the spec says)."""
    import pandas as pd

    from flowopd_lib import evaluation

    monkeypatch.setattr(evaluation, "sample_scores", lambda *a, **k: pytest.fail("sampled"))

    def summary(folder, main, values):
        folder.mkdir(parents=True)
        (folder / "parameters.yaml").write_text(yaml.safe_dump({"main": main, "seed": 0, "eval_prompts": 4}))
        pd.DataFrame([{"model": str(directory), "metric": "ocr", "prompt": p, "sample": 0, "stratum": "ocr",
                       "value": values[str(directory)] + p} for directory in main.values() for p in range(4)]
                     ).to_csv(folder / "scores.csv", index=False)

    summary(tmp_path / "study" / "summary", {"base": None, "student": "s/adapter"}, {"None": 0.0, "s/adapter": 0.25})
    summary(tmp_path / "methods" / "summary_merge", {"base": None, "method": "m/adapter"}, {"None": 0.0, "m/adapter": 0.5})
    table = compare.paired(tmp_path / "study", ["method"], "student", other_runs=(tmp_path / "methods" / "summary_merge",))
    assert table.loc["method", "diff"].tolist() == [0.25]
    compare.main([str(tmp_path / "study"), "method", "student", "--with", str(tmp_path / "methods" / "summary_merge")])
