"""Flow-GRPO's prompt files as task-labelled prompts, and a seeded prompt source for the trainers.

Where to get the files: they are not shipped here; they are in the `dataset/` folder of the
flow_grpo repository (github.com/yifan123/flow_grpo), laid out as

    dataset/geneval/{train,test}_metadata.jsonl   GenEval metadata, one JSON object a line:
                                                  "prompt", "tag" (the GenEval category) and
                                                  "include" clauses (class, count, color, position)
    dataset/ocr/{train,test}.txt                  one prompt a line, text to render in "quotes"
    dataset/pickscore/{train,test}.txt            one free-form prompt a line

The toy world ships its prompts in the same formats and layout (`flowopd_lib/assets/prompts`),
so `dataset_files(root, split)` maps tasks to files for either root; deqa trains on the
general (pickscore) prompts, as in the paper.

Prompts are `toy.Prompt(text, task, spec)`: spec is the whole metadata dict for GenEval (what
the GenEval reward server judges), {"text": quoted text} for OCR, {} otherwise. The task label
routes each prompt to its teacher and to the rewards that judge it.

    source = prompt_source(dataset_files("flow_grpo/dataset", "train"))
    trainer = OPDTrainer(..., prompt_source=source)      # source(task, n, seed) -> n prompts
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import numpy as np

from .cli import UserError
from .safe_files import FileError, read_text
from .tasks import TASKS
from .toy.grammar import Prompt, parse_ocr
from .toy.splits import _cycle, prompt_file


def load_geneval_metadata(path: str | Path, task: str = "geneval") -> list[Prompt]:
    """One prompt per JSON line (blank lines skipped); each line needs "prompt", "tag", "include"."""
    prompts = []
    for number, line in enumerate(read_text(path, "GenEval metadata").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            metadata = json.loads(line)
        except json.JSONDecodeError as error:
            raise FileError(f"{path}:{number}: not a line of GenEval metadata ({error.msg}; cut off?)") from None
        if not isinstance(metadata, dict):
            raise FileError(f"{path}:{number}: GenEval metadata must be one JSON object a line")
        missing = {"prompt", "tag", "include"} - set(metadata)
        if missing:
            raise ValueError(f"{path}:{number}: GenEval metadata lacks {sorted(missing)}")
        prompts.append(Prompt(metadata["prompt"], task, metadata))
    return prompts


def load_text_prompts(path: str | Path, task: str) -> list[Prompt]:
    """One prompt per non-blank line (stripped); OCR prompts must quote their text."""
    prompts = []
    for number, line in enumerate(read_text(path, f"a {task} prompt file").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        try:
            spec = parse_ocr(text) if task == "ocr" else {}
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from error
        prompts.append(Prompt(text, task, spec))
    return prompts


def load_prompts(path: str | Path, task: str) -> list[Prompt]:
    """Every prompt of a file, in file order: GenEval metadata for .jsonl, else one prompt a line."""
    if Path(path).suffix == ".jsonl":
        return load_geneval_metadata(path, task)
    return load_text_prompts(path, task)


def dataset_files(root: str | Path, split: str, tasks: tuple[str, ...] = TASKS) -> dict[str, Path]:
    """task -> prompt file of a split under a root laid out like Flow-GRPO's `dataset/` folder."""
    return {task: prompt_file(task, split, Path(root)) for task in tasks}


def prompt_source(task_to_file: dict[str, str | Path], cycle: bool = True) -> Callable[[str, int, int], list[Prompt]]:
    """A `(task, n, seed) -> n prompts` callable over the given files (read now, once).

    Draws follow `toy.sample_prompts`' contract: a seeded permutation of the file's prompts,
    re-permuted when exhausted; same seed, same prompts (fresh copies, so callers may edit them).
    Sampling is uniform over the file's lines, as Flow-GRPO's sampler is. With `cycle=False` (test
    sets) asking for more prompts than a file holds is a `TestSetTooSmall` error instead.
    """
    pools = {task: load_prompts(path, task) for task, path in task_to_file.items()}
    for task, pool in pools.items():
        if not pool:
            raise ValueError(f"no prompts in {task_to_file[task]} (task {task!r})")

    def source(task: str, n: int, seed: int) -> list[Prompt]:
        if task not in pools:
            raise ValueError(f"no prompt file for task {task!r}; files are given for {sorted(pools)}")
        if not cycle:
            check_test_size(task, n, len(pools[task]), task_to_file[task])
        return [copy.deepcopy(p) for p in _cycle(pools[task], n, np.random.default_rng(seed))]

    return source


class TestSetTooSmall(UserError):
    """More test prompts were asked for than the test file holds (a test set is never cycled)."""

    __test__ = False  # not a pytest test class, despite the name


def check_test_size(task: str, n: int, size: int, path: str | Path) -> None:
    """Refuse to draw n test prompts from a file of `size`: cycling would count prompts twice and
    report a test set that does not exist."""
    if n > size:
        raise TestSetTooSmall(
            f"{path} holds {size} test prompts for task {task!r} but {n} were asked for: a test set is never "
            f"cycled (repeated prompts would weigh twice). Ask for at most {size} (eval_prompts: {{{task}: {size}}}; "
            f"more images per prompt come from eval_samples), or point the task at a bigger test file.")


def prompts(task: str, n: int, split: str = "train", seed: int = 0, root: str | Path | None = None) -> list[Prompt]:
    """n seeded prompts of a task from a split: the toy world's shipped files (root None) or the
    files of a Flow-GRPO `dataset/` folder at `root`. What trainers and evaluation draw from.

    The test split is never cycled: more than its file holds is a `TestSetTooSmall` error. One
    exception, the toy world's GenEval test set: `toy.sample_prompts` draws it tag by tag in turn
    so that every category weighs the same, repeating the small tags' prompts by design (docs/toy_world.md;
    90 draws with seed 0 hold 56 distinct prompts), so any n is allowed there, as before."""
    if root is None:
        from .toy.splits import prompt_file, read_prompts, sample_prompts
        if split == "test" and task != "geneval":
            check_test_size(task, n, len(read_prompts(task, split)), prompt_file(task, split))
        return sample_prompts(task, n=n, split=split, seed=seed)
    return prompt_source(dataset_files(root, split), cycle=split != "test")(task, n, seed)
