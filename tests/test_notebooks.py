"""Every notebook runs top to bottom under papermill on the project kernel, with tiny parameters."""
import json
from pathlib import Path

import papermill
import pytest
import torch

from flowopd_lib import adapters
from flowopd_lib.models.toy import ToyFlowModel

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TINY_BASE = "<tiny random base>"  # replaced by a tiny random ToyFlowModel saved in the test's tmp dir
TINY_TEACHERS = "<tiny random teachers>"  # replaced by random adapters on that base, one per task

TINY = {
    "00_quickstart.ipynb": dict(base=TINY_BASE, teacher_minutes=0.01, opd_minutes=0.01, prompts_per_update=2,
                                group_size=2, eval_prompts=4, eval_steps=2),
    "01_base_model.ipynb": dict(size="tiny", ae_steps=10, steps=10, batch=8, time_budget_minutes=None, eval_every=5,
                                eval_prompts=6, eval_steps=2),
    "03_cold_start.ipynb": dict(base=TINY_BASE, teachers=TINY_TEACHERS, merge_methods=["delta", "factor", "ties"],
                                sft_prompts_per_task=2, sft_steps=2, sft_batch=2, eval_prompts=6, eval_steps=2),
    "04_flow_opd.ipynb": dict(base=TINY_BASE, teachers=TINY_TEACHERS, init_adapter=None, datasets={"geneval": 1.0, "ocr": 1.0},
                              updates=2, time_budget_minutes=None, prompts_per_update=2, group_size=2, sde_steps=2,
                              eval_every=1, eval_prompts=6, eval_steps=2),
    "05_ablations.ipynb": dict(base=TINY_BASE, main={"base": None, "teacher geneval": "<teacher:geneval>",
                                                      "teacher ocr": "<teacher:ocr>"},
                               seesaw={"base": None, "+geneval": "<teacher:geneval>"},
                               estimators={"kl": "<teacher:geneval>"}, eval_prompts=4, eval_steps=2),
    "02_teacher_grpo.ipynb": dict(trainer="nft", lr=None, beta=None, extra={"train_timesteps": 2},  # grpo: test_runs
                                  base=TINY_BASE, rewards={"geneval": 1.0}, datasets={"geneval": 1.0}, updates=2,
                                  time_budget_minutes=None, prompts_per_update=2, group_size=2, sde_steps=2,
                                  eval_every=1, eval_prompts=6, eval_steps=2),
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
    papermill.execute_notebook(str(NOTEBOOKS / name), str(tmp_path / name), parameters=params,
                               kernel_name="flowopd", cwd=str(tmp_path), progress_bar=False)
    assert any((tmp_path / "out").glob("*.png")), "the notebook saves its figures next to its outputs"
