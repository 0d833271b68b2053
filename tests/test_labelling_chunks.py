"""Labelling forwards run in sub-batches of `micro_batch` (issue 33: at SD3.5-M's sizes the teachers',
anchor's, reference's and old policy's no-grad forwards took every local sample at once: 144 x CFG 2
per GPU). Chunked labels must equal the unchunked ones, and no forward may exceed the chunk."""
from __future__ import annotations

import pytest
import torch

from flowopd_lib.grpo import GRPOTrainer
from flowopd_lib.nft import NFTConfig, NFTTrainer
from flowopd_lib.opd import OPDTrainer
from test_forward_rl import tiny_cfg as forward_cfg
from test_grpo import tiny_cfg as grpo_cfg
from test_opd import opd_cfg, save_random_adapter
from tiny import tiny_model


def labels_and_largest_batch(trainer):
    """Labels of update 0 and the largest batch any transformer forward saw while labelling."""
    traj = trainer.rollout(0)
    sizes = []
    hook = trainer.model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        labels, _ = trainer.label(traj, 0)
    finally:
        hook.remove()
    return labels, max(sizes)


def build(kind: str, tmp_path, micro_batch):
    if kind == "opd":
        teachers = {"geneval": save_random_adapter(tmp_path, "teach_g", 1), "ocr": save_random_adapter(tmp_path, "teach_o", 2)}
        cfg = opd_cfg(tmp_path, teachers, micro_batch=micro_batch, mar_lambda=0.02, group_size=3)
        return OPDTrainer(tiny_model(), cfg)
    if kind == "grpo":
        return GRPOTrainer(tiny_model(), grpo_cfg(tmp_path, micro_batch=micro_batch, cfg_scale=2.0))
    return NFTTrainer(tiny_model(), forward_cfg(NFTConfig, tmp_path, micro_batch=micro_batch, beta=0.1, cfg_scale=2.0))


@pytest.mark.parametrize("kind", ["opd", "grpo", "nft"])
def test_labels_in_chunks_equal_labels_at_once(tmp_path, kind):
    whole, largest_whole = labels_and_largest_batch(build(kind, tmp_path / "a", None))
    chunked, largest = labels_and_largest_batch(build(kind, tmp_path / "b", 2))
    assert largest <= 2 * 2 < largest_whole  # CFG doubles the batch
    assert whole.keys() == chunked.keys()
    for key in whole:
        assert torch.allclose(whole[key], chunked[key], atol=1e-5), key
