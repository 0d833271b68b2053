"""The trainers' command line (what `accelerate launch -m flowopd_lib.train` runs)."""
import pytest
import torch
import yaml

from flowopd_lib import train
from flowopd_lib.config import ConfigError
from flowopd_lib.grpo import GRPOConfig
from tiny import tiny_model


def test_cli_trains_a_stage_from_yaml_with_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = tiny_model().save(tmp_path / "base")
    config = {"base": str(base), "rewards": {"geneval": 1.0}, "datasets": {"geneval": 1.0}, "prompts_per_update": 2,
              "group_size": 2, "sde_steps": 2, "updates": 5, "out_dir": str(tmp_path / "run")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    train.main(["grpo", str(tmp_path / "run.yaml"), "updates=1", "adapter=cli"])
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["updates"] == 1 and saved["adapter"] == "cli"
    assert (tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").exists()
    train.main(["opd", "--help-config"])
    assert "objective" in capsys.readouterr().out


def test_cli_evaluates_during_training(tmp_path, monkeypatch):
    """`eval_every` of a launched job is not a silent no-op: the CLI evaluates with the config's
    eval_* protocol (sharded over the job's processes; one here) and logs eval/<metric>."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = tiny_model().save(tmp_path / "base")
    config = {"base": str(base), "rewards": {"geneval": 1.0}, "datasets": {"geneval": 1.0}, "prompts_per_update": 2,
              "group_size": 2, "sde_steps": 2, "updates": 2, "eval_every": 1, "eval_prompts": 2, "eval_steps": 2,
              "out_dir": str(tmp_path / "run")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    train.main(["grpo", str(tmp_path / "run.yaml")])
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert "eval/geneval" in header and len(lines) == 3  # both updates evaluated
    column = header.index("eval/geneval")
    assert all(line.split(",")[column] != "" for line in lines[1:])


def test_launch_writes_the_config_and_runs_it_in_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    base = tiny_model().save(tmp_path / "base")
    cfg = GRPOConfig(base=str(base), rewards={"ocr": 1.0}, datasets={"ocr": 1.0}, prompts_per_update=2, group_size=2,
                     sde_steps=2, updates=1, out_dir=str(tmp_path / "launched"))
    train.launch("grpo", cfg)
    assert (tmp_path / "launched" / "launch_config.yaml").exists()
    assert (tmp_path / "launched" / "adapter" / "adapter.json").exists()


def test_cli_refuses_an_override_without_equals_and_an_unknown_key(tmp_path, capsys, monkeypatch):
    """`train grpo run.yaml lr` used to train with lr=None; a typo'd key must not fall back to a default."""
    trained = []
    monkeypatch.setattr(train, "trainer_for",  # nothing trains here
                        lambda stage: (GRPOConfig, lambda cfg, eval_fn=None: trained.append(cfg)))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"updates": 1}))
    with pytest.raises(SystemExit):
        train.main(["grpo", str(tmp_path / "run.yaml"), "lr"])
    assert "override 'lr' is not key=value: write e.g. lr=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["grpo", str(tmp_path / "run.yaml"), "updates=2", "=3"])
    assert "override '=3' is not key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["grpo", "lr"])  # no YAML file of that name either
    assert "'lr' is neither a config file (no such file) nor a key=value override" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"unknown GRPOConfig key\(s\): 'lrr' \(did you mean 'lr'\?\)"):
        train.main(["grpo", str(tmp_path / "run.yaml"), "lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown GRPOConfig key\(s\): 'updats'"):
        train.main(["grpo", "updats=1"])  # overrides alone, without a YAML file
    assert not trained
    train.main(["grpo", "updates=2", "lr=0.5"])
    assert trained[0].updates == 2 and trained[0].lr == 0.5
