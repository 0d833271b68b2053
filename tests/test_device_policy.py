"""The device and dtype policy of the trainers (issue 33, defects 3 and 6; precision.py).

Defect 6: on GPU the base is bf16 and peft casts a new adapter to its base layer's dtype, so LoRA
weights, their gradients, AdamW and EMA state were bf16: an Adam step of ~3e-4 on a weight of std
~1/32 is a few bf16 ulps, and an EMA at decay 0.999 stops moving. Trainable state must be float32.
Defect 3: `checkpoint.load` had no map_location: every rank loaded onto the device the state was
saved from (cuda:0). A checkpoint is also never allowed to run code when loaded (weights_only).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flowopd_lib import adapters, checkpoint, precision
from flowopd_lib.grpo import GRPOTrainer
from test_grpo import tiny_cfg


def bf16_tiny_sd3():
    from flowopd_lib.models import SD3FlowModel, tiny_sd3_pipeline

    pipeline = tiny_sd3_pipeline()
    pipeline.transformer.to(torch.bfloat16)
    for encoder in (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3):
        encoder.to(torch.bfloat16)
    return SD3FlowModel.from_pipeline(pipeline)


def test_trainable_state_is_float32_on_a_bf16_base(tmp_path):
    model = bf16_tiny_sd3()
    trainer = GRPOTrainer(model, tiny_cfg(tmp_path, updates=1, sde_steps=2, train_fraction=0.5, lr=1e-2))
    frozen = [p for n, p in model.transformer.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in frozen} == {torch.bfloat16}  # the base stays bf16
    assert precision.non_float32(adapters.named_parameters(model, trainer.cfg.adapter)) == []
    trainer.train()
    named = adapters.named_parameters(model, trainer.cfg.adapter)
    assert precision.non_float32(named) == []  # parameters and their gradients
    adam = [v for state in trainer.opt.state.values() for v in state.values() if torch.is_tensor(v) and v.ndim]
    assert adam and {v.dtype for v in adam} == {torch.float32}
    assert {p.dtype for p in trainer.ema.shadow_params} == {torch.float32}


def test_a_step_below_one_bf16_ulp_is_kept(tmp_path):
    """An update of 1e-5 on a weight of ~0.1 (a bf16 ulp there is ~5e-4) must change the weight."""
    model = bf16_tiny_sd3()
    trainer = GRPOTrainer(model, tiny_cfg(tmp_path, updates=1))
    p = trainer.params[0]
    with torch.no_grad():
        p.fill_(0.1)
    before = p.detach().clone()
    with torch.no_grad():
        p.add_(1e-5)
    assert not torch.equal(p.detach(), before)


def test_a_bf16_forward_still_matches_the_float32_adapter(tmp_path):
    """peft runs a float32 LoRA on a bf16 layer (the branch in float32, the sum in bf16)."""
    model = bf16_tiny_sd3()
    trainer = GRPOTrainer(model, tiny_cfg(tmp_path, updates=1))
    x = torch.randn(2, *model.latent_shape)
    with torch.no_grad():
        v = model.velocity(x, torch.tensor(0.5), model.encode_prompts(["a cat", "red square"]))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert trainer.params[0].dtype == torch.float32


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_loads_onto_the_given_device(tmp_path):
    checkpoint.save(tmp_path, 1, {"adapter": {"w": torch.ones(3)}, "ema": {"shadow_params": [torch.zeros(2)]}})
    state = checkpoint.load(tmp_path / "step_0000001", restore_rng=False, map_location="meta")
    assert state["adapter"]["w"].device.type == "meta"
    assert state["ema"]["shadow_params"][0].device.type == "meta"


def test_trainer_resumes_onto_its_own_device(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, updates=1)
    from tiny import tiny_model

    GRPOTrainer(tiny_model(), cfg).train()
    seen = {}
    real = checkpoint.load_latest

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_latest", spy)
    trainer = GRPOTrainer(tiny_model(), cfg.replace(updates=2))
    trainer.resume()
    assert seen.get("map_location") == trainer.acc.device
    assert trainer.update == 1
    devices = {p.device for p in trainer.ema.shadow_params} | {p.device for p in trainer.params}
    assert devices == {trainer.acc.device}


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/flowopd_checkpoint_ran_code")


def test_a_crafted_checkpoint_never_runs_code(tmp_path):
    MARKER.unlink(missing_ok=True)
    target = tmp_path / "step_0000001"
    target.mkdir()
    torch.save({"step": 1, "payload": RunsCode()}, target / "state.pt")
    with pytest.raises(checkpoint.CheckpointError, match="unsafe"):
        checkpoint.load_latest(tmp_path)
    assert not MARKER.exists()


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    checkpoint.save(tmp_path, 1, {"update": 1})
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    checkpoint.load(tmp_path / "step_0000001", restore_rng=True)
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and (got[1] == expected[1]).all() and got[2] == expected[2]


def test_a_new_adapter_is_float32_on_a_bf16_base():
    """Merges and SFT (coldstart.py) add adapters without a trainer: the policy lives in adapters.add."""
    model = bf16_tiny_sd3()
    params = adapters.add(model, "fresh", rank=4, seed=0)
    assert {p.dtype for p in params} == {torch.float32}


def test_checkpoint_loads_onto_accelerates_cpu_device(tmp_path):
    """accelerate's CPU ranks name their device cpu:0, which torch.load cannot map to by itself."""
    checkpoint.save(tmp_path, 1, {"adapter": {"w": torch.ones(3)}})
    state = checkpoint.load(tmp_path / "step_0000001", restore_rng=False, map_location=torch.device("cpu", 0))
    assert state["adapter"]["w"].device.type == "cpu"


def test_text_encoders_can_stay_on_the_cpu_and_embeddings_follow_the_transformer(tmp_path):
    """`text_encoders_on_cpu` (24-48 GB GPUs): the encoders go to the CPU in float32, embeddings come
    back in the transformer's device and dtype, and a training update runs. (On this CPU-only box the
    transformer is on the CPU too: what it frees on a GPU is estimate.py's, not measured.)"""
    model = bf16_tiny_sd3()
    trainer = GRPOTrainer(model, tiny_cfg(tmp_path, updates=1, sde_steps=2, train_fraction=0.5,
                                          text_encoders_on_cpu=True))
    assert {p.dtype for p in model.text_encoder_3.parameters()} == {torch.float32}
    embeds = model.encode_prompts(["a cat"])
    assert embeds.tokens.dtype == torch.bfloat16 and embeds.tokens.device == model.device
    trainer.train()


def test_an_sd3_base_loads_on_the_launchers_gpu_for_this_rank(monkeypatch):
    """Each rank of `accelerate launch` / torchrun gets LOCAL_RANK; the base goes to that GPU (it was
    left on the CPU, where the notebooks then evaluated), and to the CPU without a GPU."""
    from flowopd_lib import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert models.process_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.process_device() == torch.device("cpu")
