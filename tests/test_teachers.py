"""The toy teacher recipes: configs build for every task, the cold start on renders, shipping."""
import functools
import json

import pytest
import torch

from flowopd_lib import adapters, models, teachers
from guards import refused, snapshot, tree
from tiny import tiny_model


@pytest.mark.parametrize("task", sorted(teachers.RECIPES))
def test_every_recipe_builds_a_valid_config(task, tmp_path):
    cfg = teachers.recipe_config(task, str(tmp_path), {"updates": 3})
    assert cfg.adapter == task and cfg.updates == 3 and cfg.cfg_scale == teachers.PROTOCOL["cfg_scale"]
    with pytest.raises(SystemExit, match="recipes exist for"):
        teachers.recipe_config("nope", str(tmp_path))


def test_cold_start_on_renders_fits_a_lora_and_is_kept_once_done(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    directory = teachers.sft_on_renders("ocr", tmp_path / "sft", steps=3, batch=4, lr=1e-2)
    info = adapters.metadata(directory)
    assert info["sft_on_renders"]["steps"] == 3
    model = models.load_base("toy")
    adapters.load(model, directory, "ocr")
    x, embeds = torch.randn(2, *model.latent_shape), model.encode_prompts(['a sign that says "AB"', ""])
    with torch.no_grad():
        plain = adapters.view(model, None).velocity(x, torch.tensor(0.5), embeds)
        tuned = adapters.view(model, "ocr").velocity(x, torch.tensor(0.5), embeds)
    assert not torch.allclose(plain, tuned)
    stamp = (directory / adapters.WEIGHT_NAME).stat().st_mtime_ns
    assert teachers.sft_on_renders("ocr", tmp_path / "sft", steps=3, batch=4) == directory
    assert (directory / adapters.WEIGHT_NAME).stat().st_mtime_ns == stamp  # not retrained


def test_cold_start_options_targets_fresh_prompts_and_the_recipe_check(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    directory = teachers.sft_on_renders("ocr", tmp_path / "run" / "sft", steps=2, batch=4, lora_rank=4,
                                        lora_targets="attention+ff", fresh_prompts=True)
    info = adapters.metadata(directory)
    assert info["sft_on_renders"]["fresh_prompts"] and set(info["targets"]) == set(adapters.TARGET_SETS["attention+ff"])
    with pytest.raises(ValueError, match="lora_targets='mlp' is not a target set"):
        teachers.sft_on_renders("ocr", tmp_path / "other", steps=1, lora_targets="mlp")
    with pytest.raises(ValueError, match=r"unknown cold-start setting\(s\) \['stpes'\]"):
        teachers.cold_start_settings("ocr", {"stpes": 3})
    # a run whose cold start differs from the recipe's is named (check_run_follows_recipe refuses it)
    recipe = {**teachers.RECIPES["ocr"][1]["sft"], "steps": 2, "batch": 4, "lora_rank": 4,
              "lora_targets": "attention+ff", "fresh_prompts": True}
    monkeypatch.setitem(teachers.RECIPES, "ocr", (teachers.RECIPES["ocr"][0], {**teachers.RECIPES["ocr"][1], "sft": recipe}))
    assert teachers.cold_start_changes("ocr", tmp_path / "run") == []
    monkeypatch.setitem(teachers.RECIPES["ocr"][1], "sft", {**recipe, "lora_rank": 8})
    assert teachers.cold_start_changes("ocr", tmp_path / "run") == ["cold start lora_rank: run 4, recipe 8"]
    assert teachers.cold_start_changes("geneval", tmp_path / "run")[0].startswith("cold start batch: run 4, recipe None")


def test_ship_writes_the_protocol_and_command(tmp_path):
    run = teacher_run(tmp_path / "run", "ocr")
    target = teachers.ship("ocr", run, metrics={"ocr": 0.5}, destination=tmp_path / "assets")
    info = json.loads((target / "adapter.json").read_text())
    assert info["cold_start"]["sft_on_renders"] == teachers.cold_start_settings("ocr")
    assert info["protocol"] == teachers.PROTOCOL and info["trainer"] == teachers.RECIPES["ocr"][0]
    assert info["command"].startswith("python -m flowopd_lib.teachers train ocr") and info["metrics"] == {"ocr": 0.5}
    adapters.load(tiny_model(), target, "ocr")  # loads as a diffusers LoRA
    assert teachers.shipped(tmp_path / "assets") == {"ocr": target}


def test_measure_gives_each_metric_with_its_error_and_the_paired_change(tmp_path, monkeypatch):
    model = models.load_base("toy")
    adapters.add(model, "ocr", rank=2)
    directory = adapters.save(model, "ocr", tmp_path / "adapter")  # a zero LoRA: the base itself
    monkeypatch.setattr(teachers, "PROTOCOL", {"cfg_scale": 1.0, "steps": 2, "seed": 0})
    result = teachers.measure("ocr", directory, n_prompts=4, samples_per_prompt=2)
    for metric in ("geneval", "ocr", "pickscore", "pickscore_true", "deqa"):
        assert result["teacher"][metric] == pytest.approx(result["base"][metric], abs=1e-6)
        assert result["change"][metric]["low"] <= 0 <= result["change"][metric]["high"]
        assert f"{metric}_se" in result["base"]
    assert result["protocol"]["samples_per_prompt"] == 2
    teachers.ship("ocr", teacher_run(tmp_path / "run", "ocr"), result, destination=tmp_path / "assets")
    text = teachers.table(tmp_path / "assets")
    assert "### ocr teacher" in text and "| ocr |" in text and "[" in text


def test_ship_refuses_a_run_that_left_its_recipe(tmp_path):
    run = tmp_path / "run"
    model = models.load_base("toy")
    adapters.add(model, "ocr", rank=2)
    adapters.save(model, "ocr", run / "adapter", {"updates": teachers.RECIPES["ocr"][1]["updates"]})
    cfg = teachers.recipe_config("ocr", str(run), {"lr": 5e-4, "eval_every": 3})
    (run / "config.yaml").write_text(cfg.to_yaml())
    with pytest.raises(ValueError, match="lr: run 0.0005, recipe 0.001"):
        teachers.ship("ocr", run, destination=tmp_path / "assets")
    (run / "config.yaml").write_text(teachers.recipe_config("ocr", str(run), {"eval_every": 3}).to_yaml())
    with pytest.raises(ValueError, match="cold start steps: run None"):  # the recipe's cold start is missing
        teachers.ship("ocr", run, destination=tmp_path / "assets")
    adapters.save(model, "ocr", run / "sft" / "adapter", {"sft_on_renders": teachers.cold_start_settings("ocr")})
    assert teachers.ship("ocr", run, destination=tmp_path / "assets").exists()  # cadence may differ


@pytest.mark.parametrize("world, task", [(w, t) for w in sorted(teachers.WORLDS) for t in sorted(teachers.shipped(world_name=w))])
def test_shipped_teacher_re_measured_beats_the_base(world, task):
    """The recorded protocol on the teacher's own task, in its world: the teacher beats the base (paired
    95% interval above 0) and agrees with its recorded metric within three standard errors. (One sample
    per prompt is not enough: the OCR teacher's +0.07 then has an interval touching 0.)"""
    directory = teachers.shipped(world_name=world)[task]
    info = adapters.metadata(directory)
    assert info["protocol"] == teachers.PROTOCOL and (directory / "learning_curve.csv").exists()
    recorded = info["metrics"]
    now = teachers.measure(task, directory, samples_per_prompt=recorded["protocol"]["samples_per_prompt"],
                           tasks=(task,), n_prompts=recorded["protocol"]["n_prompts"],
                           conflict_setting=teachers.WORLDS[world].conflict)
    assert now["change"][task]["low"] > 0, now["change"][task]
    assert abs(now["teacher"][task] - recorded["teacher"][task]) <= 3 * now["teacher"][f"{task}_se"], (now, recorded)


def test_every_recipe_has_a_shipped_teacher():
    """The study (`make run`, toy_full.yaml) routes to the four shipped teachers: each recipe's
    teacher is shipped, with its recorded row and learning curve (re-measured by the test above)."""
    assert set(teachers.shipped()) == set(teachers.RECIPES)


def teacher_run(run, task: str = "geneval", updates: int | None = None):
    """A run directory as `teachers train <task>` leaves it: the recipe's config.yaml and the
    adapter of `updates` updates (default: the recipe's, a finished run); a tiny random LoRA."""
    cfg = teachers.recipe_config(task, str(run))
    model = tiny_model()
    adapters.add(model, task, rank=2)
    adapters.save(model, task, run / "adapter", {"config": cfg.to_dict(), "updates": updates or cfg.updates})
    if teachers.cold_start_settings(task):
        adapters.save(model, task, run / "sft" / "adapter", {"sft_on_renders": teachers.cold_start_settings(task)})
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


def shipped_teacher(assets, task: str = "geneval"):
    """A shipped teacher as `ship` leaves one: weights, metadata, learning curve."""
    (assets / task).mkdir(parents=True)
    for name, content in {"pytorch_lora_weights.safetensors": "old weights", "adapter.json": '{"task": "old"}',
                          "learning_curve.csv": "step,eval/geneval\n200,0.5\n"}.items():
        (assets / task / name).write_text(content)
    return assets / task


def test_ship_checks_the_run_before_measuring_or_replacing_anything(tmp_path, monkeypatch, capsys):
    """Issue 35 #2: ship deleted the shipped teacher, then copied a half-written run over it (the
    recipe check skipped for a run without config.yaml), and measured for minutes before checking.
    Now every check comes first; a refused ship measures nothing and changes no file; replacing a
    shipped teacher takes --force and keeps the old one as a dated backup."""
    assets, backups = tmp_path / "assets", tmp_path / "replaced"
    monkeypatch.setattr(teachers, "ASSETS", assets)
    monkeypatch.setattr(teachers, "REPLACED_TEACHERS", backups, raising=False)
    measured = []
    monkeypatch.setattr(teachers, "measure", lambda task, adapter_dir, **settings: measured.append(task) or {"geneval": 0.9})
    old = tree(shipped_teacher(assets))
    run = tmp_path / "run"
    model = tiny_model()
    adapters.add(model, "geneval", rank=2)
    adapters.save(model, "geneval", run / "adapter", {"updates": 1})  # half-written: no config.yaml
    before = snapshot(assets, run)
    assert "config.yaml" in refused(capsys, teachers.main, ["ship", "geneval", "--run", str(run)])
    assert snapshot(assets, run) == before
    teacher_run(run, updates=1)  # the recipe's config, but stopped after 1 of 200 updates
    before = snapshot(assets, run)
    assert "1 of 200 updates" in refused(capsys, teachers.main, ["ship", "geneval", "--run", str(run), "--force"])
    assert snapshot(assets, run) == before
    teacher_run(run)
    before = snapshot(assets, run)
    said = refused(capsys, teachers.main, ["ship", "geneval", "--run", str(run)])
    assert "already shipped" in said and "--force" in said
    assert snapshot(assets, run) == before and tree(assets / "geneval") == old and not measured
    teachers.main(["ship", "geneval", "--run", str(run), "--force"])
    assert measured == ["geneval"] and adapters.metadata(assets / "geneval")["metrics"] == {"geneval": 0.9}
    kept = list(backups.glob("geneval.previous-*"))
    assert len(kept) == 1 and tree(kept[0]) == old


def test_train_refuses_bad_settings_before_any_training(tmp_path, monkeypatch, capsys):
    """Issue 35 #8: `teachers train --eval-prompts 0` trained, then died in torch.cat with no adapter
    saved. Every setting is checked before the cold start or the first update."""
    started = []
    monkeypatch.setattr(teachers, "sft_on_renders",
                        functools.wraps(teachers.sft_on_renders)(lambda *args, **kwargs: started.append("sft")))
    real = teachers.trainer_for
    monkeypatch.setattr(teachers, "trainer_for", lambda name: (real(name)[0], lambda cfg, eval_fn: started.append(cfg)))
    out = tmp_path / "run"
    for bad in (["--eval-prompts", "0"], ["--eval-prompts", "-1"], ["-c", "lr=fast"], ["-c", "lr"]):
        said = refused(capsys, teachers.main, ["train", "ocr", "--out", str(out), *bad])
        assert bad[1].split("=")[0] in said, said
    assert not started and not out.exists()
