"""Every notebook runs top to bottom under papermill on the project kernel, with tiny parameters;
a training notebook's settings reach its trainer's config, whose dataclass holds every default."""
import ast
import dataclasses
import json
import typing
from pathlib import Path

import papermill
import pytest
import torch
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from flowopd_lib import adapters, evaluation, notebook, runs, teachers, train
from flowopd_lib.models.toy import ToyFlowModel

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TINY_BASE = "<tiny random base>"  # replaced by a tiny random ToyFlowModel saved in the test's tmp dir
TINY_TEACHERS = "<tiny random teachers>"  # replaced by random adapters on that base, one per task

TINY = {
    "00_quickstart.ipynb": dict(base=TINY_BASE, teachers=TINY_TEACHERS, opd_updates=1, eval_prompts=4, eval_samples=1),
    "01_base_model.ipynb": dict(retrain=True, size="tiny", ae_steps=10, steps=10, batch=8, time_budget_minutes=None,
                                eval_every=5, eval_prompts=4, eval_steps=2, headroom_samples=2),
    "03_cold_start.ipynb": dict(base=TINY_BASE, teachers=TINY_TEACHERS, merge_methods=["delta", "factor", "ties"],
                                sft_prompts_per_task=2, sft_steps=2, sft_batch=2, eval_prompts=6, eval_steps=2),
    "04_flow_opd.ipynb": dict(base=TINY_BASE, teachers=TINY_TEACHERS, init_adapter=None, datasets={"geneval": 1.0, "ocr": 1.0},
                              updates=2, time_budget_minutes=None, prompts_per_update=2, group_size=2, sde_steps=2,
                              eval_every=1, eval_prompts=6, eval_steps=2),
    "05_ablations.ipynb": dict(base=TINY_BASE, main={"base": None, "teacher geneval": "<teacher:geneval>",
                                                      "teacher ocr": "<teacher:ocr>"},
                               seesaw={"base": None, "+geneval": "<teacher:geneval>"},
                               estimators={"kl": "<teacher:geneval>", "control": "<teacher:ocr>"},
                               estimators_reference="control", eval_prompts=4, eval_steps=2,
                               claims={"base": "base", "teachers": {"geneval": "teacher geneval", "ocr": "teacher ocr"},
                                       "seesaw": {"start": "base", "geneval": "+geneval"}}),
    "02_teacher_grpo.ipynb": dict(recipe="pickscore", extra={"train_timesteps": 2}, base=TINY_BASE, updates=2,  # grpo: test_runs
                                  prompts_per_update=2, group_size=2, sde_steps=2, eval_every=1, eval_prompts=6,
                                  eval_steps=2),
    "06_trajectory_explorer.ipynb": dict(base=TINY_BASE, teachers={"geneval": "<teacher:geneval>", "ocr": "<teacher:ocr>"},
                                         student=None, others={"merge": "<teacher:pickscore>"}, steps=3, group_size=2),
}


def random_teachers(base: str, directory: Path) -> dict[str, str]:
    model = ToyFlowModel.load(base)
    out = {}
    for task in ("geneval", "ocr", "pickscore", "deqa"):
        adapters.add(model, task, rank=2, gaussian_init=False)
        out[task] = str(adapters.save(model, task, directory / task))
    return out


def test_every_notebook_has_tiny_parameters_and_no_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == sorted(TINY), "give each notebook a tiny setting here"
    for name in names:
        nb = json.loads((NOTEBOOKS / name).read_text())
        assert any("parameters" in c["metadata"].get("tags", []) for c in nb["cells"]), f"{name}: no parameters cell"
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), f"{name}: committed with outputs"
        assert nb["metadata"]["kernelspec"]["name"] == "flowopd"


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_runs_under_papermill(name, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    params = {**TINY[name], "out_dir": str(tmp_path / "out")}
    if params.get("base") == TINY_BASE:
        torch.manual_seed(0)
        params["base"] = str(ToyFlowModel("tiny").save(tmp_path / "tiny_base"))
    teachers = random_teachers(params["base"], tmp_path / "teachers") if "base" in params else {}
    if params.get("teachers") == TINY_TEACHERS:
        params["teachers"] = teachers
    for key, value in params.items():  # "<teacher:TASK>" -> that random teacher's directory
        if isinstance(value, dict):
            params[key] = {k: teachers[v[9:-1]] if isinstance(v, str) and v.startswith("<teacher:") else v
                           for k, v in value.items()}
    notebook.execute(NOTEBOOKS / name, tmp_path / name, params, cwd=tmp_path)
    assert any((tmp_path / "out").glob("*.png")), "the notebook saves its figures next to its outputs"
    if name == "05_ablations.ipynb":  # the methods paired against estimators_reference
        assert "| kl " in (tmp_path / "out" / "estimator_changes_table.md").read_text()
        assert (tmp_path / "out" / "estimator_changes.png").exists()
    assert not warning_boxes(tmp_path / name)


def warning_boxes(executed: Path) -> list[str]:
    """The stderr outputs of an executed notebook that are warnings (JupyterLab draws them as red boxes);
    progress bars are stderr too, and are not warnings."""
    cells = json.loads(executed.read_text())["cells"]
    texts = ["".join(o.get("text", "")) for c in cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    return [t for t in texts if "warn" in t.lower() or "torchvision" in t]


def test_warning_boxes_are_found(tmp_path):
    """The check above can fail: a notebook with transformers' torchvision notice on stderr is caught."""
    notice = "[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back"
    nb = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "stream", "name": "stderr", "text": notice},
                                                      {"output_type": "stream", "name": "stderr", "text": "50%|##  |"}]}]}
    (tmp_path / "x.ipynb").write_text(json.dumps(nb))
    assert warning_boxes(tmp_path / "x.ipynb") == [notice]


