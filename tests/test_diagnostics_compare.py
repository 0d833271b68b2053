"""diagnostics.compare: the rows of a study's summary, and a clear error for a row it does not have."""
import pytest
import yaml

from flowopd_lib.diagnostics import compare


def test_rows_of_joins_every_summary_table_and_unknown_rows_are_named(tmp_path):
    params = {"main": {"base": None, "student": "s/adapter"}, "mar": {"no MAR": "n/adapter"},
              "merges": {"delta": "m"}, "seed": 0}
    assert compare.rows_of(params) == {"base": None, "student": "s/adapter", "no MAR": "n/adapter", "delta": "m"}
    (tmp_path / "summary").mkdir()
    (tmp_path / "summary" / "parameters.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit, match=r"no row\(s\) \['studnet'\].*rows: \['base', 'delta', 'no MAR', 'student'\]"):
        compare.paired(tmp_path, ["studnet"], "base")
    with pytest.raises(SystemExit, match="at least two rows"):
        compare.main([str(tmp_path), "base"])


def test_rows_of_another_run_join_only_under_the_same_protocol():
    protocol = {"seed": 0, "eval_prompts": 90, "eval_steps": 20, "eval_cfg": 1.0}
    study = {**protocol, "main": {"base": None, "teacher": "t", "student": "s"}}
    mix = {**protocol, "eval_samples": 1, "main": {"base": None, "teacher": "t", "Mix": "m"}}
    assert compare.joined_rows({"study": study, "mix": mix}) == {"base": None, "teacher": "t", "student": "s",
                                                                 "Mix": "m"}
    with pytest.raises(SystemExit, match=r"mix was evaluated under another protocol.*'eval_cfg': \(1.0, 3.0\)"):
        compare.joined_rows({"study": study, "mix": {**mix, "eval_cfg": 3.0}})
    with pytest.raises(SystemExit, match=r"row 'teacher' is t in study but other in mix"):
        compare.joined_rows({"study": study, "mix": {**mix, "main": {"teacher": "other"}}})
