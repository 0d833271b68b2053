"""Command-line entry of the trainers, for `accelerate launch` on one or many GPUs (or CPU ranks).

    python -m flowopd_lib.train grpo run.yaml [key=value ...]
    accelerate launch --config_file papermill_runs/accelerate/multi_gpu.yaml -m flowopd_lib.train opd run.yaml
    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 -m flowopd_lib.train opd run.yaml  # CPU ranks

The YAML holds the stage's config fields (`GRPOConfig` / `OPDConfig`; see `--help-config`);
`key=value` pairs override them (values read as YAML). Every input is checked before any compute
(a mistake is one line, exit status 2; --debug shows the traceback). A run directory continues
from its checkpoints; one this config would replace instead (a finished run whose checkpoints are
gone, another config's run) is refused unless `--force` moves it to `<out_dir>.previous-<date>`.
Notebooks call this through `launch(...)` when a stage asks for several processes, so the same
stage runs in a notebook on a laptop and as a distributed job on a node.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from . import cli
from .safe_files import read_mapping

TRAINERS = {"grpo": ("flowopd_lib.grpo", "GRPOConfig", "train_grpo"),
            "nft": ("flowopd_lib.nft", "NFTConfig", "train_nft"),
            "awm": ("flowopd_lib.awm", "AWMConfig", "train_awm"),
            "opd": ("flowopd_lib.opd", "OPDConfig", "train_opd")}


def trainer_for(stage: str):
    """(config class, train function) of a stage name (`TRAINERS`)."""
    import importlib

    if stage not in TRAINERS:
        raise SystemExit(f"unknown stage {stage!r}; choose one of {sorted(TRAINERS)}")
    module, config_name, train_name = TRAINERS[stage]
    mod = importlib.import_module(module)
    return getattr(mod, config_name), getattr(mod, train_name)


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("stage", choices=sorted(TRAINERS))
    parser.add_argument("config", nargs="?", help="YAML file of config fields")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--help-config", action="store_true", help="list the stage's config fields and exit")
    parser.add_argument("--force", action="store_true",
                        help="train afresh where out_dir holds a run this config would replace, not continue "
                             "(it is moved to <out_dir>.previous-<date> first)")
    args = parser.parse_args(argv)
    config_cls, train = trainer_for(args.stage)
    if args.help_config:
        print(config_cls.help())
        return
    if args.config and not Path(args.config).exists():
        if "=" not in args.config:
            parser.error(f"{args.config!r} is neither a config file (no such file) nor a key=value override")
        args.overrides.insert(0, args.config)  # `train grpo updates=5`: overrides without a YAML file
        args.config = None
    values = read_mapping(args.config, f"a {config_cls.__name__} file") if args.config else {}
    values.update(parse_override(parser, item) for item in args.overrides)
    cfg = config_cls.from_dict(values)  # unknown keys: ConfigError naming the closest field
    if args.force and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise cli.UserError(f"--force with {os.environ['WORLD_SIZE']} processes: each would move {cfg.out_dir}; "
                            "move it aside before launching, or run without --force")
    from .distributed_eval import evaluator
    from .trainer import prepare_run_dir

    prepare_run_dir(cfg, args.force)  # input files and out_dir, before any compute

    # evaluation (every eval_every updates and at the end) sharded over this job's processes
    train(cfg, eval_fn=evaluator(cfg))


def parse_override(parser: argparse.ArgumentParser, item: str) -> tuple[str, object]:
    """`key=value` -> (key, value read as YAML); anything else exits naming it (`lr` alone would
    otherwise read as lr=None)."""
    try:
        return cli.key_value(item, "override")
    except cli.UserError as error:
        parser.error(str(error))


CPU_RANKS_ENV = {"ACCELERATE_USE_CPU": "true"}  # makes each rank's Accelerator join the gloo world


def launch(stage: str, config, num_processes: int = 1, accelerate_config: str | None = None) -> None:
    """Run a stage's training in fresh processes (blocking); the config is written next to its
    outputs. One process without a config file runs plain `python -m`; several CPU processes (no
    GPU, or an accelerate config with `use_cpu` / MULTI_CPU) run as ranks of `torch.distributed.run`;
    GPUs run through `accelerate launch`."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "launch_config.yaml"
    config.to_yaml(path)
    command, env = launch_command(["-m", "flowopd_lib.train", stage, str(path)], num_processes, accelerate_config)
    subprocess.run(command, check=True, env=env)


def launch_command(target: list[str], num_processes: int = 1,
                   accelerate_config: str | None = None) -> tuple[list[str], dict[str, str] | None]:
    """(command, environment or None) running `python <target>` as `launch` describes: one plain
    process, CPU ranks of torch.distributed.run, or `accelerate launch` over GPUs."""
    if num_processes == 1 and accelerate_config is None:
        return [sys.executable, *target], None
    if cpu_processes(accelerate_config):
        return cpu_ranks_command(num_processes, target)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    command += ["--config_file", accelerate_config] if accelerate_config else []
    return command + target, None


def cpu_processes(accelerate_config: str | None) -> bool:
    """Whether the processes run on the CPU: the accelerate config says so, or there is no GPU."""
    if accelerate_config is not None:
        values = read_mapping(accelerate_config, "an accelerate config")
        return bool(values.get("use_cpu")) or values.get("distributed_type") == "MULTI_CPU"
    import torch

    return not torch.cuda.is_available()


def cpu_ranks_command(num_processes: int, target: list[str]) -> tuple[list[str], dict[str, str]]:
    """Command and environment that start `num_processes` CPU ranks of `python <target>` on this machine.

    Not `accelerate launch`: for --cpu or a MULTI_CPU config file it starts ONE process (accelerate
    1.x's simple launcher forks only under mpirun). torch.distributed.run forks the ranks and sets
    the env:// variables; ACCELERATE_USE_CPU makes their `Accelerator()` join them with gloo (without
    it each rank sees a world of 1 on a CPU-only torch and trains alone). Each rank gets its share of
    this process's threads (`rank_threads`)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(num_processes), *target]
    threads = str(rank_threads(num_processes))
    return command, {**os.environ, **CPU_RANKS_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def rank_threads(num_processes: int) -> int:
    """Threads for each of `num_processes` CPU ranks: a share of what this process was given.
    Inherited whole, two ranks given two cores would run four threads on them."""
    return max(1, given_threads() // num_processes)


def given_threads() -> int:
    """The threads this process was given: OMP_NUM_THREADS (the runner sets it per stage), else every core."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else (os.cpu_count() or 1)


def processes(num_processes) -> int:
    """The process count a `num_processes` setting asks for: a whole number >= 1, or "auto": on a
    machine without a GPU one CPU rank per thread this process was given (a lone summary, given
    every core by the runner, splits its images over ranks of one thread each: no thread waits on
    another), and one process beside a GPU (a count there would launch over GPUs it may not have)."""
    if num_processes == "auto":
        import torch

        return 1 if torch.cuda.is_available() else given_threads()
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes {num_processes!r}: give a whole number >= 1, or 'auto' (CPU ranks, one "
                         "per thread given, where there is no GPU)")
    return num_processes


if __name__ == "__main__":
    main()