# ----------------------------------------------------------------------------- one source for each setting

# The training notebooks, the trainers each can run, and their own parameters that are also config
# fields: the notebook's product and inputs (set explicitly). Every other config field it declares
# defaults to None there, which stands for the dataclass default.
CONFIG_NOTEBOOKS = {"02_teacher_grpo.ipynb": ("grpo", "nft", "awm"), "04_flow_opd.ipynb": ("opd",)}
# Notebook 02's `updates` is its short run's budget (the recipe's full one: teachers.RECIPES).
NOTEBOOK_LEVEL = {"02_teacher_grpo.ipynb": {"base", "adapter", "out_dir", "updates"},
                  "04_flow_opd.ipynb": {"base", "teachers", "init_adapter", "out_dir"}}
# Values a config accepts for fields whose type gives none (valid names, tasks with a teacher).
PROBES = {"datasets": {"ocr": 2.0}, "rewards": {"ocr": 2.0}, "teachers": {"ocr": "probe/teacher_ocr"},
          "task_rewards": {"ocr": "ocr"}, "supervised_steps": "last:1",
          "objective": "mean_match"}  # a probe objective that both probe rollouts (sde and ode) allow


def notebook_config(name: str, overrides: dict, tmp_path: Path):
    """The config a notebook builds when the runner hands it `-p key=value` for each of `overrides`:
    the runner plans a one-stage spec (its key checks, merging, out_dir), papermill injects the
    parameters after the parameters cell, and the code cells run up to the one tagged `config`
    (nothing is loaded or trained). Returns (config, the runner's parameters)."""
    spec = {"name": "probe", "shared": {}, "stages": [{"name": "stage", "notebook": f"notebooks/{name}"}]}
    flags = dict(runs.parse_override(f"{key}={json.dumps(value)}") for key, value in overrides.items())
    [(_, _, params)] = runs.plan_stages(spec, tmp_path, flags)
    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOKS / name)), params)  # as execute_notebook does
    namespace: dict = {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            exec(cell.source, namespace)
            if "config" in cell.metadata.get("tags", []):
                return namespace["cfg"], params
    raise AssertionError(f"{name} has no cell tagged 'config' (the one that builds cfg)")


def probe_value(field: dataclasses.Field, hint):
    """A valid value of the field other than its default."""
    if field.name in PROBES:
        return PROBES[field.name]
    default, choices, bounds = field.default, field.metadata.get("choices"), field.metadata.get("range")
    if choices:
        return next(c for c in choices if c != default)
    kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if kind is bool:
        return not default
    if kind is int:
        return (default or 0) + 1
    if kind is float:
        low, high = bounds or (None, None)
        for value in ((default or 1.0) / 2, (default or 1.0) * 2, 0.5, 2.0):
            if value != default and (low is None or value >= low) and (high is None or value <= high):
                return value
    if kind is str:
        return f"probe/{field.name}"
    raise AssertionError(f"no probe value for {field.name} ({hint}): add one to PROBES")


CASES = [(name, trainer) for name, trainers in CONFIG_NOTEBOOKS.items() for trainer in trainers]


@pytest.mark.parametrize("name,trainer", CASES, ids=[f"{n[:2]}-{t}" for n, t in CASES])
def test_each_declared_setting_reaches_the_trainer_config_through_the_runner(name, trainer, tmp_path):
    """`-p key=value` for every parameter that is a field of the trainer's config lands in the config
    the notebook trains with; `extra` (and in notebook 02 `trainer_extra` of the chosen trainer, over
    it) sets any other field, and wins over the flat ones, as sd35m.yaml's per-trainer beta needs."""
    config_cls, _ = train.trainer_for(trainer)
    fields, hints = {f.name: f for f in dataclasses.fields(config_cls)}, typing.get_type_hints(config_cls)
    declared = runs.notebook_parameters(NOTEBOOKS / name)
    settings = sorted((declared & set(fields)) - runs.RUNNER_PARAMETERS)
    assert {"lr", "updates", "seed", "datasets"} <= set(settings)
    overrides = {key: probe_value(fields[key], hints[key]) for key in settings}
    extras = {"extra": {"checkpoint_every": 7, "weight_decay": 0.5}}
    if "trainer" in declared:
        other = next(t for t in CONFIG_NOTEBOOKS[name] if t != trainer)
        extras.update(trainer=trainer, recipe=None, trainer_extra={trainer: {"grad_clip": 0.5, "weight_decay": 0.25},
                                                      other: {"grad_clip": 0.125}})
    assert not set(settings) & {"checkpoint_every", "weight_decay", "grad_clip"}  # each probe reaches alone
    cfg, params = notebook_config(name, {**overrides, **extras}, tmp_path)
    assert type(cfg) is config_cls
    expected = {**overrides, **extras["extra"], **extras.get("trainer_extra", {}).get(trainer, {}),
                "out_dir": params["out_dir"]}
    reached = {key: getattr(cfg, key) for key in expected}
    assert reached == expected, {k: (reached[k], v) for k, v in expected.items() if reached[k] != v}
    more = {"trainer": trainer, "recipe": None, "trainer_extra": {trainer: {"lr": 0.125}}} if "trainer" in declared else {}
    cfg, _ = notebook_config(name, {"lr": 0.25, "extra": {"lr": 0.0625}, **more}, tmp_path)
    assert cfg.lr == (0.125 if more else 0.0625)  # the explicit mappings win over a flat setting


@pytest.mark.parametrize("name,trainer", CASES, ids=[f"{n[:2]}-{t}" for n, t in CASES])
def test_a_notebook_left_at_its_defaults_trains_with_the_config_defaults(name, trainer, tmp_path):
    """One default per setting: the dataclass's. Beyond its own product and inputs (NOTEBOOK_LEVEL),
    a notebook run with nothing set trains with the trainer config's defaults."""
    config_cls, _ = train.trainer_for(trainer)
    cfg, _ = notebook_config(name, {"trainer": trainer, "recipe": None} if name.startswith("02") else {}, tmp_path)
    defaults = config_cls(**{key: getattr(cfg, key) for key in NOTEBOOK_LEVEL[name]})
    differ = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if getattr(cfg, f.name) != getattr(defaults, f.name)}
    assert not differ, f"{name} sets {differ} itself; leave them None (the config's default) or pass them in a spec"
    settings = {f.name for f in dataclasses.fields(config_cls)} - NOTEBOOK_LEVEL[name]
    literal = {k: v["default"] for k, v in papermill.inspect_notebook(str(NOTEBOOKS / name)).items()
               if k in settings and v["default"] != "None"}
    assert not literal, f"{name}: declare these trainer settings as None (the config's default), not {literal}"


