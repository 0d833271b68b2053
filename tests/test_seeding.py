"""The same seed gives the same model: a trainer's fresh adapter derives from (cfg.seed, adapter name)
alone, not from whatever the global torch RNG holds, so two runs (or two ranks) of one config start
and stay identical. (The real 2-rank run is tests/test_grpo.py::test_two_ranks_match_one_process.)"""
from __future__ import annotations

import torch
import yaml

from flowopd_lib import adapters, train
from flowopd_lib.grpo import GRPOTrainer
from flowopd_lib.nft import NFTConfig, NFTTrainer
from test_grpo import tiny_cfg
from tiny import tiny_model


def _weights(model, name) -> dict[str, torch.Tensor]:
    return adapters.state_dict(model, name)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_fresh_trainers_of_one_config_are_equal_whatever_the_global_rng(tmp_path):
    cfg = tiny_cfg(tmp_path, updates=1)
    models = tiny_model(), tiny_model()
    first = GRPOTrainer(models[0], cfg)
    torch.rand(123)  # the second trainer starts from another global RNG state (no manual_seed in between)
    second = GRPOTrainer(models[1], cfg)
    a, b = _weights(first.model, cfg.adapter), _weights(second.model, cfg.adapter)
    assert _equal(a, b)
    assert any(k for k in a if "lora_A" in k) and all(a[k].abs().sum() > 0 for k in a if "lora_A" in k)
    assert all(a[k].eq(0).all() for k in a if "lora_B" in k)  # zero delta at the start
    first.run_update(0)
    second.run_update(0)
    assert _equal(_weights(first.model, cfg.adapter), _weights(second.model, cfg.adapter))


def test_different_seeds_or_names_give_different_initial_lora_a(tmp_path):
    base = GRPOTrainer(tiny_model(), tiny_cfg(tmp_path, seed=0))
    other_seed = GRPOTrainer(tiny_model(), tiny_cfg(tmp_path, seed=1))
    other_name = GRPOTrainer(tiny_model(), tiny_cfg(tmp_path, seed=0, adapter="other"))
    a = _weights(base.model, "teacher")
    b = _weights(other_seed.model, "teacher")
    c = {k.replace(".other.", ".teacher."): v for k, v in _weights(other_name.model, "other").items()}
    for key in (k for k in a if "lora_A" in k):
        assert not torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key]), key


def test_seeded_add_follows_peft_gaussian_scale_and_leaves_the_global_rng_alone():
    model = tiny_model()
    state = torch.get_rng_state()
    adapters.add(model, "x", rank=4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    lora_a = torch.cat([v.flatten() for k, v in _weights(model, "x").items() if "lora_A" in k])
    assert abs(lora_a.std().item() - 1 / 4) < 0.02  # peft's gaussian init: N(0, 1/r)
    again = tiny_model()
    adapters.add(again, "x", rank=4, seed=7)
    assert _equal(_weights(model, "x"), _weights(again, "x"))


def test_nft_old_adapter_starts_as_the_seeded_trained_one(tmp_path):
    cfg = NFTConfig(rewards={"test_brightness": 1.0}, datasets={"pickscore": 1.0}, prompts_per_update=2,
                    group_size=2, sde_steps=2, train_timesteps=1, out_dir=str(tmp_path / "nft"))
    first = NFTTrainer(tiny_model(), cfg)
    model = tiny_model()
    torch.rand(5)  # another global RNG state than the first trainer saw
    second = NFTTrainer(model, cfg)
    assert _equal(_weights(first.model, cfg.adapter), _weights(second.model, cfg.adapter))
    assert all(torch.equal(o, p) for o, p in zip(second.old_params, second.params))


def test_launch_starts_cpu_ranks_with_torchrun_and_gpus_with_accelerate(tmp_path, monkeypatch):
    """`accelerate launch` (1.x) runs ONE process for --cpu or a MULTI_CPU config file, so CPU ranks are
    started by torch.distributed.run with ACCELERATE_USE_CPU set (without it each rank's Accelerator
    sees a world of 1 and every rank trains alone)."""
    calls = []
    monkeypatch.setattr(train.subprocess, "run", lambda command, **kw: calls.append((command, kw)))
    cfg = tiny_cfg(tmp_path, out_dir=str(tmp_path / "run"))
    cpu_config = tmp_path / "cpu.yaml"
    cpu_config.write_text(yaml.safe_dump({"distributed_type": "MULTI_CPU", "use_cpu": True, "num_processes": 2}))
    train.launch("grpo", cfg, num_processes=2, accelerate_config=str(cpu_config))
    command, kwargs = calls[-1]
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert command[command.index("--nproc_per_node") + 1] == "2"
    assert command[-4:] == ["-m", "flowopd_lib.train", "grpo", str(tmp_path / "run" / "launch_config.yaml")]
    assert kwargs["env"]["ACCELERATE_USE_CPU"] == "true"
    gpu_config = tmp_path / "gpu.yaml"
    gpu_config.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_processes": 2}))
    train.launch("grpo", cfg, num_processes=2, accelerate_config=str(gpu_config))
    command, _ = calls[-1]
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and str(gpu_config) in command
