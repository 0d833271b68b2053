"""Hostile and damaged inputs in every place the project reads back or writes over: crafted pickles
(checkpoints, adapter weights), YAML asking to build objects (configs, specs, a stage's record, a
run's config), truncated and empty files, names that lead out of their folder, read-only and full
targets. Each ends in one clear line (exit status 2, no traceback), no payload ever runs, and every
file is as it was: hashes, modes and folders compared before and after (guards.snapshot)."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from flowopd_lib import adapters, runs, safe_files, summary, teachers, train
from flowopd_lib.diagnostics import curves, ocr_errors
from flowopd_lib.grpo import GRPOConfig
from guards import refused, snapshot
from test_summary import pages, summary_run
from test_teachers import shipped_teacher, teacher_run
from tiny import tiny_model

TINY_RUN = {"rewards": {"geneval": 1.0}, "datasets": {"geneval": 1.0}, "prompts_per_update": 2, "group_size": 2,
            "sde_steps": 2, "updates": 2, "checkpoint_every": 1}


class Payload:
    """Unpickles to os.mkdir(marker): a folder that exists only if unpickling ran its code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def crafted_pickle(marker: Path, how: str) -> bytes:
    """A file that runs os.mkdir(marker) when unpickled: torch.save's zip of a pickle, or a bare pickle."""
    state = {"step": 1, "adapter": Payload(marker)}
    if how == "bare pickle":
        return pickle.dumps(state)
    path = marker.with_name("torch_saved.pt")
    torch.save(state, path)
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.fixture()
def marker(tmp_path):
    """Where a payload would leave its trace; asserted absent after each test."""
    path = tmp_path / "payload_ran"
    yield path
    assert not path.exists(), "a crafted file ran code"


@pytest.fixture()
def assets(tmp_path, monkeypatch):
    """A stand-in for assets/teachers holding one shipped teacher, measuring stubbed out."""
    folder = tmp_path / "assets"
    shipped_teacher(folder, "geneval")
    monkeypatch.setattr(teachers, "ASSETS", folder)
    monkeypatch.setattr(teachers, "REPLACED_TEACHERS", tmp_path / "replaced")
    monkeypatch.setattr(teachers, "measure", lambda task, adapter_dir, **settings: pytest.fail("measured before checking"))
    return folder


def grpo_run(tmp_path) -> tuple[Path, Path]:
    """(config file, run directory) of a tiny GRPO run on a tiny base; the run directory holds its config.yaml."""
    base = tiny_model().save(tmp_path / "base")
    run = tmp_path / "run"
    cfg = GRPOConfig(**TINY_RUN, base=str(base), out_dir=str(run))
    run.mkdir()
    cfg.to_yaml(run / "config.yaml")
    config = tmp_path / "run.yaml"
    cfg.to_yaml(config)
    return config, run


def adapter_folder(path: Path, weights: bytes | None = None) -> Path:
    """A saved tiny adapter, its weights file replaced by `weights` if given."""
    model = tiny_model()
    adapters.add(model, "a", rank=2)
    adapters.save(model, "a", path)
    if weights is not None:
        (path / adapters.WEIGHT_NAME).write_bytes(weights)
    return path


# ----------------------------------------------------------------------------- crafted pickles

