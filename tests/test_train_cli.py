"""The trainers' command line (what `accelerate launch -m flowopd_lib.train` runs)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from flowopd_lib import adapters, teachers, train
from flowopd_lib.config import ConfigError
from flowopd_lib.grpo import GRPOConfig
from guards import refused, tree
from tiny import tiny_model

TINY_RUN = {"rewards": {"geneval": 1.0}, "datasets": {"geneval": 1.0}, "prompts_per_update": 2, "group_size": 2,
            "sde_steps": 2, "updates": 1}


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
    said = refused(capsys, train.main, ["grpo", str(tmp_path / "run.yaml"), "lrr=0.1"])
    assert "unknown GRPOConfig key(s): 'lrr' (did you mean 'lr'?)" in said
    said = refused(capsys, train.main, ["grpo", "updats=1"])  # overrides alone, without a YAML file
    assert "unknown GRPOConfig key(s): 'updats'" in said
    assert not trained
    train.main(["grpo", "updates=2", "lr=0.5"])
    assert trained[0].updates == 2 and trained[0].lr == 0.5


def no_training(monkeypatch) -> list:
    """Make `train.main` record the configs it would train, training nothing."""
    trained = []
    monkeypatch.setattr(train, "trainer_for", lambda stage: (GRPOConfig, lambda cfg, eval_fn=None: trained.append(cfg)))
    return trained


def test_training_into_a_finished_run_without_checkpoints_is_refused(tmp_path, monkeypatch, capsys):
    """Issue 35 #4: a run into the directory of a finished run whose checkpoints had been cleaned
    replaced its adapter, config and metrics. Now it is refused in one line naming --force and
    another out_dir; --force moves the old run to a dated backup beside it and trains afresh."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    model = tiny_model()
    adapters.add(model, "teacher", rank=2)
    adapters.save(model, "teacher", run / "adapter", {"updates": 3})
    (run / "config.yaml").write_text(GRPOConfig(**{**TINY_RUN, "updates": 3}, out_dir=str(run)).to_yaml())
    (run / "metrics.csv").write_text("step,reward\n1,0.1\n2,0.2\n3,0.3\n")
    base = tiny_model().save(tmp_path / "base")
    config = tmp_path / "other.yaml"  # another run's settings, pointed at the finished run by mistake
    config.write_text(yaml.safe_dump({**TINY_RUN, "base": str(base), "lr": 0.01, "out_dir": str(run)}))
    finished = tree(run)
    said = refused(capsys, train.main, ["grpo", str(config)])
    assert str(run) in said and "--force" in said and "out_dir" in said
    assert tree(run) == finished
    train.main(["grpo", str(config), "--force"])
    kept = list(tmp_path.glob("run.previous-*"))
    assert len(kept) == 1 and tree(kept[0]) == finished
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.01 and (run / "checkpoints").exists()


def test_a_broken_or_misshapen_config_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """Issue 35 #6: a YAML syntax error gave a long yaml traceback without the file's name; a config
    that is a list or a string gave TypeError or nonsense keys."""
    trained = no_training(monkeypatch)
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.01\nrewards: {geneval: 1.0\nupdates: 3\n")
    said = refused(capsys, train.main, ["grpo", str(config)])
    assert f"{config}:" in said and "YAML" in said  # the file and the line
    for text in ("- lr: 0.01\n- updates: 3\n", "lr 0.01\n"):
        config.write_text(text)
        said = refused(capsys, train.main, ["grpo", str(config)])
        assert str(config) in said and "mapping" in said
    with pytest.raises(ConfigError, match=str(config)):
        GRPOConfig.from_yaml(config)
    assert not trained


def test_inputs_are_checked_before_any_compute(tmp_path, monkeypatch, capsys):
    """Issue 35 #7: task_rewards naming an unknown reward answered with a misleading error after a
    rollout; a rewards/datasets mismatch and a missing prompt_root only at the first update."""
    trained = no_training(monkeypatch)
    for bad, named in [({"task_rewards": {"geneval": "genevall"}, "reward_routing": "task"}, "genevall"),
                       ({"rewards": {"ocr": 1.0}}, "geneval"),
                       ({"rewards": {"ocr": 1.0, "geneval": 1.0}, "reward_routing": "task",
                         "task_rewards": {"geneval": "pickscore"}}, "pickscore"),
                       ({"prompt_root": str(tmp_path / "no_dataset")}, "no_dataset")]:
        overrides = [f"{k}={json.dumps(v)}" for k, v in {**TINY_RUN, **bad}.items()]
        said = refused(capsys, train.main, ["grpo", *overrides, f"out_dir={tmp_path / 'run'}"])
        assert named in said, said
    assert not trained and not (tmp_path / "run").exists()


def test_a_user_error_is_one_line_exit_2_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    """Issue 35 #13: `train` and `teachers` printed their clear ConfigError under a long traceback."""
    said = refused(capsys, teachers.main, ["train", "geneval", "--out", str(tmp_path / "t"), "-c", "updates=2.5"])
    assert "updates=2.5" in said
    no_training(monkeypatch)
    said = refused(capsys, train.main, ["grpo", "lr=fast"])
    assert "lr='fast'" in said and "float" in said
    with pytest.raises(ConfigError, match="lr='fast'"):
        train.main(["grpo", "lr=fast", "--debug"])
    monkeypatch.setenv("FLOWOPD_DEBUG", "1")
    with pytest.raises(ConfigError, match="lr='fast'"):
        train.main(["grpo", "lr=fast"])
    monkeypatch.delenv("FLOWOPD_DEBUG")
    done = subprocess.run([sys.executable, "-m", "flowopd_lib.train", "grpo", "lr=fast"], capture_output=True,
                          text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "lr='fast'" in done.stderr, done.stderr


@pytest.mark.parametrize("threads, ranks, per_rank", [("2", 2, "1"), ("8", 2, "4"), ("1", 3, "1"), ("5", 2, "2")])
def test_cpu_ranks_share_the_threads_they_were_given(monkeypatch, threads, ranks, per_rank):
    # Without the split, two ranks each inherit the runner's two threads for a lone stage: four threads
    # on two cores, slower than one process.
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    command, env = train.cpu_ranks_command(ranks, ["-c", "pass"])
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == per_rank
    assert command[command.index("--nproc_per_node") + 1] == str(ranks)


def test_cpu_ranks_without_a_thread_setting_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    _, env = train.cpu_ranks_command(3, ["-c", "pass"])
    assert env["OMP_NUM_THREADS"] == "2"


def test_auto_processes_are_cpu_ranks_one_per_given_thread_and_one_process_beside_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for threads, expected in (("2", 2), ("1", 1), ("8", 8)):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        assert train.processes("auto") == expected
        assert train.rank_threads(expected) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.processes("auto") == 1
    assert train.processes(4) == 4


@pytest.mark.parametrize("bad", [0, -1, "two", 2.5, True, None])
def test_a_process_count_that_is_not_a_count_or_auto_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="num_processes") as error:
        train.processes(bad)
    assert repr(bad) in str(error.value) and "'auto'" in str(error.value)
