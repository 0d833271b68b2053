"""The SD3.5-M spec's shapes on 4 real gloo ranks, for every trainer, with a resume (issue 33).

papermill_runs/sd35m.yaml trains on 8 GPUs with a 3:1:1 task mix, 48 prompts x 24 images per update,
rollout chunks, micro-batches and MAR anchored on a teacher adapter. Here the same structure, shrunk
to run on 2 CPU cores with the tiny random SD3 (the real SD3 code path: CLIP + T5 + MMDiT + VAE):

    4 ranks, 12 prompts per update in a 3:1:1 geneval:ocr:pickscore mix, so the ranks hold different
    task mixes (3 prompts each, laid out task by task), group size 3 (9 trajectories per rank),
    rollout_chunks 2 and micro_batch 2 (neither divides 9), 2 minibatches, CFG 4.5, shift 3;
    GRPO / NFT / AWM: OCR rewards constant, so some ranks have no signal in some minibatches;
    OPD: three teachers, MAR on a fourth adapter (the DeQA teacher's role).

Each trainer evaluates while training (sharded over the ranks, distributed_eval), runs 2 updates on
4 ranks, stops, is relaunched for a 3rd update (resuming from its
checkpoint, in new processes), and must end where one process running 3 updates ends (float
summation order aside). TORCH_DISTRIBUTED_DEBUG=DETAIL makes a mismatched collective an error.
Marked `ranks` (about 5 minutes on 2 cores): `make dryrun` runs them, and so does CI.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowopd_lib import adapters, checkpoint
from test_ranks import run_ranks

pytestmark = pytest.mark.ranks

SHAPES = dict(datasets={"geneval": 3, "ocr": 1, "pickscore": 1}, prompts_per_update=12, group_size=3, sde_steps=3,
              train_fraction=0.67, rollout_chunks=2, micro_batch=2, minibatches=2, cfg_scale=4.5, shift=3.0,
              lora_rank=4, lora_alpha=8.0, lr=1e-2, checkpoint_every=1, seed=42, ema_decay=0.9,
              # evaluation during training, sharded over the ranks: 3 prompts x 2 samples per task in
              # batches of 2 (9 batches over 4 ranks: 3/2/2/2), judged by a continuous test reward
              eval_every=2, eval_prompts=3, eval_samples=2, eval_steps=2, eval_cfg=4.5, eval_batch_size=2,
              task_rewards={"geneval": "test_brightness", "ocr": "test_brightness", "pickscore": "test_brightness"})
REWARDED = dict(rewards={"test_constant_on_ocr": 1.0})
CONFIGS = {
    "grpo": {**SHAPES, **REWARDED, "beta": 0.04},
    "nft": {**SHAPES, **REWARDED, "train_timesteps": 2, "beta": 1e-4},
    "awm": {**SHAPES, **REWARDED, "train_timesteps": 2, "beta": 1e-3},
}


def tiny_sd3_teachers(tmp_path: Path) -> dict[str, str]:
    """Random-delta adapters on the tiny SD3, saved as the geneval/ocr/pickscore/deqa teachers."""
    from flowopd_lib.models import SD3FlowModel, tiny_sd3_pipeline

    model = SD3FlowModel.from_pipeline(tiny_sd3_pipeline())
    out = {}
    for i, task in enumerate(("geneval", "ocr", "pickscore", "deqa")):
        adapters.add(model, f"t_{task}", rank=4, gaussian_init=False, seed=i + 1)
        with torch.no_grad():  # a small delta: teachers near the base, as real ones are
            for p in adapters.parameters(model, f"t_{task}"):
                p.mul_(0.1)
        out[task] = str(adapters.save(model, f"t_{task}", tmp_path / "teachers" / task))
    return out


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    path = checkpoint.latest(run_dir / "checkpoints")
    return checkpoint.load(path, restore_rng=False)["adapter"]


@pytest.mark.parametrize("stage", ["grpo", "nft", "awm", "opd"])
def test_sd35m_shapes_on_four_ranks_with_a_resume_match_one_process(tmp_path, stage):
    if stage == "opd":
        teachers = tiny_sd3_teachers(tmp_path)
        config = {**SHAPES, "teachers": {t: teachers[t] for t in ("geneval", "ocr", "pickscore")},
                  "mar_lambda": 0.02, "anchor": teachers["deqa"]}
    else:
        config = CONFIGS[stage]
    spec = {"trainer": stage, "model": "tiny_sd3", "evaluate": True}
    first = run_ranks(tmp_path, "four", {**spec, "config": {**config, "updates": 2}}, ranks=4, timeout=400)
    assert [r["update"] for r in first] == [2] * 4 and {r["world"] for r in first} == {4}
    resumed = run_ranks(tmp_path, "four", {**spec, "config": {**config, "updates": 3}}, ranks=4, timeout=400)
    assert [r["update"] for r in resumed] == [3] * 4
    for key, value in resumed[0]["metrics"].items():  # every rank reports the same global metrics
        if not key.startswith("time/"):  # (each rank's own wall time)
            assert all(r["metrics"][key] == value for r in resumed), key
    one = run_ranks(tmp_path, "one", {**spec, "config": {**config, "updates": 3}}, ranks=1, timeout=400)[0]
    assert one["update"] == 3
    evaluated = [k for k in one["metrics"] if k.startswith("eval/")]
    assert {"eval/geneval", "eval/ocr", "eval/pickscore"} <= set(evaluated)
    for key in evaluated:  # the sharded evaluation of the final adapter, gathered, as one process
        assert resumed[0]["metrics"][key] == pytest.approx(one["metrics"][key], rel=0.02, abs=1e-4), key

    four, single = final_adapter(tmp_path / "four"), final_adapter(tmp_path / "one")
    start = torch.load(tmp_path / "one_report" / "initial0.pt")  # the fresh run's initial adapter
    assert single.keys() == four.keys() == start.keys()
    for key in single:
        moved = (single[key] - start[key]).abs().max()
        gap = (four[key] - single[key]).abs().max()
        # summation order (gloo vs one process) and Adam's normalisation of near-zero gradients make
        # the runs differ slightly; a rank left out of a reduction would differ by about a whole step
        assert gap <= 0.05 * moved + 1e-6, f"{key}: 4 ranks end {gap:.2e} from one process (moved {moved:.2e})"
