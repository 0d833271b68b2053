"""Every test module leaves the shipped assets (flowopd_lib/assets: bases, teachers, proxies, prompts) as it
found them: a test that writes into them by mistake (a destination that a monkeypatch did not reach) fails
its module here, instead of silently replacing a shipped teacher."""
from pathlib import Path

import pytest

from guards import tree

ASSETS = Path(__file__).resolve().parents[1] / "flowopd_lib" / "assets"


def _contents(root: Path) -> dict[str, str]:
    return {path: state.split()[0] for path, state in tree(root).items() if "__pycache__" not in path}


@pytest.fixture(autouse=True, scope="module")
def shipped_assets_unchanged():
    before = _contents(ASSETS)
    yield
    after = _contents(ASSETS)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert not changed, f"this test module changed the shipped assets: {changed[:10]} (restore: git checkout flowopd_lib/assets)"
