"""The shipped toy prompt sets: fixed train/test splits in Flow-GRPO's file formats.

    assets/prompts/geneval/{train,test}_metadata.jsonl   GenEval metadata, one JSON per line
    assets/prompts/ocr/{train,test}.txt                  one prompt per line, text in "quotes"
    assets/prompts/pickscore/{train,test}.txt            one free-form prompt per line

deqa uses the pickscore files (general prompts) with the task label "deqa". Test prompts never
appear in train; for ocr the quoted texts are disjoint too. OCR's test file is two blocks: the
first 200 prompts, then 200 more (`OCR_TEST_EXTENSION`, drawn after both splits with a seed of
their own) that an evaluation able to decide needs (docs/toy_world.md); a draw takes each block's
permutation in turn, so a draw of up to 200 is the one made before the extension existed. GenEval's small tags have only a
few distinct toy prompts (4 single objects), so each tag is split in half (at most 40 test
prompts a tag) and `sample_prompts` draws geneval prompts tag by tag in turn, which weighs the
six categories equally as GenEval's overall score does.

`python -m flowopd_lib.toy.splits` rewrites the files (deterministic).
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from .grammar import (GENEVAL_TAGS, TASKS, Prompt, all_geneval_prompts, check_task, parse_prompt,
                      random_freeform, random_ocr, random_prompt)

PROMPT_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"
SPLITS = ("train", "test")
SPLIT_SEED = 20260508
N_OCR = {"train": 1000, "test": 200}
N_PICKSCORE = {"train": 1000, "test": 200}
MAX_GENEVAL_TEST_PER_TAG = 40
# OCR test prompts after the first N_OCR["test"]: the train file and the first block stay as they were.
OCR_TEST_EXTENSION = 200


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")


def prompt_file(task: str, split: str, root: Path = PROMPT_DIR) -> Path:
    check_task(task)
    check_split(split)
    if task == "geneval":
        return root / "geneval" / f"{split}_metadata.jsonl"
    return root / ("pickscore" if task == "deqa" else task) / f"{split}.txt"


def read_prompts(task: str, split: str, root: Path = PROMPT_DIR) -> list[Prompt]:
    """All prompts of a split, in file order, with specs (jsonl metadata or parsed text)."""
    lines = prompt_file(task, split, Path(root)).read_text().splitlines()
    if task == "geneval":
        return [Prompt(m["prompt"], task, m) for m in map(json.loads, lines)]
    return [parse_prompt(line, task) for line in lines]


@lru_cache(maxsize=None)
def _cached(task: str, split: str) -> tuple[Prompt, ...]:
    return tuple(read_prompts(task, split))


def _cycle(items: list, n: int, rng: np.random.Generator) -> list:
    """n items from a seeded permutation, starting over (re-permuted) when exhausted."""
    out = []
    while len(out) < n:
        out += [items[i] for i in rng.permutation(len(items))]
    return out[:n]


def sample_prompts(task: str, n: int, split: str = "train", seed: int = 0) -> list[Prompt]:
    """n prompts of a task from a shipped split; same seed, same prompts (fresh copies)."""
    check_task(task)
    check_split(split)
    rng = np.random.default_rng(seed)
    prompts = list(_cached(task, split))
    if task == "geneval":  # tag by tag in turn: equal weight per GenEval category
        by_tag = [[p for p in prompts if p.spec["tag"] == t] for t in GENEVAL_TAGS]
        per_tag = [_cycle(ps, -(-n // len(GENEVAL_TAGS)), rng) for ps in by_tag]
        chosen = [per_tag[i % len(GENEVAL_TAGS)][i // len(GENEVAL_TAGS)] for i in range(n)]
    else:  # each block of the file permuted, in turn; past the end, the whole file re-permuted
        chosen = [p for block in _blocks(task, split, prompts) for p in _cycle(block, len(block), rng)]
        chosen = chosen[:n] if n <= len(chosen) else chosen + _cycle(prompts, n - len(chosen), rng)
    return [copy.deepcopy(p) for p in chosen]


def _blocks(task: str, split: str, prompts: list) -> list[list]:
    """The file's blocks in draw order: OCR's test file is its first N_OCR["test"] prompts, then the
    extension; every other file is one block."""
    if task == "ocr" and split == "test" and len(prompts) > N_OCR["test"]:
        return [prompts[:N_OCR["test"]], prompts[N_OCR["test"]:]]
    return [prompts]


def held_out_key(task: str):
    """What a training prompt may never share with a test prompt: for ocr the quoted text, else the text."""
    return (lambda p: p.spec["text"]) if task == "ocr" else (lambda p: p.text)


def fresh_prompts(task: str, n: int, seed: int = 0) -> list[Prompt]:
    """n new prompts of a task straight from the grammar, never one a test prompt shares its key with
    (`held_out_key`): a training set without end, where the shipped one has 1000 prompts (ocr,
    pickscore) that a long fine-tune could memorise. A toy-world privilege, as the renders are."""
    if task == "geneval":
        raise ValueError("geneval's toy prompts are few and all in the shipped splits; fresh prompts exist "
                         "for ocr, pickscore and deqa")
    key = held_out_key(task)
    return unique_prompts(lambda rng: random_prompt(task, rng), n, np.random.default_rng(seed), key,
                          {key(p) for p in _cached(task, "test")})


# ----------------------------------------------------------------------------- writing

def geneval_splits(rng: np.random.Generator) -> dict[str, list[Prompt]]:
    out = {"train": [], "test": []}
    for tag in GENEVAL_TAGS:
        prompts = all_geneval_prompts(tag)
        order = rng.permutation(len(prompts))
        n_test = min(len(prompts) // 2, MAX_GENEVAL_TEST_PER_TAG)
        out["test"] += [prompts[i] for i in order[:n_test]]
        out["train"] += [prompts[i] for i in order[n_test:]]
    return out


def unique_prompts(make, n: int, rng: np.random.Generator, key, taken: set) -> list[Prompt]:
    """n prompts from `make(rng)` whose key is not in `taken` (which it grows)."""
    out = []
    while len(out) < n:
        p = make(rng)
        if key(p) not in taken:
            taken.add(key(p))
            out.append(p)
    return out


def write_splits(root: Path = PROMPT_DIR, seed: int = SPLIT_SEED) -> dict[str, int]:
    """Write every prompt file; returns the number of lines per file."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, prompts in geneval_splits(rng).items():
        files[prompt_file("geneval", split, root)] = [json.dumps(p.spec) for p in prompts]
    taken_texts, taken_prompts = set(), set()
    for split in ("test", "train"):  # test first so it gets the same draws whatever train's size
        ocr = unique_prompts(random_ocr, N_OCR[split], rng, lambda p: p.spec["text"], taken_texts)
        free = unique_prompts(random_freeform, N_PICKSCORE[split], rng, lambda p: p.text, taken_prompts)
        files[prompt_file("ocr", split, root)] = [p.text for p in ocr]
        files[prompt_file("pickscore", split, root)] = [p.text for p in free]
    extension = unique_prompts(random_ocr, OCR_TEST_EXTENSION, np.random.default_rng(seed + 1),
                               lambda p: p.spec["text"], taken_texts)  # texts of neither split
    files[prompt_file("ocr", "test", root)] += [p.text for p in extension]
    for path, lines in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    return {str(path.relative_to(root)): len(lines) for path, lines in files.items()}


if __name__ == "__main__":
    for name, count in write_splits().items():
        print(f"{name}: {count} prompts")
