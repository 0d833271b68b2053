"""Trainers on real gloo ranks holding UNEVEN work (defects 1 and 2 of issue 33).

Every collective must run the same number of times, in the same order and shapes, on every rank,
whatever that rank holds. Symmetric splits hide a per-rank trip count; these tests give ranks
different task mixes (OPD: one rank holds two tasks, the other one) and ranks without any training
signal (GRPO: one rank's groups all have equal rewards), run them as torch.distributed.run ranks with
TORCH_DISTRIBUTED_DEBUG=DETAIL (which also checks that paired collectives agree), and compare their
metrics with one process. A hang fails the test at the subprocess timeout instead of blocking.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowopd_lib import adapters, train
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "rank_worker.py"


def run_ranks(tmp_path: Path, name: str, spec: dict, ranks: int, timeout: int = 240) -> list[dict]:
    """Run rank_worker.py on `ranks` gloo ranks (1 = a plain process); the per-rank reports."""
    report = tmp_path / f"{name}_report"
    spec = {**spec, "report": str(report),
            "config": {**spec["config"], "out_dir": str(tmp_path / name)}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    if ranks == 1:
        command, env = [sys.executable, str(WORKER), str(path)], None
    else:
        command, env = train.cpu_ranks_command(ranks, [str(WORKER), str(path)])
    env = {**(env or __import__("os").environ), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TORCH_DISTRIBUTED_DEBUG": "DETAIL"}
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{ranks} ranks of {name} did not finish in {timeout} s: a collective is waiting for a "
                    "rank that never calls it")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(ranks)]


def saved_teacher(tmp_path: Path, task: str, seed: int) -> str:
    """A random-delta adapter on the tiny model, saved as a teacher."""
    model = tiny_model()
    adapters.add(model, f"t_{task}", rank=4, gaussian_init=False, seed=seed)
    return str(adapters.save(model, f"t_{task}", tmp_path / f"teacher_{task}"))


def test_opd_ranks_with_different_task_mixes_match_one_process(tmp_path):
    """3:1 geneval:ocr over 4 prompts on 2 ranks: rank 0 holds [geneval, geneval], rank 1
    [geneval, ocr]. Before the fix `kl_metrics` reduced once per *local* task (rank 0 once, rank 1
    twice): the ranks stopped with a false NonFiniteError, or each reported another task's KL."""
    teachers = {"geneval": saved_teacher(tmp_path, "geneval", 1), "ocr": saved_teacher(tmp_path, "ocr", 2)}
    config = dict(teachers=teachers, datasets={"geneval": 3, "ocr": 1}, prompts_per_update=4, group_size=2,
                  sde_steps=3, train_fraction=0.67, updates=2, lr=1e-2, checkpoint_every=1, mar_lambda=0.02)
    spec = {"trainer": "opd", "model": "toy_tiny", "config": config}
    two = run_ranks(tmp_path, "opd2", spec, ranks=2)
    one = run_ranks(tmp_path, "opd1", spec, ranks=1)[0]
    for task in ("geneval", "ocr"):
        key = f"teacher_kl/{task}"
        assert two[0]["metrics"][key] == two[1]["metrics"][key]  # every rank reports the global value
        assert two[0]["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-3)


def test_grpo_rank_without_signal_joins_every_collective(tmp_path):
    """geneval + ocr over 2 prompts on 2 ranks, OCR rewards constant: rank 1's groups have no
    spread, so it runs no micro-batch. Before the fix it made none of the per-metric reductions
    the other rank made at the end of the update: both ranks hung."""
    config = dict(rewards={"test_constant_on_ocr": 1.0}, datasets={"geneval": 1, "ocr": 1}, prompts_per_update=2,
                  group_size=4, sde_steps=3, train_fraction=0.67, updates=2, lr=3e-2, checkpoint_every=1)
    spec = {"trainer": "grpo", "model": "toy_tiny", "config": config}
    two = run_ranks(tmp_path, "grpo2", spec, ranks=2, timeout=180)
    one = run_ranks(tmp_path, "grpo1", spec, ranks=1)[0]
    assert two[0]["update"] == two[1]["update"] == 2
    assert two[0]["metrics"]["zero_spread_fraction"] == pytest.approx(0.5)
    for key in ("loss", "clip_fraction", "ratio_dev", "kl_ref"):
        assert two[0]["metrics"][key] == two[1]["metrics"][key]  # every rank reports the global value
        # after one Adam step at lr 3e-2 the two runs' adapters differ by float summation order, and
        # these metrics are tiny (~1e-5): a rank left out of the reduction would be off by ~half
        assert two[0]["metrics"][key] == pytest.approx(one["metrics"][key], rel=0.05, abs=1e-7)
