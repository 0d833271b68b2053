"""The papermill runner: stages in order, references between stages, skip/resume, clear failures."""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from flowopd_lib import dryrun, runs, worlds
from flowopd_lib.models.toy import ToyFlowModel
from flowopd_lib.trainer import OnPolicyConfig
from guards import refused, tree

TINY_TEACHER = dict(recipe=None, rewards={"geneval": 1.0}, datasets={"geneval": 1.0}, updates=1, time_budget_minutes=None,
                    prompts_per_update=2, group_size=2, sde_steps=2, eval_every=1, eval_prompts=4, eval_steps=2)


@pytest.fixture()
def spec(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.manual_seed(0)
    base = ToyFlowModel("tiny").save(tmp_path / "base")
    spec = {"name": "tiny_study", "shared": {"base": str(base), "seed": 0, "eval_steps": 2},
            "stages": [
                {"name": "teacher_geneval", "notebook": "notebooks/02_teacher_grpo.ipynb",
                 "parameters": {**TINY_TEACHER, "adapter": "geneval"}},
                {"name": "teacher_ocr", "notebook": "notebooks/02_teacher_grpo.ipynb",
                 "parameters": {**TINY_TEACHER, "adapter": "ocr", "rewards": {"ocr": 1.0}, "datasets": {"ocr": 1.0}}},
                {"name": "coldstart", "notebook": "notebooks/03_cold_start.ipynb",
                 "parameters": {"teachers": {"geneval": "{teacher_geneval}/adapter", "ocr": "{teacher_ocr}/adapter"},
                                "merge_methods": ["delta"], "sft": False, "eval_prompts": 4}},
            ]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_stages_run_in_order_consume_earlier_outputs_and_skip_when_done(spec, tmp_path, capsys):
    out = tmp_path / "outputs"
    run_dir = runs.run(spec, outputs=out)
    for stage in ("teacher_geneval", "teacher_ocr", "coldstart"):
        assert (run_dir / stage / ".done").exists()
    assert (run_dir / "coldstart" / "03_cold_start.ipynb").exists()
    assert (run_dir / "coldstart" / "merge_delta" / "pytorch_lora_weights.safetensors").exists()
    params = yaml.safe_load((run_dir / "coldstart" / "parameters.yaml").read_text())
    assert params["teachers"]["geneval"] == str(run_dir / "teacher_geneval" / "adapter")
    assert "seed" in params and "rewards" not in params  # shared parameters only where declared
    # one evaluation cache per run: base and teachers measured by their stages, reused by the cold start
    # (4 tasks each for base, 2 teachers and the merge)
    assert params["eval_cache"] == str(run_dir / "eval_cache")
    assert len(list((run_dir / "eval_cache").glob("*.json"))) == 4 * 4
    assert (run_dir / "spec.yaml").exists() and "git" in (run_dir / "provenance.json").read_text()
    assert (run_dir / "coldstart" / "shipped_assets.sha256").read_text().strip() == runs.shipped_assets_fingerprint()
    capsys.readouterr()
    runs.run(spec, outputs=out)
    assert capsys.readouterr().out.count("done, skipped") == 3

    data = yaml.safe_load(spec.read_text())  # an edited stage re-runs, with every stage that consumes it
    data["stages"][1]["parameters"]["sde_steps"] = 3
    spec.write_text(yaml.safe_dump(data))
    runs.run(spec, outputs=out)
    printed = capsys.readouterr().out
    assert "teacher_geneval: done, skipped" in printed
    assert printed.count("changed since it ran; re-running") == 2 and "coldstart: running" in printed
    assert yaml.safe_load((run_dir / "teacher_ocr" / "parameters.yaml").read_text())["sde_steps"] == 3
    [previous] = run_dir.glob("teacher_ocr.previous-*")  # set aside, dated, with its consumer
    assert yaml.safe_load((previous / "parameters.yaml").read_text())["sde_steps"] == 2
    [consumer] = run_dir.glob("coldstart.previous-*")
    assert (run_dir / "coldstart" / ".done").exists() and (consumer / ".done").exists()


def test_a_stage_that_ran_on_other_shipped_assets_counts_as_changed(tmp_path, monkeypatch):
    params = {"seed": 0, "out_dir": str(tmp_path)}
    assert not runs.inputs_changed(tmp_path, params, True)  # never ran
    (tmp_path / "parameters.yaml").write_text(yaml.safe_dump(params))
    assert runs.inputs_changed(tmp_path, params, True)  # ran before assets were recorded: unknown, so re-run
    assert not runs.inputs_changed(tmp_path, params, False)  # a stage off the toy base ignores them
    (tmp_path / "shipped_assets.sha256").write_text(runs.shipped_assets_fingerprint() + "\n")
    assert not runs.inputs_changed(tmp_path, params, True)
    assert runs.inputs_changed(tmp_path, {**params, "seed": 1}, True)
    assert runs.inputs_changed(tmp_path, {**params, "seed": 1}, False)
    monkeypatch.setattr(runs, "shipped_assets_fingerprint", lambda: "a retrained base")
    assert runs.inputs_changed(tmp_path, params, True)
    assert not runs.inputs_changed(tmp_path, params, False)
    # which stages are on a shipped base: the toy studies' stages (notebook 01 shows or continues one), not SD3.5-M
    teacher = {"notebook": "notebooks/02_teacher_grpo.ipynb"}
    assert runs.on_toy_base(teacher, {"base": "toy"}) and runs.on_toy_base(teacher, {})
    assert runs.on_toy_base(teacher, {"base": "toy_glyph"})
    assert not runs.on_toy_base(teacher, {"base": "sd3.5-medium"})
    assert runs.on_toy_base({"notebook": "notebooks/01_base_model.ipynb"}, {})  # its default: toy_glyph
    assert not runs.on_toy_base({"notebook": "notebooks/01_base_model.ipynb"}, {"base": "runs/my_base"})


@pytest.fixture()
def shipped(tmp_path, monkeypatch):
    """A stand-in assets folder (a base file, two shipped teachers) in place of flowopd_lib/assets."""
    import flowopd_lib.models

    assets = tmp_path / "assets"
    (assets / "base_toy").mkdir(parents=True)
    (assets / "base_toy" / "model.safetensors").write_bytes(b"base")
    for task in ("geneval", "ocr"):
        (assets / "teachers" / task).mkdir(parents=True)
        (assets / "teachers" / task / "adapter.json").write_text("{}")
        (assets / "teachers" / task / "pytorch_lora_weights.safetensors").write_bytes(task.encode())
    monkeypatch.setattr(flowopd_lib.models, "ASSETS", assets)
    monkeypatch.setattr(runs, "PLACEHOLDERS", {"teachers": assets / "teachers", "teachers_dial": assets / "teachers_dial"})
    return assets


def test_teachers_placeholder_names_the_shipped_teachers_without_a_stage(tmp_path):
    from flowopd_lib import teachers

    assert teachers.ASSETS == runs.PLACEHOLDERS["teachers"]
    assert teachers.assets_of("dial") == runs.PLACEHOLDERS["teachers_dial"]
    spec = {"name": "s", "shared": {}, "stages": [
        {"name": "coldstart", "notebook": "notebooks/03_cold_start.ipynb",
         "parameters": {"teachers": {"geneval": "{teachers}/geneval", "ocr": "{teachers}/ocr"}}},
        {"name": "opd", "notebook": "notebooks/04_flow_opd.ipynb",
         "parameters": {"teachers": {"geneval": "{teachers}/geneval"}, "init_adapter": "{coldstart}/merge_delta",
                        "anchor": "{teachers}/deqa"}}]}
    plan = {stage["name"]: params for stage, _, params in runs.plan_stages(spec, tmp_path, {})}
    assert plan["coldstart"]["teachers"] == {"geneval": str(teachers.ASSETS / "geneval"),
                                             "ocr": str(teachers.ASSETS / "ocr")}
    assert plan["opd"]["anchor"] == str(teachers.ASSETS / "deqa")
    assert plan["opd"]["init_adapter"] == str(tmp_path / "coldstart" / "merge_delta")
    assert runs.dependencies(spec["stages"][1]) == {"coldstart"}  # {teachers} is no stage to wait for
    assert set(runs.shipped_teachers_used(plan["opd"])) == {"geneval", "deqa"}
    assert set(runs.shipped_teachers_used({"teachers": "flowopd_lib/assets/teachers/ocr/"})) == {"ocr"}  # relative
    assert not runs.shipped_teachers_used({"init_adapter": str(tmp_path / "coldstart"), "routing": "hard"})
    path = tmp_path / "spec.yaml"  # a stage may not take the placeholder's name
    path.write_text(yaml.safe_dump({**spec, "stages": [{**spec["stages"][0], "name": "teachers"}]}))
    with pytest.raises(runs.RunError, match=r"\['teachers'\] are taken"):
        runs.load_spec(path)


@pytest.mark.parametrize("path", sorted([*runs.ROOT.glob("papermill_runs/toy_*.yaml"),
                                         *runs.ROOT.glob("papermill_runs/dial_*.yaml")]), ids=lambda p: p.name)
def test_toy_specs_name_shipped_teachers_that_have_recipes(path, tmp_path):
    """Each `{teachers}/<task>` (`{teachers_dial}/<task>`) of a toy spec is a teacher `python -m
    flowopd_lib.teachers train <task> [--world dial]` makes, used on its world's base."""
    from flowopd_lib import teachers

    used = set()
    for stage, _, params in runs.plan_stages(runs.load_spec(path), tmp_path, {}):
        used |= set(runs.shipped_teachers_used(params))
        runs.check_teachers_base(stage, params)
    assert used and {name.split("/")[-1] for name in used} <= set(teachers.RECIPES)
    assert len({runs.world_of(name) for name in used}) == 1  # one world's teachers per study


def stage_config(notebook: str, params: dict):
    """The trainer config a training notebook builds from the runner's parameters: its code cells up
    to the one tagged `config` (nothing is loaded or trained), as tests/test_notebooks.py does."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(load_notebook_node(str(runs.ROOT / notebook)), params)
    namespace: dict = {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            exec(cell.source, namespace)
            if "config" in cell.metadata.get("tags", []):
                return namespace["cfg"]
    raise AssertionError(f"{notebook} has no cell tagged 'config'")


STUDY_NFT_STAGES = {
    "toy_full.yaml": {"mix_nft", "mix_nft_alternate", "coldstart_mix", "seesaw_ocr", "seesaw_pickscore", "seesaw_deqa"},
    "dial_full.yaml": {"mix_nft", "mix_nft_teacher_budget", "coldstart_mix", "seesaw_ocr", "seesaw_pickscore",
                       "seesaw_deqa"}}


@pytest.mark.parametrize("spec_name", sorted(STUDY_NFT_STAGES))
def test_toy_full_mix_and_seesaw_train_with_the_teachers_trainer_and_settings(spec_name, tmp_path):
    """The NFT Mix, cold start + Mix and seesaw stages train as the shipped teachers were trained
    (teachers.RECIPES), on the teachers' protocol (CFG 1); only what makes them a Mix or a seesaw step
    (rewards, prompts, budget, start) differs; Flow-GRPO-Mix and Flow-OPD run at CFG 1 too."""
    from flowopd_lib import teachers

    world = "dial" if spec_name.startswith("dial") else "toy"  # the study's teachers' world
    recipe = yaml.safe_load(teachers.recipe_config("geneval", "x", world_name=world).to_yaml())
    from flowopd_lib.distributed_eval import EvalConfig

    own = {"adapter", "out_dir", "init_adapter", "rewards", "datasets", "dataset_mode", "reward_routing", "updates",
           "eval_every", "checkpoint_every",
           *(f.name for f in dataclasses.fields(EvalConfig))}  # how it is evaluated: checked below
    plan = runs.plan_stages(runs.load_spec(runs.ROOT / "papermill_runs" / spec_name), tmp_path, {})
    nft = [(stage, params) for stage, _, params in plan if params.get("trainer") == "nft"]
    assert {stage["name"] for stage, _ in nft} == STUDY_NFT_STAGES[spec_name]
    for stage, params in nft:
        cfg = yaml.safe_load(stage_config(stage["notebook"], params).to_yaml())
        differ = {k: (cfg[k], v) for k, v in recipe.items() if k not in own and cfg[k] != v}
        assert not differ, f"{stage['name']} trains unlike the teachers: (stage, recipe) {differ}"
    for stage, _, params in plan:
        assert params.get("eval_cfg", 1.0) == 1.0 and params.get("cfg_scale", 1.0) == 1.0, stage["name"]
        if stage["notebook"] in TRAINING_NOTEBOOKS:
            assert stage_config(stage["notebook"], params).cfg_scale == 1.0
            assert params.get("time_budget_minutes") is None, f"{stage['name']}: budget it in updates"


def test_shipped_teachers_are_inputs_of_the_stages_that_name_them(shipped, tmp_path, monkeypatch, capsys):
    """Re-shipping a teacher re-runs the stages that name it and their consumers, and no other
    stage; the base's fingerprint leaves the teachers out (shipping one re-runs nothing else)."""
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: None)  # the runner's decisions only
    spec = {"name": "s", "shared": {}, "stages": [
        {"name": "opd_geneval", "notebook": "notebooks/04_flow_opd.ipynb",
         "parameters": {"teachers": {"geneval": "{teachers}/geneval"}}},
        {"name": "summary", "notebook": "notebooks/05_ablations.ipynb",
         "parameters": {"main": {"student": "{opd_geneval}/adapter"}}},
        {"name": "opd_ocr", "notebook": "notebooks/04_flow_opd.ipynb",
         "parameters": {"teachers": {"ocr": "{teachers}/ocr"}}}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "outputs"
    run_dir = runs.run(path, outputs=out)
    record = (run_dir / "opd_geneval" / "shipped_assets.sha256").read_text().splitlines()
    assert record[0] == runs.shipped_assets_fingerprint() and record[1].startswith("teacher geneval ")
    assert len(record) == 2 and (run_dir / "summary" / "shipped_assets.sha256").read_text().count("\n") == 1
    before = runs.shipped_assets_fingerprint()
    (shipped / "teachers" / "geneval" / "pytorch_lora_weights.safetensors").write_bytes(b"re-shipped")
    assert runs.shipped_assets_fingerprint() == before  # the teachers are not part of every stage's inputs
    (shipped / "measured").mkdir()
    (shipped / "measured" / "eval_power.csv").write_text("a,b\n1,2\n")  # a diagnostic's record: no input either
    assert runs.shipped_assets_fingerprint() == before
    (shipped / "base_toy" / "model.safetensors").write_bytes(b"retrained")  # the base is
    assert runs.shipped_assets_fingerprint() != before
    (shipped / "base_toy" / "model.safetensors").write_bytes(b"base")
    params = yaml.safe_load((run_dir / "opd_ocr" / "parameters.yaml").read_text())
    assert not runs.inputs_changed(run_dir / "opd_ocr", params, True)
    assert runs.inputs_changed(run_dir / "opd_geneval", yaml.safe_load(
        (run_dir / "opd_geneval" / "parameters.yaml").read_text()), False)  # whatever the base
    capsys.readouterr()
    runs.run(path, outputs=out)
    printed = capsys.readouterr().out
    assert "opd_ocr: done, skipped" in printed
    assert printed.count("changed since it ran; re-running") == 2  # opd_geneval and its consumer
    assert list(run_dir.glob("opd_geneval.previous-*")) and list(run_dir.glob("summary.previous-*"))
    runs.run(path, outputs=out)
    assert capsys.readouterr().out.count("done, skipped") == 3
    # a teacher not shipped yet stops the run before any stage starts, saying how to make it
    spec["stages"][2]["parameters"]["teachers"] = {"pickscore": "{teachers}/pickscore"}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(runs.RunError, match=r"opd_ocr.*\['pickscore'\], not shipped yet.*"
                                            r"flowopd_lib.teachers train pickscore"):
        runs.run(path, outputs=out)
    assert not list(run_dir.glob("opd_ocr.previous-*"))
    runs.run(path, outputs=out, only=["summary"])  # unless the stages that name it are not selected


def test_a_worlds_teachers_are_named_by_its_placeholder_and_need_its_base(shipped, tmp_path, monkeypatch, capsys):
    """`{teachers_dial}/<task>` is the dial world's teacher: an input of the stages naming it (not of
    every stage), refused on another world's base, and a missing one says how to make it in its world."""
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: None)
    (shipped / "teachers_dial" / "geneval").mkdir(parents=True)
    (shipped / "teachers_dial" / "geneval" / "adapter.json").write_text("{}")
    stage = {"name": "opd", "notebook": "notebooks/04_flow_opd.ipynb",
             "parameters": {"teachers": {"geneval": "{teachers_dial}/geneval"}}}
    path, out = tmp_path / "spec.yaml", tmp_path / "outputs"
    path.write_text(yaml.safe_dump({"name": "s", "shared": {"base": "toy"}, "stages": [stage]}))
    with pytest.raises(runs.RunError, match=r"'opd' uses the dial world's teachers \({teachers_dial}\) on the base "
                                            r"'toy'; they adapt 'toy_glyph': set base: toy_glyph"):
        runs.run(path, outputs=out)
    assert not out.exists()
    path.write_text(yaml.safe_dump({"name": "s", "shared": {"base": "toy_glyph", "conflict": 0.5}, "stages": [stage]}))
    run_dir = runs.run(path, outputs=out)
    record = (run_dir / "opd" / "shipped_assets.sha256").read_text().splitlines()
    assert record[1].startswith("teacher teachers_dial/geneval ")
    before = runs.shipped_assets_fingerprint()
    (shipped / "teachers_dial" / "geneval" / "adapter.json").write_text('{"re": "shipped"}')
    assert runs.shipped_assets_fingerprint() == before  # a world's teachers are no input of every stage
    mixed = {**stage, "parameters": {"teachers": {"geneval": "{teachers_dial}/geneval", "ocr": "{teachers}/ocr"}}}
    path.write_text(yaml.safe_dump({"name": "s", "shared": {"base": "toy_glyph"}, "stages": [mixed]}))
    with pytest.raises(runs.RunError, match=r"teachers of several worlds \['dial', 'toy'\]"):
        runs.run(path, outputs=out)
    missing = {**stage, "parameters": {"teachers": {"ocr": "{teachers_dial}/ocr"}}}
    path.write_text(yaml.safe_dump({"name": "s", "shared": {"base": "toy_glyph"}, "stages": [missing]}))
    with pytest.raises(runs.RunError, match=r"\['teachers_dial/ocr'\], not shipped yet.*teachers train ocr --world dial"):
        runs.run(path, outputs=out)


def test_a_failing_stage_names_notebook_cell_and_error(spec, tmp_path):
    data = yaml.safe_load(spec.read_text())
    data["stages"][0]["parameters"]["rewards"] = {"no_such_reward": 1.0}
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(runs.RunError, match=r"teacher_geneval.*02_teacher_grpo.ipynb, cell \d+: ConfigError.*no_such_reward"):
        runs.run(spec, outputs=tmp_path / "outputs", only=["teacher_geneval"])


def test_spec_errors_are_caught_before_running(spec, tmp_path):
    data = yaml.safe_load(spec.read_text())
    data["stages"][2]["parameters"]["teachers"] = {"geneval": "{teacher_nope}/adapter"}
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(runs.RunError, match="teacher_nope"):
        runs.run(spec, outputs=tmp_path / "outputs")
    data["stages"][2]["name"] = "cold-start"  # a name that no {reference} could match
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(runs.RunError, match="'cold_start'"):
        runs.run(spec, outputs=tmp_path / "outputs")
    with pytest.raises(runs.RunError, match="key=value"):
        runs.parse_override("updates")
    assert runs.parse_override("updates=5") == ("updates", 5)


@pytest.mark.parametrize("path", sorted(runs.ROOT.glob("papermill_runs/*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_plan_without_errors(path, tmp_path):
    """Every stage of the shipped specs names parameters its notebook declares and refers only to
    earlier stages (what `run` checks before executing anything)."""
    runs.plan_stages(runs.load_spec(path), tmp_path, {})  # raises RunError naming the stage and the fault
    if path.name == "sd35m.yaml":  # the spec `make dryrun` runs: its -p keys are declared
        runs.plan_stages(runs.load_spec(path), tmp_path, dryrun.TINY_BUDGET)


TRAINING_NOTEBOOKS = {"notebooks/02_teacher_grpo.ipynb", "notebooks/04_flow_opd.ipynb"}


@pytest.mark.parametrize("path", sorted(runs.ROOT.glob("papermill_runs/*.yaml")), ids=lambda p: p.name)
def test_shared_trainer_settings_reach_every_training_stage(path):
    """A shared setting that every trainer has (an OnPolicyConfig field) reaches every stage that
    trains: the runner hands a stage only what its notebook declares, so a training notebook that
    did not declare it would silently train at the default (sd35m's LoRA rank once stopped at the
    teachers and never reached Flow-OPD)."""
    spec = runs.load_spec(path)
    common = set(spec["shared"]) & {f.name for f in dataclasses.fields(OnPolicyConfig)}
    for stage in spec["stages"]:
        if stage["notebook"] in TRAINING_NOTEBOOKS:
            missing = common - runs.notebook_parameters(runs.ROOT / stage["notebook"])
            assert not missing, f"{stage['name']}: {stage['notebook']} does not declare shared {sorted(missing)}"


def test_unknown_shared_and_override_keys_name_the_closest_declared_one(tmp_path, capsys):
    """A key no stage's notebook declares would reach no stage: a misspelt budget would run in full."""
    spec = runs.load_spec(runs.ROOT / "papermill_runs/toy_quick.yaml")
    with pytest.raises(runs.RunError, match=r"^-p: no stage's notebook declares 'time_budget_minuts' "
                                            r"\(did you mean 'time_budget_minutes'\?\)"):
        runs.plan_stages(spec, tmp_path, {"time_budget_minuts": 1})
    with pytest.raises(runs.RunError, match=r"^toy_quick: shared: .*'eval_promts' \(did you mean 'eval_prompts'\?\)"):
        runs.plan_stages({**spec, "shared": {**spec["shared"], "eval_promts": 4}}, tmp_path, {})
    with pytest.raises(runs.RunError, match="out_dir is set by the runner.*--outputs"):
        runs.plan_stages(spec, tmp_path, {"out_dir": "elsewhere"})
    opd = next(stage for stage in spec["stages"] if stage["name"] == "opd_merge")
    stage = {**opd, "parameters": {**opd["parameters"], "mar_lamda": 0.1}}
    with pytest.raises(runs.RunError, match=r"opd_merge.*no parameter\(s\) 'mar_lamda' \(did you mean 'mar_lambda'\?\)"):
        runs.plan_stages({**spec, "stages": [stage]}, tmp_path, {})
    # a key that only some stages declare is valid: it goes to those stages alone
    plan = {stage["name"]: params for stage, _, params in runs.plan_stages(spec, tmp_path, {"sft_steps": 3})}
    assert plan["coldstart"]["sft_steps"] == 3 and "sft_steps" not in plan["opd_merge"]
    said = refused(capsys, runs.main, [str(runs.ROOT / "papermill_runs/toy_quick.yaml"), "-p",  # before running
                                       "time_budget_minuts=0.1", "--outputs", str(tmp_path / "outputs")])
    assert "time_budget_minutes" in said
    assert not (tmp_path / "outputs").exists()


def test_notebook_parameters_are_what_papermill_reads():
    assert {"extra", "time_budget_minutes", "rewards", "out_dir"} <= runs.notebook_parameters(
        runs.ROOT / "notebooks/02_teacher_grpo.ipynb")


def test_extra_merges_key_by_key_while_other_mappings_are_replaced(tmp_path):
    """sd35m.yaml shares extra: {rollout_chunks: 12, micro_batch: 4, ema_decay: 0.975}; a stage or -p adding one
    setting keeps the others, while a stage's task_rewards (one choice) replaces the shared one."""
    spec = runs.load_spec(runs.ROOT / "papermill_runs/sd35m.yaml")
    shared = {"rollout_chunks": 12, "micro_batch": 4, "ema_decay": 0.975}
    teacher = spec["stages"][0]
    teacher["parameters"] = {**teacher["parameters"], "extra": {"gradient_checkpointing": True},
                             "task_rewards": {"geneval": "geneval"}}
    plan = {stage["name"]: params for stage, _, params in runs.plan_stages(spec, tmp_path, {})}
    assert plan["teacher_geneval"]["extra"] == {**shared, "gradient_checkpointing": True}
    assert plan["teacher_geneval"]["task_rewards"] == {"geneval": "geneval"}
    assert plan["teacher_ocr"]["extra"] == shared
    overrides = dict([runs.parse_override("extra={micro_batch: 2}")])
    plan = {stage["name"]: params for stage, _, params in runs.plan_stages(spec, tmp_path, overrides)}
    assert plan["teacher_geneval"]["extra"] == {**shared, "micro_batch": 2, "gradient_checkpointing": True}
    assert plan["opd_merge"]["extra"] == {**shared, "micro_batch": 2}
    assert spec["shared"]["extra"] == shared  # the spec itself is left as it was


def test_parallel_jobs_start_a_stage_only_after_the_stages_it_consumes(spec, tmp_path):
    run_dir = runs.run(spec, outputs=tmp_path / "outputs", jobs=2)
    assert "--only" not in (run_dir / "provenance.json").read_text()  # the run's own command, not a child's
    stamp = lambda stage, name: (run_dir / stage / name).stat().st_mtime  # noqa: E731
    for stage in ("teacher_geneval", "teacher_ocr", "coldstart"):
        assert (run_dir / stage / ".done").exists()
    # parameters.yaml is written when a stage starts, .done when it ends
    assert stamp("coldstart", "parameters.yaml") >= max(stamp("teacher_geneval", ".done"), stamp("teacher_ocr", ".done"))
    assert stamp("teacher_ocr", "parameters.yaml") < stamp("teacher_geneval", ".done")  # the teachers overlapped
    assert runs.dependencies(yaml.safe_load(spec.read_text())["stages"][2]) == {"teacher_geneval", "teacher_ocr"}


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failure_skips_only_its_consumers(spec, tmp_path, jobs):
    """The failing stage's consumers do not start (nor theirs); every other stage runs, also one
    waiting for a free slot when the failure happened (jobs=2: the third stage)."""
    data = yaml.safe_load(spec.read_text())
    data["stages"][0]["parameters"]["rewards"] = {"no_such_reward": 1.0}
    coldstart = data["stages"].pop()
    summary = {"name": "summary", "notebook": "notebooks/03_cold_start.ipynb",
               "parameters": {"teachers": {"g": "{coldstart}/merge_delta"}, "merge_methods": ["delta"], "sft": False}}
    ocr_again = {**data["stages"][1], "name": "teacher_ocr_again"}
    data["stages"] += [coldstart, ocr_again, summary]
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(runs.RunError, match=r"\['teacher_geneval'\] failed.*not started, as they consume it: "
                                            r"\['coldstart', 'summary'\]"):
        runs.run(spec, outputs=tmp_path / "outputs", jobs=jobs)
    run_dir = tmp_path / "outputs" / "tiny_study"
    assert (run_dir / "teacher_ocr" / ".done").exists() and (run_dir / "teacher_ocr_again" / ".done").exists()
    assert not (run_dir / "coldstart").exists() and not (run_dir / "summary").exists()


def gpu_spec(tmp_path, accelerate_config: str | None, num_processes: int = 8):
    """Two independent teacher stages and their consumer, each `num_processes` processes under
    `accelerate_config` (None: the notebooks' default, one process in the kernel)."""
    shared = {"num_processes": num_processes, "accelerate_config": accelerate_config}
    spec = {"name": "gpus", "shared": {k: v for k, v in shared.items() if v is not None}, "stages": [
        {"name": "teacher_geneval", "notebook": "notebooks/02_teacher_grpo.ipynb", "parameters": {"adapter": "geneval"}},
        {"name": "teacher_ocr", "notebook": "notebooks/02_teacher_grpo.ipynb", "parameters": {"adapter": "ocr"}},
        {"name": "opd", "notebook": "notebooks/04_flow_opd.ipynb",
         "parameters": {"teachers": {"geneval": "{teacher_geneval}/adapter", "ocr": "{teacher_ocr}/adapter"}}}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("num_processes", [8, 2])
def test_parallel_jobs_refuse_stages_that_train_as_accelerate_jobs_on_gpus(tmp_path, monkeypatch, capsys,
                                                                          num_processes):
    """`--jobs N` runs stages side by side; two 8-GPU stages would then start on the same GPUs and the
    same rendezvous port. The runner refuses, in one line and with exit status 2, before any stage
    (or the run's provenance) is written; `--jobs 1` runs them."""
    import papermill

    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: started.append(kwargs["parameters"]))
    monkeypatch.setattr(runs, "run_parallel", lambda spec_path, spec, todo, *args: started.extend(todo))
    path = gpu_spec(tmp_path, "papermill_runs/accelerate/multi_gpu.yaml", num_processes)
    out = tmp_path / "outputs"
    with pytest.raises(SystemExit) as stopped:
        runs.main([str(path), "--jobs", "2", "--outputs", str(out)])
    assert stopped.value.code == 2
    said = capsys.readouterr().err.strip()
    assert len(said.splitlines()) == 1 and said.startswith("error: --jobs 2")
    assert f"teacher_geneval: num_processes={num_processes}" in said and "--jobs 1" in said
    assert not started and not out.exists()
    runs.run(path, outputs=out, jobs=1)  # one at a time: every stage gets all the GPUs
    assert [p["out_dir"] for p in started] == [str(out / "gpus" / s) for s in ("teacher_geneval", "teacher_ocr", "opd")]


@pytest.mark.parametrize("config,num_processes", [("cpu", 2), ("papermill_runs/accelerate/multi_gpu.yaml", 1),
                                                  (None, 1)])
def test_parallel_jobs_run_cpu_ranks_and_in_kernel_stages(tmp_path, monkeypatch, config, num_processes):
    """CPU ranks (a MULTI_CPU config: torch.distributed.run --standalone picks a free port) and
    stages of one process (the notebook trains in its kernel, whatever the accelerate config) may
    run side by side: --jobs goes ahead."""
    if config == "cpu":
        config = dryrun.accelerate_config(tmp_path, num_processes)
    parallel = []
    monkeypatch.setattr(runs, "run_parallel", lambda spec_path, spec, todo, *args: parallel.append(len(todo)))
    runs.run(gpu_spec(tmp_path, config, num_processes), outputs=tmp_path / "outputs", jobs=2)
    assert parallel == [3]


@pytest.mark.parametrize("path", sorted(runs.ROOT.glob("papermill_runs/*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_say_whether_they_may_run_with_jobs(path, tmp_path, monkeypatch):
    """The toy specs (`--jobs 2` in their headers) run stages in one process each, or over CPU ranks
    as `num_processes: auto`, also on a machine with a GPU (a count there would be an accelerate job
    over GPUs it may not have, and --jobs would refuse the study); sd35m's training stages (and any
    other stage whose notebook takes num_processes) are 8-GPU jobs, which --jobs > 1 refuses; under
    the dry run's CPU config none is."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    spec = runs.load_spec(path)
    plan = runs.plan_stages(spec, tmp_path, {})
    on_gpus = runs.gpu_launch_stages(plan)
    if path.name == "sd35m.yaml":
        trained = {stage["name"] for stage, _, _ in plan if stage["notebook"] in TRAINING_NOTEBOOKS}
        assert trained <= set(on_gpus) and set(on_gpus.values()) == {8}
        assert set(on_gpus) == {stage["name"] for stage, _, params in plan if params.get("num_processes", 1) > 1}
        cpu = {"num_processes": 2, "accelerate_config": dryrun.accelerate_config(tmp_path, 2)}
        assert not runs.gpu_launch_stages(runs.plan_stages(spec, tmp_path, cpu))
    else:
        assert not on_gpus


ACCELERATE_CONFIGS = runs.ROOT / "papermill_runs" / "accelerate"


def test_shipped_accelerate_configs_are_those_the_trainers_support():
    """The trainers run plain DDP (no accelerator.prepare, no autocast): a DeepSpeed or FSDP config
    would launch but shard nothing, and a mixed_precision would cast nothing (the dtype policy is
    flowopd_lib/precision.py). So each config shipped is MULTI_GPU or MULTI_CPU, says
    mixed_precision 'no', and accelerate itself reads it."""
    from accelerate.commands.config.config_args import ClusterConfig

    shipped = sorted(ACCELERATE_CONFIGS.iterdir())
    assert shipped
    for path in shipped:
        assert path.suffix == ".yaml", f"{path.name}: accelerate configs are YAML"
        values = yaml.safe_load(path.read_text())
        assert values["distributed_type"] in {"MULTI_GPU", "MULTI_CPU"}, \
            f"{path.name}: distributed_type {values['distributed_type']} is not one the trainers implement"
        assert values["mixed_precision"] == "no", f"{path.name}: nothing applies mixed_precision (precision.py)"
        config = ClusterConfig.from_yaml_file(path)
        assert config.distributed_type == values["distributed_type"] and config.mixed_precision == "no"


def test_every_accelerate_config_named_in_the_repository_exists():
    """No document, spec or script names an accelerate config that is not shipped (a removed
    DeepSpeed / FSDP config must not linger in a command someone copies)."""
    pattern = re.compile(r"papermill_runs/accelerate/([A-Za-z0-9_.\-]+\.ya?ml)")
    skip = {".git", ".venv", "outputs", "flowopd_lib.egg-info", "__pycache__", ".pytest_cache"}
    named = {}
    for folder, subfolders, files in os.walk(runs.ROOT):
        subfolders[:] = [d for d in subfolders if d not in skip]
        for path in (Path(folder) / f for f in files):
            if path.suffix in {".py", ".md", ".yaml", ".yml", ".ipynb", ".sbatch", ".toml", ".sh"} or path.name == "Makefile":
                for name in pattern.findall(path.read_text(errors="ignore")):
                    named.setdefault(name, []).append(str(path.relative_to(runs.ROOT)))
    assert "multi_gpu.yaml" in named
    missing = {name: where for name, where in named.items() if not (ACCELERATE_CONFIGS / name).exists()}
    assert not missing, f"named but not shipped: {missing}"


def sd35m_configs(tmp_path, overrides: dict | None = None) -> dict:
    """Stage name -> the trainer config each training stage of sd35m.yaml builds (nothing loaded)."""
    plan = runs.plan_stages(runs.load_spec(runs.ROOT / "papermill_runs/sd35m.yaml"), tmp_path, overrides or {})
    return {stage["name"]: yaml.safe_load(stage_config(stage["notebook"], params).to_yaml())
            for stage, _, params in plan if stage["notebook"] in TRAINING_NOTEBOOKS}


def differences(a: dict, b: dict, ignored=("adapter", "out_dir", "init_adapter")) -> dict:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignored and a.get(k) != b.get(k)}


@pytest.mark.parametrize("trainer", ["grpo", "nft"])
def test_sd35m_baselines_train_as_the_paper_and_released_code_do(tmp_path, trainer):
    """sd35m.yaml's comparison: GRPO-Mix is the released code's (3 : 1 : 1 tasks in turn, each judged
    by its own reward, lr 1e-4, KL 0.04) and cold start + Mix the same run from the merge; Flow-OPD
    without MAR differs from Flow-OPD in MAR alone; each seesaw stage is its reward's teacher recipe
    started from the stage before; every stage keeps the paper's G, T, LoRA and the chosen EMA.
    With -p trainer=nft the notebook-02 stages become NFT runs with the NFT teachers' settings."""
    cfgs = sd35m_configs(tmp_path, {"trainer": trainer} if trainer != "grpo" else {})
    run_dir = tmp_path  # plan_stages(spec, run_dir): the stages' folders are in it
    mix = cfgs["grpo_mix"]
    assert mix["datasets"] == {"geneval": 3, "ocr": 1, "pickscore": 1} and mix["dataset_mode"] == "alternate"
    assert mix["reward_routing"] == "task" and mix["init_adapter"] is None
    assert mix["rewards"] == {"geneval_server": 1.0, "rapidocr": 1.0, "pickscore_v1": 1.0}
    assert (mix["lr"], mix["beta"]) == ((1e-4, 0.04) if trainer == "grpo" else (3e-4, 1e-4))
    assert differences(cfgs["coldstart_mix"], mix) == {}
    assert cfgs["coldstart_mix"]["init_adapter"] == str(run_dir / "coldstart" / "merge_delta")
    assert differences(cfgs["opd_no_mar"], cfgs["opd_merge"], ("out_dir", "mar_lambda", "anchor")) == {}
    assert cfgs["opd_no_mar"]["mar_lambda"] == 0 and cfgs["opd_merge"]["mar_lambda"] == 0.02
    assert cfgs["opd_merge"]["anchor"] == str(run_dir / "teacher_deqa" / "adapter")
    assert cfgs["opd_merge"]["init_adapter"] == str(run_dir / "coldstart" / "merge_delta")
    previous = "teacher_geneval"
    for reward in ("ocr", "pickscore", "deqa"):
        step = cfgs[f"seesaw_{reward}"]
        assert differences(step, cfgs[f"teacher_{reward}"]) == {}, reward
        assert step["init_adapter"] == str(run_dir / previous / "adapter")
        previous = f"seesaw_{reward}"
    for name, cfg in cfgs.items():
        assert (cfg["group_size"], cfg["sde_steps"], cfg["prompts_per_update"]) == (24, 10, 48), name
        assert (cfg["ema_decay"], cfg["updates"], cfg["cfg_scale"]) == (0.975, 1000, 4.5), name
        assert (cfg["lora_rank"], cfg["lora_alpha"]) == (32, 64.0), name


def test_sd35m_summary_tabulates_every_model_the_run_trains(tmp_path):
    """Every adapter a training stage of sd35m.yaml saves, and the merge, is a row of the summary's
    tables, and the claims' roles name rows of them."""
    spec = runs.load_spec(runs.ROOT / "papermill_runs/sd35m.yaml")
    plan = {stage["name"]: (stage, out_dir, params) for stage, out_dir, params in runs.plan_stages(spec, tmp_path, {})}
    summary = plan[spec["summary"]][2]
    tabulated = {d for table in ("main", "seesaw", "mar") for d in summary[table].values()}
    trained = {str(out_dir / "adapter") for stage, out_dir, _ in plan.values() if stage["notebook"] in TRAINING_NOTEBOOKS}
    assert trained | {str(tmp_path / "coldstart" / "merge_delta")} <= tabulated
    assert None in summary["main"].values()  # the base
    from flowopd_lib import claims

    rows = {label for table in ("main", "seesaw", "mar") for label in summary[table]}
    claims.check_roles(summary["claims"])
    assert set(claims.role_labels(summary["claims"])) <= rows


def fake_stages(monkeypatch) -> list[dict]:
    """papermill replaced by a stand-in that 'trains' in no time: it writes adapter.txt, or fails like a
    notebook cell when a stage's lr is not a number. Returns the parameters of every stage it ran."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    executed = []

    def execute(notebook, output, parameters, **kwargs):
        executed.append(parameters)
        if not isinstance(parameters.get("lr", 0.0), float):
            raise PapermillExecutionError(3, 3, "train(cfg)", "ConfigError", f"lr={parameters['lr']!r} is not a float", [])
        (Path(parameters["out_dir"]) / "adapter.txt").write_text(f"trained with {parameters}")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    return executed


def test_a_failed_retry_keeps_the_finished_stage_and_its_parameters_bring_it_back(tmp_path, monkeypatch, capsys):
    """Issue 35 #5: the runner kept one `<stage>.previous`: a finished stage re-run with a typo (failing
    in seconds), then with its original parameters, had been deleted and was retrained from scratch.
    Every set-aside folder is now a dated backup, and a stage whose finished backup ran with exactly
    today's parameters and inputs is restored, with the consumers set aside beside it, not re-run."""
    executed = fake_stages(monkeypatch)
    spec = {"name": "s", "shared": {}, "stages": [
        {"name": "teacher", "notebook": "notebooks/02_teacher_grpo.ipynb", "parameters": {"lr": 0.001}},
        {"name": "summary", "notebook": "notebooks/05_ablations.ipynb",
         "parameters": {"main": {"teacher": "{teacher}/adapter"}}}]}
    path, out = tmp_path / "spec.yaml", tmp_path / "outputs"
    path.write_text(yaml.safe_dump(spec))
    run_dir = runs.run(path, outputs=out)
    finished = {stage: tree(run_dir / stage) for stage in ("teacher", "summary")}
    spec["stages"][0]["parameters"]["lr"] = "0.0o1"  # the typo: fails in its first cell
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(runs.RunError, match="stage\\(s\\) \\['teacher'\\] failed"):
        runs.run(path, outputs=out)
    assert len(executed) == 3 and not (run_dir / "summary").exists()
    spec["stages"][0]["parameters"]["lr"] = 0.001
    path.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    runs.run(path, outputs=out)
    assert len(executed) == 3, "a stage was re-run instead of restored"
    assert "teacher: restored" in capsys.readouterr().out
    assert {stage: tree(run_dir / stage) for stage in ("teacher", "summary")} == finished
    failed = [p for p in run_dir.glob("teacher.previous-*") if "0.0o1" in (p / "parameters.yaml").read_text()]
    assert len(failed) == 1  # the failed attempt is kept too, dated


def test_a_broken_spec_is_one_line_naming_the_file(tmp_path, capsys):
    """Issue 35 #6: a YAML error in a spec was a long yaml traceback never naming the file; a spec
    whose `stages` is a string gave AttributeError."""
    path = tmp_path / "spec.yaml"
    for text, said in [("name: s\nstages: [\n  {name: a, notebook: x}\n", f"{path}:"),
                       ("name: s\nstages: coldstart\n", "list of mappings"),
                       ("name: s\nstages: [coldstart]\n", "list of mappings"),
                       ("- name: s\n", "mapping"),
                       ("", "mapping")]:
        path.write_text(text)
        message = refused(capsys, runs.main, [str(path), "--outputs", str(tmp_path / "outputs")])
        assert said in message and str(path) in message, message
    assert not (tmp_path / "outputs").exists()


def test_a_spec_name_cannot_lead_out_of_outputs(tmp_path, monkeypatch, capsys):
    """Issue 35 #10: a spec `name` with ../ wrote outside --outputs."""
    executed = fake_stages(monkeypatch)
    path, out = tmp_path / "spec.yaml", tmp_path / "outputs"
    for name in ("../escaped", str(tmp_path / "escaped"), "..", "a/b"):
        path.write_text(yaml.safe_dump({"name": name, "stages": [
            {"name": "teacher", "notebook": "notebooks/02_teacher_grpo.ipynb", "parameters": {"lr": 0.001}}]}))
        said = refused(capsys, runs.main, [str(path), "--outputs", str(out)])
        assert repr(name) in said and "name" in said
    assert not executed and sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_the_opd_methods_spec_trains_each_named_method_at_equal_samples(tmp_path):
    """dial_opd_methods.yaml: every method of opd.METHODS from the merge and from the base (a stage named
    `<method>_<start>_seed<n>` is a further seed of it), each stage's config that method's fields and its
    seed, and the samples per stage equal within each start."""
    from flowopd_lib.opd import METHODS

    plan = runs.plan_stages(runs.load_spec(runs.ROOT / "papermill_runs/dial_opd_methods.yaml"), tmp_path, {})
    trained = {stage["name"]: (params, stage) for stage, _, params in plan if stage["notebook"].endswith("04_flow_opd.ipynb")}
    seeded = {name: re.fullmatch(r"(.+?)(?:_seed(\d+))?", name).groups() for name in trained}  # (first, seed)
    assert {name for name, (_, seed) in seeded.items() if seed is None} == \
        {f"{m}_{start}" for m in METHODS for start in ("merge", "base")}
    samples = {}
    for name, (params, stage) in trained.items():
        cfg = stage_config(stage["notebook"], params)
        first, seed = seeded[name]
        method, start = first.rsplit("_", 1)
        assert all(getattr(cfg, k) == v for k, v in METHODS[method].items()), name
        assert (cfg.init_adapter is None) == (start == "base"), name
        if seed is not None:
            assert cfg.seed == int(seed) != stage_config(stage["notebook"], trained[first][0]).seed, name
        samples.setdefault(start, set()).add(cfg.updates * cfg.prompts_per_update * cfg.group_size)
    assert all(len(s) == 1 for s in samples.values()), samples


def threads_of_started_children(monkeypatch, cores: int = 8) -> dict[str, int]:
    """Stage name -> OMP_NUM_THREADS of each child runner --jobs starts, on a machine of `cores`
    cores; the children finish at once without running anything."""
    started = {}

    class Finished:
        returncode = 0

        def __init__(self, command, env):
            started[command[command.index("--only") + 1]] = int(env["OMP_NUM_THREADS"])

        def poll(self):
            return 0

    monkeypatch.setattr(runs.subprocess, "Popen", Finished)
    monkeypatch.setattr(runs.os, "cpu_count", lambda: cores)
    return started


def test_parallel_jobs_give_a_last_stage_alone_every_core(spec, tmp_path, monkeypatch):
    """--jobs 2 shares the cores between the two teachers; the cold start, which starts alone with
    nothing left to wait for (as a summary does), gets all of them rather than idling half the machine."""
    started = threads_of_started_children(monkeypatch)
    plan = runs.plan_stages(runs.load_spec(spec), tmp_path / "outputs" / "tiny_study")
    runs.run_parallel(spec, runs.load_spec(spec), plan, {}, tmp_path / "outputs", jobs=2)
    assert started == {"teacher_geneval": 4, "teacher_ocr": 4, "coldstart": 8}
    assert runs.child_threads(2, 2, others=1) == 1 and runs.child_threads(2, 2, others=0) == 2
    assert runs.child_threads(1, 4, others=3) == 1  # never 0 threads


def test_jobs_give_a_lone_stage_left_to_run_every_core(spec, tmp_path, monkeypatch):
    """A resumed --jobs run with one stage left (the summary after the training finished) starts it
    with every core, as it would at the end of an uninterrupted run. It ran in the parent's kernel
    instead, on the threads the parent was started with (OMP_NUM_THREADS=1: half of two cores)."""
    started = threads_of_started_children(monkeypatch)
    monkeypatch.setattr(runs, "run_in_order", lambda *a, **k: pytest.fail("the lone stage ran in the parent"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs.run(spec, only=["coldstart"], outputs=tmp_path / "outputs", jobs=2, report=False)
    assert started == {"coldstart": 8}


DIAL_FULL = runs.ROOT / "papermill_runs" / "dial_full.yaml"


def test_a_world_study_runs_at_another_setting_of_the_dial_by_name(tmp_path):
    """Issue 37 A: one spec is the study at every setting. dial_full.yaml in its own world (dial) and
    with --world toy: each stage's base, conflict and teachers are the world's, in a run of its own."""
    teachers = {name: runs.ROOT / "flowopd_lib" / "assets" / w.teachers_folder for name, w in worlds.WORLDS.items()}
    for world, name in ((None, "dial_full"), ("dial", "dial_full"), ("toy", "dial_full_toy")):
        spec = runs.load_spec(DIAL_FULL, world)
        w = worlds.WORLDS[world or "dial"]
        assert spec["name"] == name and spec["world"] == (world or "dial")
        plan = {stage["name"]: params for stage, _, params in runs.plan_stages(spec, tmp_path / name)}
        for stage, params in plan.items():
            assert (params["base"], params["conflict"]) == (w.base, w.conflict), stage
        assert plan["opd_merge"]["teachers"]["ocr"] == str(teachers[world or "dial"] / "ocr")
        assert plan["summary"]["main"]["teacher deqa"] == str(teachers[world or "dial"] / "deqa")
        assert plan["opd_merge"]["init_adapter"] == str(tmp_path / name / "coldstart" / "merge_delta")
    assert "{world_teachers}" in DIAL_FULL.read_text()  # the spec names no world's folder itself


def world_spec(tmp_path, **changes):
    spec = {"name": "w", "world": "toy", "shared": {"seed": 0},
            "stages": [{"name": "opd", "notebook": "notebooks/04_flow_opd.ipynb",
                        "parameters": {"teachers": {"ocr": "{world_teachers}/ocr"}}}]}
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("case, argv, words", [
    ("unknown world", ["--world", "dail"], ["'dail'", "dial", "toy"]),
    ("not a world spec", ["--world", "toy"], ["no 'world:' key", "without --world"]),
    ("teachers without a world", [], ["{world_teachers}", "world: <name>"]),
    ("base set beside the world", [], ["['base', 'conflict']", "remove them"]),
])
def test_a_wrong_world_is_one_line_before_anything_is_written(tmp_path, capsys, case, argv, words):
    changes = {"not a world spec": {"world": None, "stages": [{"name": "a", "notebook": "notebooks/05_ablations.ipynb"}]},
               "teachers without a world": {"world": None},
               "base set beside the world": {"shared": {"base": "toy", "conflict": 0.0}}}.get(case, {})
    path = world_spec(tmp_path, **changes)
    if changes.get("world", 1) is None:
        data = yaml.safe_load(path.read_text())
        del data["world"]
        path.write_text(yaml.safe_dump(data))
    out = tmp_path / "outputs"
    said = refused(capsys, runs.main, [str(path), "--outputs", str(out), *argv])
    assert all(w in said for w in words), said
    assert not out.exists()


def test_parallel_children_run_in_the_parents_world(tmp_path, monkeypatch):
    """--jobs children re-read the spec: without --world they would run the study in the spec's own
    world, in another folder."""
    commands = []

    class Finished:
        returncode = 0

        def __init__(self, command, env):
            commands.append(command)

        def poll(self):
            return 0

    monkeypatch.setattr(runs.subprocess, "Popen", Finished)
    spec = runs.load_spec(DIAL_FULL, "toy")
    plan = runs.plan_stages(spec, tmp_path / spec["name"])[:3]
    runs.run_parallel(DIAL_FULL, spec, plan, {}, tmp_path, jobs=2)
    assert len(commands) == 3 and all(c[c.index("--world") + 1] == "toy" for c in commands)
