"""The diagnostic command lines, the dry run and the distributed evaluation check their arguments
before any compute: a bad count, a missing file or folder, a malformed override is one line naming
the value and the fix (exit status 2, no traceback), and nothing was loaded, trained or written."""
from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowopd_lib import dryrun, distributed_eval, models
from flowopd_lib.diagnostics import bench, compare, gpu_check, probe
from guards import refused, snapshot
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "papermill_runs" / "sd35m.yaml"
COMMANDS = ["flowopd_lib.diagnostics.compare", "flowopd_lib.diagnostics.probe", "flowopd_lib.diagnostics.bench",
            "flowopd_lib.diagnostics.curves", "flowopd_lib.diagnostics.eval_power", "flowopd_lib.diagnostics.across_dial",
            "flowopd_lib.diagnostics.ocr_errors", "flowopd_lib.diagnostics.gpu_check", "flowopd_lib.dryrun",
            "flowopd_lib.distributed_eval"]


@pytest.fixture()
def no_compute(monkeypatch):
    """Every loading, training and sampling entry of these commands fails the test if reached."""
    def fail(what):
        return lambda *args, **kwargs: pytest.fail(f"{what} before the arguments were checked")

    monkeypatch.setattr(models, "load_base", fail("a model loaded"))
    for name in ("train", "gradient_cosines", "gradient_line_search", "distill"):
        monkeypatch.setattr(probe, name, fail(f"probe.{name} ran"))
    monkeypatch.setattr(bench, "build_trainers", fail("the trainers were built"))
    monkeypatch.setattr(dryrun, "dry_run", fail("the dry run started"))
    monkeypatch.setattr(gpu_check, "Check", fail("the GPU check started"))


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_runs_through_cli_entry(module):
    """`python -m <module>` calls main(), which cli.entry wraps: a UserError is one line, exit 2."""
    loaded = importlib.import_module(module)
    assert hasattr(loaded.main, "__wrapped__"), f"{module}.main is not wrapped by cli.entry"
    assert 'if __name__ == "__main__":' in inspect.getsource(loaded)


@pytest.mark.parametrize("module, argv, named", [
    ("flowopd_lib.diagnostics.curves", [".", "--every", "0"], "--every"),
    ("flowopd_lib.diagnostics.ocr_errors", ["--prompts", "0"], "--prompts"),
    ("flowopd_lib.diagnostics.eval_power", ["--samples", "0"], "--samples"),
    ("flowopd_lib.diagnostics.bench", ["--steps", "0"], "--steps"),
    ("flowopd_lib.distributed_eval", ["base", "no_job.yaml", "--out", "scores.csv"], "no_job.yaml"),
])
def test_a_bad_argument_from_the_shell_is_one_line_and_exit_status_2(tmp_path, module, argv, named):
    done = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    said = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, said[-2000:])
    assert len(said.splitlines()) == 1 and said.startswith("error: ") and named in said, said
    assert "Traceback" not in said and not list(tmp_path.iterdir())


def test_compare_names_a_missing_or_damaged_run(tmp_path, capsys, no_compute):
    said = refused(capsys, compare.main, [str(tmp_path / "nowhere"), "a", "b"])
    assert "nowhere" in said
    for run, content in [("run", "main: {base: \n  - x: ["), ("sound", "main: {base: null, a: null}\n")]:
        (tmp_path / run / "summary").mkdir(parents=True)
        (tmp_path / run / "summary" / "parameters.yaml").write_text(content)
    before = snapshot(tmp_path)
    said = refused(capsys, compare.main, [str(tmp_path / "run"), "a", "base"])
    assert str(tmp_path / "run" / "summary" / "parameters.yaml") in said and "YAML" in said
    said = refused(capsys, compare.main, [str(tmp_path / "sound"), "a", "base", "--with", str(tmp_path / "other")])
    assert str(tmp_path / "other") in said
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, named", [
    (["train", "probe_redness", "--updates", "0"], "--updates"),
    (["cosine", "probe_redness", "--batches", "1"], "--batches"),
    (["linesearch", "probe_redness", "--batches", "0"], "--batches"),
    (["train", "probe_redness", "-c", "lr"], "'lr'"),
    (["train", "probe_redness", "-c", "lr=[0.1"], "'lr=[0.1'"),
    (["train", "probe_redness", "-c", "lrr=0.01"], "'lrr'"),
    (["distill", "-c", "mar_lamda=0"], "'mar_lamda'"),
    (["linesearch", "probe_redness", "--out", "{file}"], "a_file"),
])
def test_probe_checks_its_arguments_first(tmp_path, capsys, no_compute, argv, named):
    (tmp_path / "a_file").write_text("not a folder")
    before = snapshot(tmp_path)
    said = refused(capsys, probe.main, [a.replace("{file}", str(tmp_path / "a_file")) for a in argv])
    assert named in said, said
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, named", [
    (["--repeats", "0"], "--repeats"), (["--prompts", "0"], "--prompts"), (["--group-size", "0"], "--group-size"),
    (["--steps", "-1"], "--steps"), (["--base", "no_such_base"], "no_such_base"),
])
def test_bench_checks_its_arguments_first(capsys, no_compute, argv, named):
    assert named in refused(capsys, bench.main, argv)


