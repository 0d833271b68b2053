# The README's two commands: `make run` (set-up + the main job) and `make test` (set-up + tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL := flowopd

.PHONY: setup run test test-all dryrun notebooks clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes; pip finds the pinned CPU torch wheel on this
# machine's disk (GPU nodes: see the README). The venv is registered as the Jupyter kernel
# `flowopd` inside the venv, so notebooks and papermill run in it.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (flowopd)" > /dev/null
	@touch $(STAMP)

# The whole toy-world study at a small budget (papermill_runs/toy_quick.yaml); prints the summary.
run: setup
	$(PY) -m flowopd_lib.runs papermill_runs/toy_quick.yaml

test: setup
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m ""

# The full-scale path on CPU: every trainer at the SD3.5-M spec's shapes on 4 gloo ranks with a resume,
# compared with one process (tests/test_full_scale_ranks.py), then papermill_runs/sd35m.yaml end to end
# with tiny stand-ins (flowopd_lib/dryrun.py), each training stage as 2 CPU ranks (see train.launch).
dryrun: setup
	$(PY) -m pytest -m ranks -p no:cacheprovider tests/test_full_scale_ranks.py
	$(PY) -m flowopd_lib.dryrun papermill_runs/sd35m.yaml

# Every notebook at its defaults, as a new user opens it (tests/test_notebook_defaults.py).
notebooks: setup
	$(PY) -m pytest -m defaults -p no:cacheprovider tests/test_notebook_defaults.py

clean:
	rm -rf runs papermill_runs/outputs .pytest_cache
