"""The project installs as declared: env.yml mirrors pyproject, the Jupyter kernel exists."""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_env_yml_mirrors_pyproject_dependencies():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "env.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    mirrored = [p for p in pip_section if not p.startswith("-e")]
    assert sorted(mirrored) == sorted(declared), (
        f"only in pyproject: {sorted(set(declared) - set(mirrored))}; only in env.yml: {sorted(set(mirrored) - set(declared))}")
    assert "-e ." in pip_section, "env.yml must install the project itself"
    assert all("==" in p for p in declared), "dependencies are pinned"


def test_installed_versions_match_the_pins():
    from importlib.metadata import version
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in declared:
        name, pinned = requirement.split("==")
        assert version(name).split("+")[0] == pinned, f"{name}: installed {version(name)}, pinned {pinned}"


def test_jupyter_kernel_is_registered_in_the_venv():
    specs = json.loads(subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
                                      capture_output=True, text=True, check=True).stdout)["kernelspecs"]
    assert "flowopd" in specs, f"run `make setup`; kernels found: {sorted(specs)}"
    argv0 = specs["flowopd"]["spec"]["argv"][0]
    assert Path(argv0).resolve() == Path(sys.executable).resolve(), f"kernel runs {argv0}, not this venv"
