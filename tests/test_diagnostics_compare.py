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
