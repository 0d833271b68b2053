"""Executing a notebook: papermill on the project's Jupyter kernel (`make setup` registers it), the
kernel's sockets being local files (IPC), not TCP ports: nothing leaves the machine, so ipykernel has no
"running over TCP without encryption" warning to print for every notebook a run executes.

    from flowopd_lib import notebook
    notebook.execute("notebooks/04_flow_opd.ipynb", "out/04.ipynb", {"updates": 10}, cwd=".")
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from jupyter_client import AsyncKernelManager

KERNEL = "flowopd"


class IPCKernelManager(AsyncKernelManager):
    """A kernel manager whose kernel listens on IPC sockets: files `<prefix>-<n>` in a per-user
    temporary folder, removed with the kernel (one prefix per kernel, so kernels side by side never meet)."""

    def __init__(self, **kwargs):
        folder = Path(tempfile.gettempdir()) / f"flowopd-kernels-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        kwargs.setdefault("transport", "ipc")
        kwargs.setdefault("ip", str(folder / f"kernel-{os.getpid()}-{uuid.uuid4().hex[:8]}"))
        super().__init__(**kwargs)

    async def _async_interrupt_kernel(self) -> None:
        # jupyter_client interrupts a kernel before asking it to shut down. Papermill shuts it down
        # after the last cell, idle, and the SIGINT then only made ipykernel print "ERROR |
        # KeyboardInterrupt caught in kernel" into the run's log now and then: a false alarm.
        if self.shutting_down:
            return
        await super()._async_interrupt_kernel()


def execute(notebook: str | Path, executed: str | Path, parameters: dict, cwd: str | Path, log=None):
    """Run `notebook` with `parameters` into `executed` (papermill); `log`: an open file that gets the
    cells' stdout and stderr as they run. Raises papermill's PapermillExecutionError on a failing cell."""
    import papermill

    return papermill.execute_notebook(str(notebook), str(executed), parameters=parameters, kernel_name=KERNEL,
                                      cwd=str(cwd), progress_bar=False, stdout_file=log, stderr_file=log,
                                      kernel_manager_class=IPCKernelManager)


def assigned_names(source: str) -> list[str]:
    """Names a cell's top-level statements assign (`x = ...`, `x: int = ...`), in order."""
    import ast

    names = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def unknown_parameters(history: list[str]) -> tuple[list[str], list[str]]:
    """(unknown, declared) parameters from a kernel's input history: papermill runs the notebook's
    `parameters` cell, then its injected cell, which starts with "# Parameters"; a name injected there
    that the parameters cell does not assign is unknown (papermill itself only warns, then runs)."""
    injected = [i for i, source in enumerate(history) if source.lstrip().startswith("# Parameters") and i > 0]
    if not injected:
        return [], []
    i = injected[-1]
    declared = assigned_names(history[i - 1])
    return [n for n in assigned_names(history[i]) if n not in declared], declared


def refuse_unknown_parameters() -> None:
    """The first call after a notebook's parameters cell: stop with one line naming a parameter the
    notebook does not declare (e.g. `-p updatez 1`, which papermill would run at the defaults) and the
    closest declared name. Does nothing outside a kernel or when no parameters were injected."""
    import difflib

    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    unknown, declared = unknown_parameters(list(shell.user_ns.get("In", [])))
    if unknown:
        hints = [f"{n!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(n, declared, 1)) else repr(n)
                 for n in unknown]
        raise ValueError(f"unknown notebook parameter(s) {', '.join(hints)}; this notebook's parameters: "
                         f"{', '.join(declared)}")