def test_notebook_02_at_its_defaults_is_a_short_run_of_the_pickscore_recipe(tmp_path):
    """Its trainer and settings are the shipped PickScore teacher's (teachers.RECIPES), under the teachers'
    protocol; only the budget is the notebook's own. A trainer other than the recipe's is refused."""
    cfg, params = notebook_config("02_teacher_grpo.ipynb", {}, tmp_path)
    recipe = teachers.recipe_config("pickscore", params["out_dir"], {"updates": 20})
    assert cfg.to_dict() == recipe.to_dict() and cfg.eval_cfg == evaluation.PROTOCOL["cfg_scale"]
    with pytest.raises(ValueError, match="recipe='pickscore' is a nft recipe"):
        notebook_config("02_teacher_grpo.ipynb", {"trainer": "grpo"}, tmp_path)


def test_none_as_the_default_loses_no_value():
    """Config.from_settings reads a None setting as "the field's default": every trainer config
    field that may be None must default to None, or None could not be asked for."""
    for stage in train.TRAINERS:
        config_cls, _ = train.trainer_for(stage)
        hints = typing.get_type_hints(config_cls)
        for f in dataclasses.fields(config_cls):
            if type(None) in typing.get_args(hints[f.name]):
                assert f.default is None, f"{config_cls.__name__}.{f.name} may be None but defaults to {f.default!r}"


@pytest.mark.parametrize("name", sorted(TINY))
def test_papermill_sees_every_name_the_parameters_cell_assigns(name):
    """papermill skips a parameter line holding a second '=' (e.g. in its comment): the runner would
    then refuse that parameter, and `-p` could not set it."""
    nb = json.loads((NOTEBOOKS / name).read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    assigned = {t.id for node in ast.parse("".join(cell["source"])).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert assigned == runs.notebook_parameters(NOTEBOOKS / name)
