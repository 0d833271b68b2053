"""diagnostics.schedule: replaying measured stage times under --jobs's rule, on cases worked by hand."""
import pytest

from flowopd_lib.diagnostics import schedule

SPEC = {"stages": [
    {"name": "a", "parameters": {}},
    {"name": "b", "parameters": {}},
    {"name": "c", "parameters": {"teachers": {"a": "{a}/adapter"}}},
    {"name": "summary", "parameters": {"main": {"b": "{b}/adapter", "c": "{c}/adapter"}}},
]}
LOG = "[x] a: finished in 600 s\n[x] b: finished in 1800 s\n[x] c: finished in 300 s\n"


def test_stage_minutes_are_read_from_the_runner_log():
    assert schedule.stage_minutes(LOG) == {"a": 10.0, "b": 30.0, "c": 5.0}


def test_replay_follows_spec_order_dependencies_and_jobs():
    minutes = schedule.stage_minutes(LOG)
    # two at a time: a and b start at once, c waits for a; the untimed summary is left out
    assert schedule.replay(SPEC, minutes, jobs=2) == {"a": (0.0, 10.0), "b": (0.0, 30.0), "c": (10.0, 15.0)}
    # one at a time: in spec order
    assert schedule.replay(SPEC, minutes, jobs=1) == {"a": (0.0, 10.0), "b": (10.0, 40.0), "c": (40.0, 45.0)}


def test_a_log_without_stage_times_is_refused(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("nothing finished\n")
    with pytest.raises(SystemExit) as stopped:
        schedule.main([str(log), "papermill_runs/dial_full.yaml"])
    assert stopped.value.code == 2 and "times no stage" in capsys.readouterr().err
