"""GRPO probes: what the toy GRPO can learn on the shipped base, and how much signal a gradient has.

Two diagnostic rewards join the registry when this module is imported:

    probe_redness      how red the image is (mean of max(0, r - (g + b) / 2)): easy, global
    probe_colour_area  the area in the colour a GenEval prompt names (0 for prompts without one):
                       prompt-conditional, but no shapes, counts or positions

and four experiments (the GRPO diagnosis and probe distillation of docs/findings.md come from these):

    python -m flowopd_lib.diagnostics.probe train probe_redness --updates 21 -c lr=0.01 -c minibatches=1 -c beta=0
    python -m flowopd_lib.diagnostics.probe train geneval --updates 20 -c lr=0.01 -c minibatches=1 -c beta=0
    python -m flowopd_lib.diagnostics.probe cosine probe_redness
    python -m flowopd_lib.diagnostics.probe distill --updates 21
    python -m flowopd_lib.diagnostics.probe linesearch geneval --batches 16 --out runs/linesearch

`train` runs `GRPOTrainer` and evaluates the reward with the ODE on fixed test prompts (20 steps,
CFG 3, seed 0) before and after. `cosine` computes the GRPO gradient of independent batches at
the base (lr 0) and prints their pairwise cosines: near 0 means each update is mostly noise.
`linesearch` averages the gradients of 16 batches into a clean direction and evaluates the reward
after one step of several sizes along it (and along one batch's gradient): does a gradient from
1024 samples point anywhere useful? `distill` is Flow-OPD with two teachers that do beat the base
(the toy's GenEval/OCR/PickScore teachers do not, so their distillation cannot show transfer): a
redness teacher for PickScore prompts and a colour-area teacher for GenEval colour prompts, each
GRPO-trained alone; their merge; GRPO-Mix on both rewards; and the OPD student from the merge, all
with the same updates.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
from pathlib import Path

import torch

from .. import adapters, cli, coldstart, data, models, rewards, rollout, toy
from ..grpo import GRPOConfig, GRPOTrainer
from ..opd import OPDConfig, OPDTrainer

EVAL_PROMPTS, EVAL_STEPS, EVAL_CFG = 64, 20, 3.0


def redness(images: torch.Tensor, prompts: list) -> dict[str, torch.Tensor]:
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    return {"reward": (r - (g + b) / 2).clamp(min=0).mean(dim=(1, 2))}


def named_colour(prompt) -> str | None:
    return next((c["color"] for c in prompt.spec.get("include", []) if "color" in c), None)


def colour_area(images: torch.Tensor, prompts: list) -> dict[str, torch.Tensor]:
    out = torch.zeros(len(prompts))
    for i, p in enumerate(prompts):
        if (colour := named_colour(p)) is not None:
            rgb = torch.tensor(toy.COLORS[colour], dtype=images.dtype).view(3, 1, 1)
            out[i] = ((images[i] - rgb).norm(dim=0) < 0.3).float().mean()
    return {"reward": out}


rewards.register("probe_redness", redness)
rewards.register("probe_colour_area", colour_area, tasks=("geneval",))
TASK_OF = {"probe_redness": "pickscore", "probe_colour_area": "geneval", "geneval": "geneval", "ocr": "ocr",
           "pickscore": "pickscore", "deqa": "pickscore"}


def colour_prompts(n: int, split: str, seed: int) -> list:
    """n GenEval prompts that name a colour (what probe_colour_area can judge)."""
    pool = data.prompts("geneval", 8 * n, split, seed)
    return [p for p in pool if named_colour(p)][:n]


def test_prompts(reward: str, n: int | None = None) -> list:
    """n (default EVAL_PROMPTS) fixed test prompts the reward can judge."""
    n = n or EVAL_PROMPTS
    if reward == "probe_colour_area":
        return colour_prompts(n, "test", 0)
    return data.prompts(TASK_OF[reward], n, "test", 0)


def train_source(task: str, n: int, seed: int) -> list:
    """Training prompts of the probes: GenEval ones always name a colour."""
    return colour_prompts(n, "train", seed) if task == "geneval" else data.prompts(task, n, "train", seed)


def eval_reward(model, reward: str, prompts: list) -> dict[str, float]:
    """The reward's mean over ODE samples of fixed test prompts (and GenEval's strict score,
    PickScore's hidden taste `true`)."""
    with torch.no_grad():
        images = rollout.generate(model, [p.text for p in prompts], steps=EVAL_STEPS, cfg_scale=EVAL_CFG, seed=0)
    out = rewards.score(reward, images, prompts)
    return {reward: out["reward"].mean().item(), **{k: out[k].mean().item() for k in ("strict", "true") if k in out}}


