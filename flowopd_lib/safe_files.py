"""Files the project reads back and files it replaces, safe to point at a folder someone else made.

Reading: configs, specs and records are YAML (`read_yaml`, `read_mapping`), JSON (`read_json`) or CSV
(`read_csv`); weights are safetensors (`check_safetensors`); checkpoints load weights-only
(checkpoint.py). Nothing is unpickled and no YAML tag builds an object, so no file can run code. A
file that is missing, empty, truncated, of another format or of the wrong shape is a FileError
whose one line names the file (and the line) and what to do, not a parser's traceback.

Replacing: the new content is staged beside its target (`stage_file`, `stage_directory`) and
swapped in with one rename (`swap_in`), so a failure (a full disk, a kill) leaves the target as it
was; a read-only target (no write permission bits, honoured even for root) is refused.
`replace_directory` moves the folder it replaces to a dated backup `<name>.previous-<date>`
(`set_aside`, `backups`); `replace_together` stages several files and folders before swapping any
in (generated pages: what they replace is regenerated, not kept). Callers check every input first,
so a refused command changes nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .cli import UserError

BACKUP = ".previous-"  # <name>.previous-<YYYYmmdd-HHMMSS>[.n]: a folder set aside, newest last


class FileError(UserError):
    """A file the project reads or writes is missing, damaged, of the wrong shape or not writable;
    the message names it and what to do."""


# ----------------------------------------------------------------------------- reading

def read_text(path: str | Path, what: str) -> str:
    """The file's text; `what` says what it should be (e.g. "a run spec") in the error."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileError(f"{path}: no such file ({what})") from None
    except IsADirectoryError:
        raise FileError(f"{path} is a folder, not {what}") from None
    except UnicodeDecodeError:
        raise FileError(f"{path} is not text (binary bytes, e.g. a pickle): not {what}") from None
    except OSError as error:
        raise FileError(f"{path}: cannot read {what} ({error.strerror})") from None


def read_yaml(path: str | Path, what: str = "a YAML file") -> Any:
    """The YAML document of the file: plain values only (a !!python tag is an error, never an object)."""
    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        if "constructor" in problem:
            problem = "a YAML tag that builds an object; write plain values"
        raise FileError(f"{where}: {what} that is not valid YAML ({problem}); fix it there") from None


def read_mapping(path: str | Path, what: str = "a YAML file") -> dict:
    """A YAML file holding `key: value` lines (an empty file is {}); any other top level is an error."""
    value = read_yaml(path, what)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FileError(f"{path}: {what} must be a mapping of `key: value` lines, not a "
                        f"{type(value).__name__} ({str(value)[:60]!r})")
    return value


def read_json(path: str | Path, what: str = "a JSON file") -> Any:
    """The JSON document of the file; an empty or cut-off file is an error saying so."""
    text = read_text(path, what)
    if not text.strip():
        raise FileError(f"{path} is empty: {what} cut off while written? Restore it or delete it")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise FileError(f"{path}:{error.lineno}: {what} that is not valid JSON ({error.msg}; truncated?); "
                        "restore it or delete it") from None


def read_json_object(path: str | Path, what: str = "a JSON file") -> dict:
    """A JSON file whose top level is an object."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise FileError(f"{path}: {what} must hold a JSON object, not a {type(value).__name__}")
    return value


def read_csv(path: str | Path, what: str = "a CSV file"):
    """The CSV file as a pandas DataFrame; empty or unparsable is an error naming the file."""
    import pandas as pd

    read_text(path, what)  # missing, a folder, binary bytes
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise FileError(f"{path}: {what} that cannot be read as CSV ({str(error).splitlines()[0]})") from None


def check_safetensors(path: str | Path, what: str = "weights") -> None:
    """Refuse a weights file that is not safetensors (a pickle, a cut-off file): only its header is read."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileError(f"{path}: no such file ({what})")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError
        raise FileError(f"{path} is not a complete safetensors file ({str(error).splitlines()[0][:120]}): "
                        f"{what} are loaded from safetensors only; restore it or delete it") from None


# ----------------------------------------------------------------------------- replacing

def check_writable(target: Path) -> None:
    """Refuse a target without write permission bits, or in a folder without them (root included:
    the bits say what the owner wants kept)."""
    for path, kind in ((target, "read-only"), (target.parent, "in a read-only folder")):
        if path.exists() and not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise FileError(f"{target} is {kind}: nothing was written; make it writable (chmod u+w "
                            f"{path}) or write elsewhere")


