"""Notebooks refuse a parameter they do not declare (`-p updatez 1` used to run at the defaults)."""
import json
from pathlib import Path

import papermill
import pytest
from papermill.exceptions import PapermillExecutionError

from flowopd_lib import notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_unknown_parameters_are_found_in_the_kernel_history():
    params_cell = "updates = 10  # a budget\nlr: float = None\n"
    injected = "# Parameters\nupdatez = 1\nlr = 0.5\n"
    assert notebook.unknown_parameters(["", params_cell, injected, "x = 1"]) == (["updatez"], ["updates", "lr"])
    assert notebook.unknown_parameters(["", params_cell, "x = 1"]) == ([], [])  # nothing injected: nothing to check
    assert notebook.unknown_parameters(["", params_cell, "# Parameters\nlr = 0.5\n"]) == ([], ["updates", "lr"])


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_each_notebook_checks_its_parameters_right_after_declaring_them(name):
    cells = [c for c in json.loads((NOTEBOOKS / name).read_text())["cells"] if c["cell_type"] == "code"]
    first = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
    assert "refuse_unknown_parameters()" in "".join(cells[first + 1]["source"]), \
        f"{name}: the cell after the parameters cell must call notebook.refuse_unknown_parameters()"


def test_a_mistyped_parameter_stops_the_notebook_in_its_first_cell(tmp_path):
    with pytest.raises(PapermillExecutionError, match="'eval_prompt' \\(did you mean 'eval_prompts'\\?\\)"):
        notebook.execute(NOTEBOOKS / "05_ablations.ipynb", tmp_path / "05.ipynb", {"eval_prompt": 4}, cwd=tmp_path)
    cells = json.loads((tmp_path / "05.ipynb").read_text())["cells"]
    ran = [c for c in cells if c["cell_type"] == "code" and c.get("execution_count")]
    assert len(ran) == 3  # the parameters, the injected ones, and the check: nothing computed


def test_an_estimators_reference_not_among_the_estimators_stops_notebook_05_before_evaluating(tmp_path):
    """Issue 37 B: the paired comparison's reference is checked before the (hour-long, under the
    decisive protocol) evaluation, not after it."""
    params = {"estimators": {"kl": None, "no_teacher": None}, "estimators_reference": "no-teacher",
              "out_dir": str(tmp_path / "out")}
    with pytest.raises(PapermillExecutionError, match="estimators_reference 'no-teacher' is not a label"):
        notebook.execute(NOTEBOOKS / "05_ablations.ipynb", tmp_path / "05.ipynb", params, cwd=tmp_path)
    assert not (tmp_path / "out" / "scores.csv").exists()
    assert not list((tmp_path / "out").glob("eval_scores*"))


@pytest.mark.parametrize("name", ["02_teacher_grpo", "03_cold_start", "04_flow_opd", "05_ablations"])
def test_a_process_count_that_is_not_one_stops_the_notebook_before_any_compute(tmp_path, name):
    """`num_processes` is a count or "auto" in every notebook that takes it; anything else names
    itself before a model is loaded (it was a TypeError in the middle of the notebook)."""
    params = {"num_processes": "two", "out_dir": str(tmp_path / "out")}
    with pytest.raises(PapermillExecutionError, match="num_processes 'two'"):
        notebook.execute(NOTEBOOKS / f"{name}.ipynb", tmp_path / f"{name}.ipynb", params, cwd=tmp_path)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.suffix in (".csv", ".safetensors", ".png")]


def test_a_kernel_shutting_down_is_not_interrupted(monkeypatch):
    """jupyter_client sends SIGINT before its shutdown request; to the idle kernel papermill shuts
    down it was only an "ERROR | KeyboardInterrupt caught in kernel" line in a run's log. A kernel
    still running is interrupted as before."""
    import asyncio

    from jupyter_client import AsyncKernelManager

    interrupted = []

    async def interrupt(self):
        interrupted.append(self.shutting_down)

    monkeypatch.setattr(AsyncKernelManager, "_async_interrupt_kernel", interrupt)
    manager = notebook.IPCKernelManager(kernel_name=notebook.KERNEL)
    manager.shutting_down = True
    asyncio.run(manager._async_interrupt_kernel())
    manager.shutting_down = False
    asyncio.run(manager._async_interrupt_kernel())
    assert interrupted == [False]
