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


def execute(notebook: str | Path, executed: str | Path, parameters: dict, cwd: str | Path, log=None):
    """Run `notebook` with `parameters` into `executed` (papermill); `log`: an open file that gets the
    cells' stdout and stderr as they run. Raises papermill's PapermillExecutionError on a failing cell."""
    import papermill

    return papermill.execute_notebook(str(notebook), str(executed), parameters=parameters, kernel_name=KERNEL,
                                      cwd=str(cwd), progress_bar=False, stdout_file=log, stderr_file=log,
                                      kernel_manager_class=IPCKernelManager)