def stage_file(target: Path, content: str | bytes) -> Path:
    """Write `content` beside `target` (a hidden `.<name>.new-<pid>`, flushed to disk); returns it."""
    check_writable(target)
    staging = target.with_name(f".{target.name}.new-{os.getpid()}")
    try:
        with open(staging, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            shutil.copymode(target, staging)
    except BaseException as error:
        staging.unlink(missing_ok=True)
        raise _unwritten(target, error)
    return staging


def stage_directory(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a new folder beside `target` (`build(folder)` writes it); returns it."""
    check_writable(target)
    for stale in target.parent.glob(f".{target.name}.new-*"):  # left by a killed earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    staging = target.with_name(f".{target.name}.new-{os.getpid()}")
    made = [folder for folder in staging.parents if not folder.exists()]  # folders this creates, deepest first
    try:
        staging.mkdir(parents=True)
        build(staging)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:
            folder.rmdir()
        raise _unwritten(target, error)
    return staging


def _unwritten(target: Path, error: BaseException) -> BaseException:
    """An OSError while staging (a full disk) as a FileError saying the target is unchanged."""
    if isinstance(error, OSError) and not isinstance(error, FileError):
        return FileError(f"could not write {target} ({error.strerror or error}); it is unchanged")
    return error


def swap_in(staging: Path, target: Path, backup_folder: str | Path | None = None, keep: bool = True) -> Path | None:
    """Rename a staged file or folder into place. A replaced folder becomes a dated backup in
    `backup_folder` (default: beside it), or is deleted with `keep=False` (copies whose source
    stays); a replaced file is gone (files are pages a command regenerates). Returns the backup."""
    if not staging.is_dir():
        os.replace(staging, target)
        return None
    backup = set_aside(target, backup_folder) if target.exists() else None
    os.rename(staging, target)
    if backup is not None and not keep:
        shutil.rmtree(backup)
        return None
    return backup


def replace_directory(target: str | Path, build: Callable[[Path], None],
                      backup_folder: str | Path | None = None, keep: bool = True) -> Path | None:
    """Replace the folder `target` by what `build(folder)` writes into a new folder beside it (`swap_in`:
    the old one becomes a dated backup). A failing `build` leaves `target` as it was. Returns the backup."""
    target = Path(target)
    return swap_in(stage_directory(target, build), target, backup_folder, keep)


def replace_together(files: dict[Path, str | bytes], folders: dict[Path, Callable[[Path], None]]) -> None:
    """Replace several files and folders (replaced folders deleted: `keep=False`) as one: all are
    staged first, then swapped in by renames, which need no space; a failure while staging (a full
    disk) leaves every target as it was."""
    staged = []
    try:
        for target, content in files.items():
            staged.append((stage_file(Path(target), content), Path(target)))
        for target, build in folders.items():
            staged.append((stage_directory(Path(target), build), Path(target)))
    except BaseException:
        for staging, _ in staged:
            if staging.is_dir():
                shutil.rmtree(staging)
            else:
                staging.unlink()
        raise
    for staging, target in staged:
        swap_in(staging, target, keep=False)


def stamp() -> str:
    """The date and time backups are named by."""
    return time.strftime("%Y%m%d-%H%M%S")


def set_aside(target: str | Path, folder: str | Path | None = None, when: str | None = None) -> Path:
    """Move `target` (a file or folder) to `<folder>/<name>.previous-<when>` (default: beside it, now;
    `.2`, `.3`... if taken) and return where; nothing is deleted."""
    target = Path(target)
    folder = Path(folder) if folder is not None else target.parent
    base = folder / f"{target.name}{BACKUP}{when or stamp()}"
    backup, n = base, 1
    while backup.exists():
        n += 1
        backup = base.with_name(f"{base.name}.{n}")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.move(str(target), str(backup))  # a rename on one filesystem
    return backup


def backup_stamp(backup: Path) -> str:
    """The `when` a backup was set aside with (without its `.n`)."""
    return backup.name.rsplit(BACKUP, 1)[1].split(".")[0]


def backups(target: str | Path, folder: str | Path | None = None) -> list[Path]:
    """The backups of `target` that `set_aside` made, oldest first."""
    target = Path(target)
    folder = Path(folder) if folder is not None else target.parent

    def order(path: Path):
        when, _, n = path.name.rsplit(BACKUP, 1)[1].partition(".")
        return when, int(n) if n.isdigit() else 1
    return sorted(folder.glob(f"{target.name}{BACKUP}*"), key=order)