def config(reward: str, out_dir: str, **overrides) -> GRPOConfig:
    values = dict(adapter="probe", rewards={reward: 1.0}, datasets={TASK_OF[reward]: 1.0}, cfg_scale=3.0,
                  out_dir=out_dir)
    return GRPOConfig(**{**values, **overrides})


def train(reward: str, updates: int, out_dir: str, **overrides) -> tuple[dict, dict]:
    """GRPO on one reward from the shipped base; returns the evaluation before and after."""
    model = models.load_base("toy")
    prompts = test_prompts(reward)
    before = eval_reward(model, reward, prompts)
    trainer = GRPOTrainer(model, config(reward, out_dir, updates=updates, **overrides),
                          eval_fn=lambda m: eval_reward(m, reward, prompts))
    after = {k.removeprefix("eval/"): v for k, v in trainer.train(resume=False).items() if k.startswith("eval/")}
    Path(out_dir, "probe.json").write_text(json.dumps({"before": before, "after": after, "updates": updates}))
    return before, after


DISTILL_TEACHERS = {"pickscore": "probe_redness", "geneval": "probe_colour_area"}  # task -> reward
TEACHER_SETTINGS = dict(lr=0.01, minibatches=1, beta=0.0)  # the setting that makes probe_redness rise


def _slug(value) -> str:
    """A config value as part of a folder name: {'geneval': 3, 'ocr': 1} -> geneval:3,ocr:1."""
    return re.sub(r"[^\w.=:,-]", "", str(value))


def distill(out_dir: str, n_updates: int = 21, shared: dict | None = None, **student) -> "pd.DataFrame":
    """Teachers, merge, GRPO-Mix and the OPD student on the two probe rewards (module docstring).

    `n_updates` for every trainer; `shared` config fields (e.g. prompts_per_update) for every
    trainer; `student` fields (e.g. mar_lambda=0, updates=42) for the student only, which then
    trains into its own folder. Finished teachers and GRPO-Mix in out_dir are reused (their
    checkpoints resume), so student variants cost only the student. Returns the table (rows:
    models, columns: the probe rewards on their tasks' test prompts), also out_dir/distill*.csv."""
    import pandas as pd

    out, model, shared = Path(out_dir), models.load_base("toy"), shared or {}
    prompts = {reward: test_prompts(reward) for reward in DISTILL_TEACHERS.values()}

    def scores(view) -> dict[str, float]:
        return {r: eval_reward(view, r, ps)[r] for r, ps in prompts.items()}

    def grpo(name: str, rewards_: dict, datasets: dict, **extra) -> str:
        cfg = GRPOConfig(adapter=name, rewards=rewards_, datasets=datasets, cfg_scale=EVAL_CFG, updates=n_updates,
                         out_dir=str(out / name), **{**TEACHER_SETTINGS, **extra, **shared})
        trainer = GRPOTrainer(model, cfg, prompt_source=train_source)
        trainer.train(resume=True)
        trainer.keep_ema_weights()
        return str(out / name / "adapter")

    rows = {"base": scores(adapters.view(model, None))}
    teachers = {}
    for task, reward in DISTILL_TEACHERS.items():
        teachers[task] = grpo(f"teacher_{task}", {reward: 1.0}, {task: 1.0})
        rows[f"teacher ({task}: {reward})"] = scores(adapters.view(model, f"teacher_{task}"))
    grpo("grpo_mix", {r: 1.0 for r in DISTILL_TEACHERS.values()}, {t: 1.0 for t in DISTILL_TEACHERS},
         reward_routing="task", task_rewards=DISTILL_TEACHERS)
    rows["GRPO-Mix"] = scores(adapters.view(model, "grpo_mix"))
    coldstart.merge(model, {f"teacher_{task}": 1.0 for task in DISTILL_TEACHERS}, name="merge")
    rows["merge (delta average)"] = scores(adapters.view(model, "merge"))
    merge_dir = adapters.save(model, "merge", out / "merge")
    variant = "".join(f"_{k}={_slug(v)}" for k, v in sorted(student.items()))
    cfg = OPDConfig(**{**dict(adapter="student", init_adapter=str(merge_dir), teachers=teachers,
                              datasets={t: 1.0 for t in DISTILL_TEACHERS}, cfg_scale=EVAL_CFG, updates=n_updates,
                              lr=TEACHER_SETTINGS["lr"], out_dir=str(out / f"opd{variant}")), **shared, **student})
    trainer = OPDTrainer(model, cfg, prompt_source=train_source)
    trainer.train(resume=True)
    trainer.keep_ema_weights()
    label = "".join(f", {k}={v}" for k, v in sorted(student.items()))
    rows[f"Flow-OPD (merge init{label})"] = scores(adapters.view(model, "student"))
    table = pd.DataFrame(rows).T
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"distill{variant}.csv")
    return table