@pytest.mark.parametrize("how", ["torch.save", "bare pickle"])
def test_a_crafted_checkpoint_is_refused_on_resume(tmp_path, marker, capsys, monkeypatch, how):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config, run = grpo_run(tmp_path)
    (run / "checkpoints" / "step_0000001").mkdir(parents=True)
    (run / "checkpoints" / "step_0000001" / "state.pt").write_bytes(crafted_pickle(marker, how))
    before = snapshot(tmp_path)
    with pytest.warns(UserWarning) if how == "bare pickle" else nullcontext():  # unreadable: the one before is tried
        said = refused(capsys, train.main, ["grpo", str(config)])
    assert "state.pt" in said
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("place", ["init_adapter", "opd teacher", "opd anchor", "peft folder", "ship", "ocr_errors"])
def test_crafted_adapter_weights_are_refused_before_anything_loads(tmp_path, marker, capsys, assets, place):
    crafted = crafted_pickle(marker, "bare pickle")
    folder = adapter_folder(tmp_path / "adapter", crafted)
    out = f"out_dir={tmp_path / 'out'}"
    if place == "peft folder":
        shutil.rmtree(folder)
        folder.mkdir()
        (folder / adapters.PEFT_CONFIG_NAME).write_text(json.dumps({"r": 2, "target_modules": ["to_q"]}))
        (folder / adapters.PEFT_WEIGHT_NAME).write_bytes(crafted)
    run = teacher_run(tmp_path / "teacher_run")
    (run / "adapter" / adapters.WEIGHT_NAME).write_bytes(crafted)
    commands = {
        "init_adapter": (train.main, ["grpo", f"init_adapter={folder}", out]),
        "peft folder": (train.main, ["grpo", f"init_adapter={folder}", out]),
        "opd teacher": (train.main, ["opd", f"teachers={{geneval: {folder}}}", "datasets={geneval: 1.0}", out]),
        "opd anchor": (train.main, ["opd", f"teachers={{geneval: {adapter_folder(tmp_path / 'ok')}}}",
                                    "datasets={geneval: 1.0}", f"anchor={folder}", out]),
        "ship": (teachers.main, ["ship", "geneval", "--run", str(run), "--force"]),
        "ocr_errors": (ocr_errors.main, ["--adapter", str(folder), "--prompts", "2"]),
    }
    main, argv = commands[place]
    before = snapshot(tmp_path)
    said = refused(capsys, main, argv)
    assert "safetensors" in said and (str(folder) in said or str(run / "adapter") in said), said
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- YAML that builds objects

def test_yaml_that_builds_objects_is_refused_everywhere(tmp_path, marker, capsys, assets, monkeypatch):
    payload = f'!!python/object/apply:os.mkdir ["{marker}"]'
    monkeypatch.setattr("papermill.execute_notebook", lambda *args, **kwargs: pytest.fail("a stage ran"))
    config = tmp_path / "run.yaml"
    config.write_text(f"lr: {payload}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: {payload}\nstages: []\n")
    good_spec = tmp_path / "good_spec.yaml"  # a sound spec whose stage folder holds a hostile record
    good_spec.write_text(yaml.safe_dump({"name": "s", "stages": [
        {"name": "teacher", "notebook": "notebooks/02_teacher_grpo.ipynb", "parameters": {"lr": 0.001}}]}))
    (tmp_path / "outputs" / "s" / "teacher").mkdir(parents=True)
    (tmp_path / "outputs" / "s" / "teacher" / "parameters.yaml").write_text(f"lr: {payload}\n")
    run = teacher_run(tmp_path / "teacher_run")
    (run / "config.yaml").write_text(f"lr: {payload}\n")
    summarised = summary_run(tmp_path / "s")
    (summarised / "spec.yaml").write_text(payload + "\n")
    before = snapshot(tmp_path)
    for main, argv, named in [
            (train.main, ["grpo", str(config)], config),
            (runs.main, [str(spec), "--outputs", str(tmp_path / "outputs")], spec),
            (runs.main, [str(good_spec), "--outputs", str(tmp_path / "outputs")], "parameters.yaml"),
            (teachers.main, ["ship", "geneval", "--run", str(run), "--force"], run / "config.yaml"),
            (summary.main, [str(summarised)], summarised / "spec.yaml")]:
        said = refused(capsys, main, argv)
        assert str(named) in said and "builds an object" in said, said
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- truncated and empty files

