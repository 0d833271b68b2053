"""The toy world's teacher recipes: one reward each, the trainer and budget that make it differ
from the base, and the command that trains (and ships) it.

    python -m flowopd_lib.teachers train geneval --out runs/teachers/geneval     # resumes if interrupted
    python -m flowopd_lib.teachers train geneval -c lr=3e-4 -c updates=50        # any config override
    python -m flowopd_lib.teachers ship geneval --run runs/teachers/geneval      # -> assets/teachers/geneval

A recipe is a trainer name (`grpo`, `nft`, `awm`) plus config overrides; the evaluation during
training uses the recipe's protocol (CFG scale, steps) on held-out test prompts, so the learning
curve in metrics.csv is the teacher's own metric under the protocol it is shipped with.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from . import evaluation

ASSETS = Path(__file__).parent / "assets" / "teachers"
TRAINERS = {"grpo": ("flowopd_lib.grpo", "GRPOConfig", "train_grpo"),
            "nft": ("flowopd_lib.nft", "NFTConfig", "train_nft"),
            "awm": ("flowopd_lib.awm", "AWMConfig", "train_awm")}

# The evaluation protocol the toy teachers are trained and judged under (CFG-free: at CFG 1 the
# base's skills are latent, and the forward-process trainers need no guidance in their rollouts).
PROTOCOL = {"cfg_scale": 1.0, "steps": 20, "seed": 0}

# task -> (trainer, config overrides). Shared settings first, then what each task changes.
_COMMON = dict(cfg_scale=1.0, sde_steps=10, prompts_per_update=32, group_size=8, minibatches=4,
               train_timesteps=4, lr=1e-3, lora_rank=8, lora_alpha=8.0, ema_decay=0.9, beta=1e-4,
               eval_every=10, checkpoint_every=10)
RECIPES: dict[str, tuple[str, dict]] = {
    "geneval": ("nft", {**_COMMON, "rewards": {"geneval": 1.0}, "datasets": {"geneval": 1.0}, "updates": 300}),
    "ocr": ("nft", {**_COMMON, "rewards": {"ocr": 1.0}, "datasets": {"ocr": 1.0}, "updates": 300}),
    "pickscore": ("nft", {**_COMMON, "rewards": {"pickscore": 1.0}, "datasets": {"pickscore": 1.0},
                          "updates": 300}),
    # The paper's DeQA teacher trains on DeQA : PickScore prompts 4 : 6, judged by DeQA.
    "deqa": ("nft", {**_COMMON, "rewards": {"deqa": 1.0}, "datasets": {"deqa": 4.0, "pickscore": 6.0},
                     "reward_routing": "all", "updates": 300}),
}


def trainer_for(name: str):
    """(config class, train function) of a trainer name: grpo, nft or awm."""
    import importlib

    module, config_name, train_name = TRAINERS[name]
    mod = importlib.import_module(module)
    return getattr(mod, config_name), getattr(mod, train_name)


def recipe_config(task: str, out_dir: str, overrides: dict | None = None):
    """The task's teacher config (trainer's dataclass) with `overrides` applied."""
    if task not in RECIPES:
        raise SystemExit(f"unknown teacher task {task!r}; recipes exist for {sorted(RECIPES)}")
    trainer, values = RECIPES[task]
    config_cls, _ = trainer_for(trainer)
    return config_cls.from_dict({**values, "adapter": task, "out_dir": out_dir, **(overrides or {})})


def eval_fn_for(task: str, n_prompts: int = 90, protocol: dict = PROTOCOL):
    """The learning-curve evaluation: the teacher's own task on held-out prompts under `protocol`."""
    def run(model) -> dict:
        return evaluation.scores_of(model, tasks=(task,), n_prompts=n_prompts, **protocol)
    return run


def train(task: str, out_dir: str, overrides: dict | None = None, eval_prompts: int = 90):
    cfg = recipe_config(task, out_dir, overrides)
    _, train_fn = trainer_for(RECIPES[task][0])
    return train_fn(cfg, eval_fn=eval_fn_for(task, eval_prompts))


def ship(task: str, run_dir: str | Path, metrics: dict | None = None, destination: Path = ASSETS) -> Path:
    """Copy a finished run's adapter to assets/teachers/<task>/ with the recipe, protocol and command."""
    run_dir = Path(run_dir)
    target = destination / task
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(run_dir / "adapter", target)
    info = json.loads((target / "adapter.json").read_text())
    info.update({"task": task, "trainer": RECIPES[task][0], "protocol": PROTOCOL,
                 "command": f"python -m flowopd_lib.teachers train {task} --out {run_dir}",
                 **({"metrics": metrics} if metrics else {})})
    (target / "adapter.json").write_text(json.dumps(info, indent=1, default=str))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one teacher by its recipe (resumes from out/checkpoints)")
    t.add_argument("task", choices=sorted(RECIPES))
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("-c", "--config", action="append", default=[], metavar="key=value",
                   help="override a config field (value read as YAML)")
    t.add_argument("--eval-prompts", type=int, default=90)
    s = sub.add_parser("ship", help="copy a finished run's adapter into assets/teachers/<task>")
    s.add_argument("task", choices=sorted(RECIPES))
    s.add_argument("--run", required=True)
    args = parser.parse_args(argv)
    if args.command == "train":
        overrides = {}
        for item in args.config:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"-c {item!r}: write overrides as key=value, e.g. -c lr=3e-4")
            overrides[key] = yaml.safe_load(value)
        train(args.task, args.out, overrides, args.eval_prompts)
    else:
        print(ship(args.task, args.run))


if __name__ == "__main__":
    main()