@pytest.fixture()
def spec(tmp_path) -> Path:
    """A copy of the full-scale spec (its stages' notebooks are the repository's)."""
    path = tmp_path / "sd35m.yaml"
    path.write_text(SPEC.read_text())
    return path


@pytest.mark.parametrize("argv, named", [
    (["{spec}", "--processes", "0"], "--processes"),
    (["{spec}", "-p", "trainer"], "'trainer'"),
    (["{spec}", "-p", "cfg_scale=[1"], "'cfg_scale=[1'"),
    (["{spec}", "--only", "no_such_stage"], "no_such_stage"),
    (["{missing}"], "missing.yaml"),
])
def test_dryrun_checks_its_arguments_first(tmp_path, capsys, no_compute, spec, argv, named):
    before = snapshot(tmp_path)
    argv = [a.replace("{spec}", str(spec)).replace("{missing}", str(tmp_path / "missing.yaml")) for a in argv]
    assert named in refused(capsys, dryrun.main, argv)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, named", [
    (["{missing_adapter}", "{job}", "--out", "{out}"], "missing_adapter"),
    (["base", "{missing_job}", "--out", "{out}"], "missing_job.yaml"),
    (["base", "{job}", "--out", "{folder}"], "a_folder"),
    (["base", "{job}", "--out", "{nowhere}"], "nowhere"),
    (["base", "{job}", "eval_steps", "--out", "{out}"], "'eval_steps'"),
    (["base", "{job}", "eval_stepz=3", "--out", "{out}"], "'eval_stepz'"),
])
def test_distributed_eval_checks_its_arguments_first(tmp_path, capsys, no_compute, argv, named):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"eval_tasks": ["deqa"], "eval_prompts": 2, "eval_steps": 2}))
    (tmp_path / "a_folder").mkdir()
    places = {"{missing_adapter}": tmp_path / "missing_adapter", "{job}": job, "{missing_job}": tmp_path / "missing_job.yaml",
              "{out}": tmp_path / "scores.csv", "{folder}": tmp_path / "a_folder",
              "{nowhere}": tmp_path / "nowhere" / "scores.csv"}
    before = snapshot(tmp_path)
    said = refused(capsys, distributed_eval.main, [str(places.get(a, a)) for a in argv])
    assert named in said, said
    assert snapshot(tmp_path) == before


def test_distributed_eval_refuses_a_damaged_adapter_before_loading(tmp_path, capsys, no_compute):
    from flowopd_lib import adapters

    model = tiny_model()
    adapters.add(model, "a", rank=2)
    folder = adapters.save(model, "a", tmp_path / "adapter")
    weights = Path(folder) / adapters.WEIGHT_NAME
    weights.write_bytes(weights.read_bytes()[:50])
    job = tmp_path / "job.yaml"
    job.write_text("eval_steps: 2\n")
    said = refused(capsys, distributed_eval.main, [str(folder), str(job), "--out", str(tmp_path / "s.csv")])
    assert "safetensors" in said and str(folder) in said


@pytest.mark.parametrize("argv, named", [
    (["--tiny", "--layers", "0"], "--layers"), (["--tiny", "--resolution", "0"], "--resolution"),
    (["--tiny", "--resolution", "40"], "16"), (["--tiny", "--out", "{file}"], "a_file"),
])
def test_gpu_check_checks_its_arguments_first(tmp_path, capsys, no_compute, argv, named):
    (tmp_path / "a_file").write_text("not a folder")
    said = refused(capsys, gpu_check.main, [a.replace("{file}", str(tmp_path / "a_file")) for a in argv])
    assert named in said, said