def test_truncated_and_empty_files_are_named_in_one_line(tmp_path, marker, capsys, assets, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = teacher_run(tmp_path / "teacher_run")
    weights = run / "adapter" / adapters.WEIGHT_NAME
    info = run / "adapter" / "adapter.json"
    summarised = summary_run(tmp_path / "s")
    metrics = tmp_path / "curves" / "metrics.csv"
    metrics.parent.mkdir()
    config, grpo_dir = grpo_run(tmp_path)
    cases = [  # (what to damage, how, command, what the line names)
        (info, b"", (teachers.main, ["ship", "geneval", "--run", str(run), "--force"]), "is empty"),
        (info, b'{"updates": 20', (teachers.main, ["ship", "geneval", "--run", str(run), "--force"]), "JSON"),
        (weights, weights.read_bytes()[:100], (teachers.main, ["ship", "geneval", "--run", str(run), "--force"]),
         "safetensors"),
        (summarised / "provenance.json", b'{"git": {"commit": "ab', (summary.main, [str(summarised)]), "JSON"),
        (metrics, b"", (curves.main, [str(metrics.parent), "--columns", "kl_ref"]), "CSV"),
        (config, b"rewards: {geneval: 1.0\n", (train.main, ["grpo", str(config)]), "YAML"),
        (tmp_path / "spec.yaml", b"", (runs.main, [str(tmp_path / "spec.yaml")]), "mapping"),
    ]
    for path, damage, (main, argv), named in cases:
        original = path.read_bytes() if path.exists() else None
        path.write_bytes(damage)
        before = snapshot(tmp_path)
        said = refused(capsys, main, argv)
        assert str(path) in said and named in said, said
        assert snapshot(tmp_path) == before
        if original is not None:
            path.write_bytes(original)
    state = grpo_dir / "checkpoints" / "step_0000001" / "state.pt"  # every checkpoint cut off
    state.parent.mkdir(parents=True)
    state.write_bytes(b"PK\x03\x04 cut")
    before = snapshot(tmp_path)
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        said = refused(capsys, train.main, ["grpo", str(config)])
    assert str(state) in said and snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- names that lead out

def test_names_that_lead_out_of_their_folder_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("papermill.execute_notebook", lambda *args, **kwargs: pytest.fail("a stage ran"))
    spec, out = tmp_path / "inside" / "spec.yaml", tmp_path / "inside" / "outputs"
    spec.parent.mkdir()
    stage = {"name": "teacher", "notebook": "notebooks/02_teacher_grpo.ipynb", "parameters": {"lr": 0.001}}
    before = snapshot(tmp_path)
    for name, stage_name in [("../../escaped", "teacher"), (str(tmp_path / "escaped"), "teacher"),
                             ("run", "../escaped"), (".hidden", "teacher")]:
        spec.write_text(yaml.safe_dump({"name": name, "stages": [{**stage, "name": stage_name}]}))
        said = refused(capsys, runs.main, [str(spec), "--outputs", str(out)])
        assert "name" in said
        spec.unlink()
        assert snapshot(tmp_path) == before
    said = refused(capsys, curves.main, [str(tmp_path), "--out", str(tmp_path / ".." / "nowhere" / "f.png")])
    assert "nowhere" in said and snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- read-only and full targets

def test_read_only_targets_are_left_alone(tmp_path, capsys, assets):
    summarised = summary_run(tmp_path / "s")
    docs, readme = pages(tmp_path)
    teacher = assets / "geneval"
    run = teacher_run(tmp_path / "teacher_run")
    try:
        for target, mode, (main, argv) in [
                (docs / "results.md", 0o444, (summary.main, [str(summarised), "--out", str(docs / "results.md")])),
                (docs, 0o555, (summary.main, [str(summarised), "--out", str(docs / "new.md")])),
                (readme, 0o444, (summary.main, [str(summarised), "--out", str(docs / "results.md"), "--readme",
                                                str(readme)])),
                (teacher, 0o555, (teachers.main, ["ship", "geneval", "--run", str(run), "--force"]))]:
            target.chmod(mode)
            before = snapshot(tmp_path)
            said = refused(capsys, main, argv)
            assert "read-only" in said and str(target) in said, said
            assert snapshot(tmp_path) == before
            target.chmod(0o755 if target.is_dir() else 0o644)
    finally:
        for path in (docs, teacher):
            path.chmod(0o755)


def test_a_full_disk_leaves_the_old_files_whole(tmp_path, capsys, assets, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    summarised = summary_run(tmp_path / "s")
    docs, readme = pages(tmp_path)
    run = teacher_run(tmp_path / "teacher_run")
    before = snapshot(tmp_path)
    fsync = os.fsync
    monkeypatch.setattr(safe_files.os, "fsync", full)
    said = refused(capsys, summary.main, [str(summarised), "--out", str(docs / "results.md"), "--readme", str(readme)])
    assert "No space left on device" in said and str(docs / "results.md") in said  # the page: the first write
    monkeypatch.setattr(safe_files.os, "fsync", fsync)
    monkeypatch.setattr(summary.shutil, "copy2", full)  # the figures, the last written: the staged page goes too
    said = refused(capsys, summary.main, [str(summarised), "--out", str(docs / "results.md"), "--readme", str(readme)])
    assert "No space left on device" in said and str(docs / "figures") in said
    monkeypatch.setattr(teachers.shutil, "copytree", full)
    monkeypatch.setattr(teachers, "measure", lambda task, adapter_dir, **settings: {"geneval": 0.9})
    said = refused(capsys, teachers.main, ["ship", "geneval", "--run", str(run), "--force"])
    assert "No space left on device" in said and str(assets / "geneval") in said
    assert snapshot(tmp_path) == before  # and nothing half-written left beside the targets


# ----------------------------------------------------------------------------- damaged caches, records and specs

EVALUATE_DAMAGE = {"empty": b"", "cut off": b'{"pickscore": 0.', "not text": b"\x80\x04\x95 a pickle",
                   "a list": b"[0.5, 0.5]", "a string for a number": b'{"pickscore": "high"}',
                   "another task's metrics": b'{"ocr": 0.5}'}
SAMPLE_SCORES_DAMAGE = {**EVALUATE_DAMAGE, "another shape": b'{"pickscore": [[0.5]]}',
                        "a number for the samples": b'{"pickscore": 0.5}'}


@pytest.mark.parametrize("kind", ["evaluate", "sample_scores"])
def test_a_damaged_evaluation_cache_entry_is_recomputed_with_a_warning(tmp_path, monkeypatch, kind):
    """The evaluation cache is a cache: an entry cut off, emptied or of another shape is a miss (one
    warning line naming it), measured anew and rewritten, never a JSON traceback or a wrong row."""
    from flowopd_lib import evaluation, rollout

    model = tiny_model()
    protocol = dict(tasks=("pickscore",), n_prompts=4, steps=2, cfg_scale=1.0, seed=1, cache_dir=tmp_path / "cache")
    measure = getattr(evaluation, kind)
    first = measure(model, **protocol)
    (entry,) = (tmp_path / "cache").glob("*.json")
    written = entry.read_bytes()
    calls = []
    generate = rollout.generate
    monkeypatch.setattr(rollout, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    for name, damage in (EVALUATE_DAMAGE if kind == "evaluate" else SAMPLE_SCORES_DAMAGE).items():
        entry.write_bytes(damage)
        with pytest.warns(UserWarning) as warned:
            again = measure(model, **protocol)
        said = [str(w.message) for w in warned if "cache" in str(w.message)]
        assert len(said) == 1 and str(entry) in said[0] and "\n" not in said[0], (name, said)
        assert len(calls) == 1, name  # measured anew, once
        calls.clear()
        pd.testing.assert_frame_equal(again, first)
        assert entry.read_bytes() == written, name  # and rewritten
    measure(model, **protocol)  # a sound entry: read back, nothing sampled
    assert not calls


def test_a_damaged_launched_evaluation_cache_is_a_miss(tmp_path):
    from flowopd_lib import distributed_eval

    sound = pd.DataFrame({"model": ["m"], "metric": ["ocr"], "prompt": [0], "sample": [0], "stratum": ["ocr"],
                          "value": [0.5]})
    path = tmp_path / "launched_x.csv"
    assert distributed_eval.cached_scores(path) is None  # none yet
    distributed_eval.write_csv_atomically(sound, path)
    pd.testing.assert_frame_equal(distributed_eval.cached_scores(path), sound)
    for damage in (b"", b"\x80\x04\x95", b"model,metric\nm,ocr\n", b"model,metric,prompt,sample,stratum,value\nm,ocr,0,0,ocr,high\n"):
        path.write_bytes(damage)
        with pytest.warns(UserWarning, match=f"cached scores {path} are damaged"):
            assert distributed_eval.cached_scores(path) is None


GARBAGE_YAML = {"cut off": "stages: [{name: teacher\n", "a list": "- stages\n- name\n", "not text": b"\x80\x04\x95",
                "builds an object": "!!python/object/apply:os.mkdir [\"{marker}\"]\n"}


@pytest.mark.parametrize("damage", list(GARBAGE_YAML))
@pytest.mark.parametrize("command", ["distributed_eval", "dryrun"])
def test_a_garbage_yaml_is_one_line_and_changes_nothing(tmp_path, marker, capsys, monkeypatch, command, damage):
    from flowopd_lib import distributed_eval, dryrun, models

    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("a model loaded before the job was read"))
    monkeypatch.setattr(dryrun, "build_standins", lambda *a, **k: pytest.fail("stand-ins built before the spec was read"))
    adapter = adapter_folder(tmp_path / "adapter")
    path = tmp_path / "job.yaml"
    content = GARBAGE_YAML[damage]
    path.write_bytes(content if isinstance(content, bytes) else content.replace("{marker}", str(marker)).encode())
    argv = {"distributed_eval": (distributed_eval.main, [str(adapter), str(path), "--out", str(tmp_path / "s.csv")]),
            "dryrun": (dryrun.main, [str(path)])}
    before = snapshot(tmp_path)
    said = refused(capsys, *argv[command])
    assert str(path) in said, said
    assert snapshot(tmp_path) == before


def test_a_damaged_shipped_teacher_record_is_named(tmp_path):
    """teachers.table reads each shipped teacher's adapter.json: damaged or without its metrics, the
    error names the file (and how to ship it again), not a JSON or KeyError traceback."""
    info = shipped_teacher(tmp_path / "assets", "geneval") / "adapter.json"
    for damage, named in [(b'{"metrics": {"base"', "JSON"), (b"", "empty"), (b"[]", "object"),
                          (b'{"task": "old"}', "ship")]:
        info.write_bytes(damage)
        with pytest.raises(safe_files.FileError) as error:
            teachers.table(tmp_path / "assets")
        assert str(info) in str(error.value) and named in str(error.value), str(error.value)


@pytest.mark.parametrize("how", ["torch.save", "bare pickle", "cut off"])
def test_a_crafted_or_damaged_autoencoder_is_refused_on_resume(tmp_path, marker, monkeypatch, how):
    """pretrain resumes its autoencoder from autoencoder.pt: weights only (a crafted pickle runs
    nothing), and a damaged file is a CheckpointError naming it, before the run is opened."""
    from flowopd_lib.checkpoint import CheckpointError
    from flowopd_lib.pretrain import PretrainConfig, pretrain

    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    out.mkdir()
    ae = out / "autoencoder.pt"
    ae.write_bytes(b"PK\x03\x04 cut" if how == "cut off" else crafted_pickle(marker, how))
    before = snapshot(tmp_path)
    cfg = PretrainConfig(size="tiny", ae_steps=1, ae_batch=4, batch=4, steps=1, out_dir=str(out))
    with pytest.raises(CheckpointError) as error:
        pretrain(cfg, resume=True)
    said = str(error.value)
    assert str(ae) in said and "\n" not in said, said
    assert snapshot(tmp_path) == before


def test_gpu_checks_spec_is_read_safely(tmp_path, marker):
    from flowopd_lib.diagnostics import gpu_check

    spec = tmp_path / "sd35m.yaml"
    for damage, named in [("shared: {lr: 1\n", "YAML"), ("- a list\n", "mapping"),
                          (f'!!python/object/apply:os.mkdir ["{marker}"]\n', "builds an object")]:
        spec.write_text(damage)
        with pytest.raises(safe_files.FileError) as error:
            gpu_check.sd35m_spec(spec)
        assert str(spec) in str(error.value) and named in str(error.value), str(error.value)
