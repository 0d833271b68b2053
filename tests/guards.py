"""What the safety tests check: a refused command says why in one line (exit status 2, no
traceback), and changes nothing on disk (every file's hash and mode, every folder, the same before
and after)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest


def tree(root: str | Path) -> dict[str, str]:
    """Relative path -> sha256 and mode of every file, "folder" and mode of every folder, under
    `root` (itself as "."); {} when it does not exist."""
    root = Path(root)
    if not root.exists():
        return {}
    state = {}
    for path in sorted([root, *root.rglob("*")]):
        mode = f"{path.stat().st_mode:o}"
        content = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        state[str(path.relative_to(root))] = f"{content} {mode}"
    return state


def snapshot(*roots: str | Path) -> dict[str, dict[str, str]]:
    """`tree` of each root, by its path: what a refused command must leave as it was."""
    return {str(root): tree(root) for root in roots}


def refused(capsys, main, argv: list[str]) -> str:
    """Run a command's `main(argv)`, which must refuse: exit status 2 and one `error: ...` line on
    stderr, no traceback. Returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    said = capsys.readouterr().err.strip()
    assert stopped.value.code == 2, (stopped.value.code, said)
    assert len(said.splitlines()) == 1 and said.startswith("error: ") and "Traceback" not in said, said
    return said