def gradient_cosines(reward: str, batches: int = 4, **overrides) -> list[float]:
    """Pairwise cosines of the GRPO gradients of `batches` independent updates at the base."""
    grads = batch_gradients(zero_lr_trainer(models.load_base("toy"), reward, "runs/probe_cosine", **overrides), batches)
    return [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in itertools.combinations(grads, 2)]


def zero_lr_trainer(model, reward: str, out_dir: str, **overrides) -> GRPOTrainer:
    """A GRPO trainer whose optimizer steps change nothing (lr 0, one on-policy minibatch, no KL)."""
    torch.manual_seed(0)
    source = train_source if reward == "probe_colour_area" else None  # colour area judges colour prompts only
    return GRPOTrainer(model, config(reward, out_dir, lr=0.0, minibatches=1, beta=0.0, ema_decay=0.0, **overrides),
                       prompt_source=source)


def batch_gradients(trainer: GRPOTrainer, batches: int) -> torch.Tensor:
    """[batches, #params] GRPO gradients of independent updates (their own prompts and noise)."""
    grads = []
    for update in range(100, 100 + batches):
        traj = trainer.rollout(update)
        labels, _ = trainer.label(traj, update)
        trainer.optimize(traj, labels, update)  # lr 0: the step changes nothing, .grad keeps the gradient
        grads.append(torch.nn.utils.parameters_to_vector(p.grad for p in trainer.params).clone())
    return torch.stack(grads)


def gradient_line_search(reward: str, batches: int = 16, step_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                         n_eval: int = 180, **overrides) -> "pd.DataFrame":
    """How far one step along a clean GRPO gradient raises the reward, against one batch's gradient.

    At the base (LoRA B = 0), the GRPO gradients of `batches` independent 64-sample updates are
    averaged into a clean direction. Each direction (the average, and the first batch alone) is
    stepped at sizes that match one Adam step of lr `step_lr` on every coordinate (a change of norm
    step_lr * sqrt(#params)), and the reward is evaluated on fixed test prompts (ODE, paired noise).
    table.attrs["loo_cosines"]: each batch's gradient's cosine to the mean of the others."""
    import pandas as pd

    model = models.load_base("toy")
    trainer = zero_lr_trainer(model, reward, "runs/probe_linesearch", **overrides)
    grads = batch_gradients(trainer, batches)
    loo = [torch.nn.functional.cosine_similarity(g, (grads.sum(0) - g) / (len(grads) - 1), dim=0).item() for g in grads]
    base = torch.nn.utils.parameters_to_vector(trainer.params).detach().clone()
    prompts = test_prompts(reward, n_eval)

    def set_params(flat: torch.Tensor) -> None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, trainer.params)

    def evaluate_at(delta: torch.Tensor) -> dict[str, float]:
        set_params(base + delta)
        with adapters.active(model, trainer.cfg.adapter):
            return eval_reward(model, reward, prompts)

    rows = [{"direction": "none", "step_lr": 0.0, **evaluate_at(torch.zeros_like(base))}]
    # The loss is -advantage * ratio: the descent direction -grad raises the reward.
    for name, g in {f"mean of {batches} batches": grads.mean(0), "one batch": grads[0]}.items():
        for lr in step_lrs:
            rows.append({"direction": name, "step_lr": lr,
                         **evaluate_at(-g / g.norm() * lr * base.numel() ** 0.5)})
    set_params(base)
    table = pd.DataFrame(rows)
    table.attrs["loo_cosines"] = loo
    return table


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("experiment", choices=("train", "cosine", "distill", "linesearch"))
    parser.add_argument("reward", nargs="?", choices=sorted(TASK_OF), help="train, cosine, linesearch: the reward")
    parser.add_argument("--updates", type=cli.count, default=20)
    parser.add_argument("--batches", type=cli.count, default=4, help="cosine, linesearch: independent batches (2 or more)")
    parser.add_argument("--out", default=None, help="train: run directory (default runs/probe_<reward>)")
    parser.add_argument("-c", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config field, e.g. -c lr=0.01 -c minibatches=1 -c beta=0 (distill: of the student)")
    args = parser.parse_args(argv)
    overrides = dict(cli.key_value(item, "-c") for item in args.overrides)
    config_cls = OPDConfig if args.experiment == "distill" else GRPOConfig  # distill: -c sets the student's
    fields = [f.name for f in dataclasses.fields(config_cls)]
    unknown = [key for key in overrides if key not in fields]
    if unknown:
        hints = {key: difflib.get_close_matches(key, fields, n=1) for key in unknown}
        said = ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items())
        raise cli.UserError(f"-c {said}: not {config_cls.__name__} field(s); its fields: {fields}")
    if args.experiment in ("cosine", "linesearch") and args.batches < 2:
        raise cli.UserError(f"--batches {args.batches}: {args.experiment} compares the gradients of several batches; "
                            "give 2 or more")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise cli.UserError(f"--out {args.out} is a file: name a folder")
    if args.experiment == "distill":
        table = distill(args.out or "runs/probe_distill", args.updates, **overrides)  # -c: the student's fields
        print(table.round(3).to_string())
        return
    if args.reward is None:
        parser.error(f"{args.experiment} needs a reward: one of {sorted(TASK_OF)}")
    if args.experiment == "train":
        before, after = train(args.reward, args.updates, args.out or f"runs/probe_{args.reward}", **overrides)
        print(f"{args.reward} {overrides}: before {before} -> after {after} ({args.updates} updates)")
    elif args.experiment == "linesearch":
        table = gradient_line_search(args.reward, args.batches, **overrides)
        loo = table.attrs["loo_cosines"]
        print(table.round(4).to_string())
        print(f"cosine of each batch's gradient to the mean of the others: mean {sum(loo) / len(loo):.3f}, "
              f"{[round(c, 3) for c in loo]}")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            table.to_csv(Path(args.out, f"linesearch_{args.reward}.csv"), index=False)
    else:
        cosines = gradient_cosines(args.reward, args.batches, **overrides)
        print(f"{args.reward}: pairwise gradient cosines {[round(c, 3) for c in cosines]}, "
              f"mean |cos| {sum(abs(c) for c in cosines) / len(cosines):.3f}")


if __name__ == "__main__":
    main()
