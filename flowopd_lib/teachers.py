"""The toy world's teacher recipes: one reward each, the trainer and budget that make it differ
from the base, and the command that trains (and ships) it.

    python -m flowopd_lib.teachers train geneval --out runs/teachers/geneval     # resumes if interrupted
    python -m flowopd_lib.teachers train geneval -c lr=3e-4 -c updates=50        # any config override
    python -m flowopd_lib.teachers ship geneval --run runs/teachers/geneval      # -> assets/teachers/geneval
    python -m flowopd_lib.teachers efficiency geneval --samples 8192 --out runs/efficiency_geneval
    python -m flowopd_lib.teachers train pickscore --world dial --out runs/dial/pickscore  # another world

A world (`worlds.WORLDS`) is the base the teachers adapt and the conflict setting their rewards read, with its
own shipped teachers: `toy` (the base `toy`, conflict 0: today's study) and `dial` (`toy_glyph`, the
calibrated conflict 0.5: docs/toy_world.md). `--world` on train, ship and table picks it.

A recipe is a trainer name (`grpo`, `nft`, `awm`) plus config overrides; the evaluation during
training uses the recipe's protocol (CFG scale, steps) on held-out test prompts, so the learning
curve in metrics.csv is the teacher's own metric under the protocol it is shipped with.

Shipping checks everything before it measures or writes (`check_shippable`: a finished run of the
recipe, with config.yaml and its adapter), builds the teacher beside its folder and swaps it in;
replacing a shipped teacher takes --force and keeps the old one (REPLACED_TEACHERS, dated).
"""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

from . import adapters, cli, evaluation
from . import train as train_module
from .config import ConfigError
from .safe_files import FileError, check_writable, read_csv, read_json_object, read_mapping, replace_directory
from .trainer import MAY_CHANGE_ON_RESUME, config_changes, prepare_run_dir
from .worlds import WORLDS, world

ASSETS = Path(__file__).parent / "assets" / "teachers"  # the `toy` world's


# Where `ship --force` keeps the teachers it replaces, as <task>.previous-<date>: outside the package
# (whose assets every toy stage fingerprints), in the repository's untracked runs/ folder.
REPLACED_TEACHERS = Path(__file__).resolve().parents[1] / "runs" / "replaced_teachers"
TEACHER_TRAINERS = ("grpo", "nft", "awm")  # stage-0 trainers of train.TRAINERS

# The evaluation protocol the toy teachers are trained and judged under: the toy world's one protocol.
PROTOCOL = evaluation.PROTOCOL

# The tasks a student distils (the paper's three; the DeQA teacher is MAR's anchor there).
DISTILLED = ("geneval", "ocr", "pickscore")

# What a teacher must add to the base on its own metric under PROTOCOL (DeQA is on a 1-5 scale).
SHIP_BARS = {"geneval": 0.15, "ocr": 0.15, "pickscore": 0.15, "deqa": 0.3}

# task -> (trainer, config overrides). Shared settings first, then what each task changes.
_COMMON = dict(cfg_scale=1.0, sde_steps=10, prompts_per_update=32, group_size=8, minibatches=4,
               train_timesteps=4, lr=1e-3, lora_rank=8, lora_alpha=8.0, ema_decay=0.9, beta=1e-4,
               eval_every=10, checkpoint_every=10)
RECIPES: dict[str, tuple[str, dict]] = {
    "geneval": ("nft", {**_COMMON, "rewards": {"geneval": 1.0}, "datasets": {"geneval": 1.0}, "updates": 200}),
    # OCR: NFT alone moved it ~+0.02 in 80 updates; a cold start on ground-truth renders first (a toy
    # privilege, recorded in the adapter's metadata) then NFT reached ~+0.09. A rank-32 attention +
    # feed-forward cold start gained no measurable OCR over this and wrecked every other task; the
    # text encoders barely encode glyph order, which caps OCR on this base (docs/teachers.md).
    "ocr": ("nft", {**_COMMON, "rewards": {"ocr": 1.0}, "datasets": {"ocr": 1.0}, "updates": 300,
                    "sft": {"steps": 1000}}),
    "pickscore": ("nft", {**_COMMON, "rewards": {"pickscore": 1.0}, "datasets": {"pickscore": 1.0},
                          "updates": 150}),  # past ~170 updates the KL to the base explodes and the metric falls
    # The paper's DeQA teacher: rewards DeQA : PickScore 4 : 6 (DeQA / 5 first, as the study's GRPO one).
    "deqa": ("nft", {**_COMMON, "rewards": {"deqa": 0.08, "pickscore": 0.6}, "datasets": {"deqa": 1.0},
                     "updates": 150}),  # as PickScore: DeQA peaked at 170 updates, then collapsed
}


# What a world changes in a task's recipe. The glyph base (dial) learns OCR far faster than `toy`: its
# OCR teacher's held-out OCR was 0.898 at 60 updates against the base's 0.52 (+0.15 is the bar), so
# the toy recipe's 300 updates (set for a base that barely encodes glyph order) only cost time there.
# The budget was read off that learning curve (90 test prompts) at update 60, before the run ended.
WORLD_CHANGES: dict[str, dict[str, dict]] = {"dial": {"ocr": {"updates": 100}}}


def trainer_for(name: str):
    """(config class, train function) of a teacher trainer: grpo, nft or awm."""
    if name not in TEACHER_TRAINERS:
        raise SystemExit(f"unknown teacher trainer {name!r}; choose one of {list(TEACHER_TRAINERS)}")
    return train_module.trainer_for(name)


def recipe_settings(task: str, world_name: str = "toy") -> tuple[str, dict]:
    """(trainer name, its config fields) of the task's recipe in a world (RECIPES, then what the world
    changes: WORLD_CHANGES), without the cold start's settings."""
    if task not in RECIPES:
        raise SystemExit(f"unknown teacher task {task!r}; recipes exist for {sorted(RECIPES)}")
    trainer, values = RECIPES[task]
    world(world_name)  # an unknown world is refused here too
    values = {**values, **WORLD_CHANGES.get(world_name, {}).get(task, {})}
    return trainer, {k: v for k, v in values.items() if k != "sft"}  # "sft": the cold start's, not the trainer's


def assets_of(world_name: str) -> Path:
    """Where the world's teachers are shipped (read at call time: a test that moves ASSETS moves all)."""
    folder = world(world_name).folder
    return ASSETS if folder is None else ASSETS.with_name(folder)


def reads_pickscore(task: str) -> bool:
    """Whether the task's recipe rewards PickScore: then its training depends on the conflict dial."""
    return "pickscore" in recipe_settings(task)[1]["rewards"]


def recipe_config(task: str, out_dir: str, overrides: dict | None = None, world_name: str = "toy"):
    """The task's teacher config (trainer's dataclass) in a world (its base and conflict setting),
    with `overrides` applied."""
    trainer, values = recipe_settings(task, world_name)
    config_cls, _ = trainer_for(trainer)
    where = world(world_name)
    return config_cls.from_dict({**values, "base": where.base, "conflict": where.conflict, "adapter": task,
                                 "out_dir": out_dir, **(overrides or {})})


def eval_fn_for(task: str, n_prompts: int = 90, protocol: dict | None = None):
    """The learning-curve evaluation: the teacher's own metric and its standard error (`<task>_se`)
    on held-out prompts under `protocol`, the same prompts and noise at every point (paired)."""
    if n_prompts < 1:
        raise ConfigError(f"eval_prompts={n_prompts}: the learning curve needs 1 or more test prompts")

    def run(model) -> dict:
        scores = evaluation.sample_scores(model, tasks=(task,), n_prompts=n_prompts, **(protocol or PROTOCOL))
        return evaluation.summarise(scores).iloc[0].to_dict()
    return run


def sft_on_renders(task: str, out_dir: str | Path, steps: int, batch: int = 64, lr: float = 1e-3,
                   lora_rank: int = 8, lora_targets: str = "attention", fresh_prompts: bool = False,
                   seed: int = 0) -> Path:
    """A task cold start only the toy world allows: fine-tune a LoRA with the flow-matching loss on
    ground-truth renders of the task's prompts (clean captions): the shipped training prompts, or with
    `fresh_prompts` new ones from the grammar at every step (never sharing a test prompt's text; on
    OCR it measured no better than the 1000 shipped texts, docs/teachers.md). `lora_targets` names a set in
    `adapters.TARGET_SETS`. Returns the adapter directory (skipped when it exists: the cold start is
    resumed as done)."""
    import time

    import torch
    from tqdm.auto import tqdm

    from . import data, flow, models, toy
    from .toy import splits
    from .tracking import Run

    if lora_targets not in adapters.TARGET_SETS:
        raise ValueError(f"lora_targets={lora_targets!r} is not a target set; choose one of {list(adapters.TARGET_SETS)}")
    directory = Path(out_dir) / "adapter"
    if (directory / adapters.WEIGHT_NAME).exists():
        return directory
    model = models.load_base("toy")
    params = adapters.add(model, task, rank=lora_rank, alpha=float(lora_rank),
                          targets=adapters.TARGET_SETS[lora_targets], seed=seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    g, t0 = torch.Generator().manual_seed(seed), time.time()
    config = {"task": task, "steps": steps, "batch": batch, "lr": lr, "lora_rank": lora_rank,
              "lora_targets": lora_targets, "fresh_prompts": fresh_prompts, "seed": seed}
    with Run(out_dir, None, resume=False) as run, adapters.active(model, task):
        model.transformer.train()
        for step in tqdm(range(steps), desc=f"SFT on {task} renders", mininterval=5):
            step_seed = seed * 1_000_003 + step
            prompts = (splits.fresh_prompts(task, batch, step_seed) if fresh_prompts
                       else data.prompts(task, batch, "train", step_seed))
            x0 = model.encode_images(toy.render(prompts, seed=step)).detach()
            if fresh_prompts:  # each prompt is seen once: do not grow the embedding cache without end
                model.clear_prompt_cache()
            embeds = model.encode_prompts([p.text for p in prompts])
            out = flow.fm_loss(lambda x, sigma: model.velocity(x, sigma, embeds), x0, generator=g)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                run.log({"loss": out.loss.item(), "elapsed_s": time.time() - t0}, step=step + 1)
        model.transformer.eval()
    return adapters.save(model, task, directory, {"sft_on_renders": config,
                                                  "train_minutes": round((time.time() - t0) / 60, 2)})


def cold_start_defaults() -> dict:
    """The settings `sft_on_renders` takes -> their defaults (`inspect.Parameter.empty`: required)."""
    return {name: p.default for name, p in inspect.signature(sft_on_renders).parameters.items()
            if name not in ("task", "out_dir")}


def cold_start_settings(task: str, overrides: dict | None = None) -> dict:
    """The recipe's cold start on renders (`sft_on_renders` keywords; empty: none), with `overrides`
    (e.g. `{"steps": 500}`) over it."""
    settings = {**RECIPES[task][1].get("sft", {}), **(overrides or {})}
    unknown = set(settings) - set(cold_start_defaults())
    if unknown:
        raise ValueError(f"unknown cold-start setting(s) {sorted(unknown)} for {task!r}; sft_on_renders takes "
                         f"{list(cold_start_defaults())}")
    return settings


def train(task: str, out_dir: str, overrides: dict | None = None, eval_prompts: int = 90, force: bool = False,
          world_name: str = "toy"):
    """Train the task's teacher by its recipe: the optional cold start on renders (the recipe's `sft`,
    `overrides["sft"]` over it), then the trainer; resumes from out_dir's checkpoints. Every setting
    and out_dir are checked first (`trainer.prepare_run_dir`; `force` moves a run it would replace aside)."""
    overrides = dict(overrides or {})
    sft = cold_start_settings(task, overrides.pop("sft", None))
    if sft:
        overrides["init_adapter"] = str(Path(out_dir) / "sft" / "adapter")  # sft_on_renders makes it
    cfg = recipe_config(task, out_dir, overrides, world_name)
    eval_fn = eval_fn_for(task, eval_prompts)
    prepare_run_dir(cfg, force, produced=("init_adapter",) if sft else ())
    if sft:
        sft_on_renders(task, Path(out_dir) / "sft", **sft)
    _, train_fn = trainer_for(RECIPES[task][0])
    return train_fn(cfg, eval_fn=eval_fn)


# The side-by-side efficiency run: shared settings, then each trainer's own (the ones it is known to
# work with on the toy base: GRPO at the study's teacher lr and KL; NFT and AWM as the recipes).
EFFICIENCY_SHARED = dict(cfg_scale=1.0, sde_steps=10, prompts_per_update=32, group_size=8, lora_rank=8,
                         lora_alpha=8.0, ema_decay=0.9, seed=0)
EFFICIENCY_TRAINERS = {
    "grpo": dict(lr=1e-2, beta=0.04, minibatches=2),
    "nft": dict(lr=1e-3, beta=1e-4, minibatches=4, train_timesteps=4),
    "awm": dict(lr=1e-3, beta=1e-3, minibatches=4, train_timesteps=4),
}


def efficiency(task: str, samples: int, eval_every_samples: int, out: str | Path,
               trainers: tuple[str, ...] = tuple(EFFICIENCY_TRAINERS), eval_prompts: int = 90):
    """Each trainer on the same base, prompts and sample budget, its own metric evaluated every
    `eval_every_samples` on the same held-out prompts and noise; writes efficiency.csv (one row
    per trainer and evaluation: samples, metric, se, samples/s) and efficiency.png. Resumable."""
    import pandas as pd

    from . import models, viz

    out = Path(out)
    per_update = EFFICIENCY_SHARED["prompts_per_update"] * EFFICIENCY_SHARED["group_size"]
    if samples < per_update or eval_every_samples < per_update:
        raise cli.UserError(f"samples={samples} and eval_every_samples={eval_every_samples} must each be at least "
                         f"one update ({per_update} samples)")
    eval_fn = eval_fn_for(task, eval_prompts)
    base = models.load_base("toy")
    start = eval_fn(base)
    rows = []
    for name in trainers:
        config_cls, train_fn = trainer_for(name)
        cfg = config_cls.from_dict({**EFFICIENCY_SHARED, **EFFICIENCY_TRAINERS[name], **{
            k: RECIPES[task][1][k] for k in ("rewards", "datasets")}, "adapter": f"{task}_{name}",
            "updates": samples // per_update, "eval_every": eval_every_samples // per_update,
            "checkpoint_every": eval_every_samples // per_update, "out_dir": str(out / name)})
        model = train_fn(cfg, model=models.load_base("toy"), eval_fn=eval_fn)
        adapters.delete(model, cfg.adapter)
        metrics = viz.read_metrics(out / name)
        seconds = metrics[["time/rollout", "time/label", "time/train"]].sum(axis=1).cumsum()
        rows.append({"trainer": name, "samples": 0, "metric": start[task], "se": start[f"{task}_se"]})
        for i, row in metrics.dropna(subset=[f"eval/{task}"]).iterrows():
            rows.append({"trainer": name, "samples": int(row["step"]) * per_update, "metric": row[f"eval/{task}"],
                         "se": row[f"eval/{task}_se"], "samples_per_s": row["step"] * per_update / seconds[i]})
    table = pd.DataFrame(rows)
    table.to_csv(out / "efficiency.csv", index=False)
    viz.plot_efficiency(table, f"{task}: own metric (CFG {EFFICIENCY_SHARED['cfg_scale']:g}, {eval_prompts} held-out "
                        f"prompts, +- 1 s.e.)", path=out / "efficiency.png")
    return table


def measure(task: str, adapter_dir: str | Path, n_prompts: int = 90, samples_per_prompt: int = 4,
            tasks: tuple[str, ...] = evaluation.TASKS, conflict_setting: float | None = None) -> dict:
    """A teacher against the base on `tasks` under PROTOCOL (the same prompts and noise): each
    model's metrics with standard errors, and teacher minus base with a paired bootstrap 95% interval.
    Sample j of every prompt starts from the noise of seed + j, so fewer samples per prompt measure
    a subset of what more measure. Measured in the world it was trained in: the base and conflict
    setting its adapter records (a teacher without a record: the base `toy`, setting 0), or at
    `conflict_setting` (a teacher whose rewards do not read the dial, measured in another setting)."""
    from . import models
    from .rewards import conflict

    recorded = adapters.metadata(adapter_dir).get("config", {})
    model = models.load_base(recorded.get("base", "toy"))
    adapters.load(model, adapter_dir, task)
    setting = recorded.get("conflict", 0.0) if conflict_setting is None else conflict_setting
    with conflict.setting(setting):
        scores = evaluation.sample_scores({"base": adapters.view(model, None), task: adapters.view(model, task)},
                                          tasks=tasks, n_prompts=n_prompts, samples_per_prompt=samples_per_prompt,
                                          **PROTOCOL)
    table, change = evaluation.summarise(scores), evaluation.compare(scores, task, "base")
    return {"protocol": {**PROTOCOL, "n_prompts": n_prompts, "samples_per_prompt": samples_per_prompt},
            "base_model": recorded.get("base", "toy"), "conflict": setting,
            "base": table.loc["base"].to_dict(), "teacher": table.loc[task].to_dict(),
            "change": change.to_dict("index")}


def cold_start_changes(task: str, run_dir: Path) -> list[str]:
    """How the run's cold start on renders (its sft/adapter metadata) differs from the recipe's,
    one "cold start <setting>: run <value>, recipe <value>" per difference (unset settings at
    `sft_on_renders`' defaults)."""
    keys = cold_start_defaults()
    defaults = {k: v for k, v in keys.items() if v is not inspect.Parameter.empty}
    path = Path(run_dir) / "sft" / "adapter" / "adapter.json"
    recorded = read_json_object(path, "the cold start's metadata").get("sft_on_renders", {}) if path.exists() else {}
    ran = {**defaults, **{k: v for k, v in recorded.items() if k in keys}} if recorded else {}
    recipe = cold_start_settings(task)
    wanted = {**defaults, **recipe} if recipe else {}
    return [f"cold start {k}: run {ran.get(k)}, recipe {wanted.get(k)}"
            for k in sorted(set(ran) | set(wanted)) if ran.get(k) != wanted.get(k)]


def check_run_follows_recipe(task: str, run_dir: Path, world_name: str = "toy") -> None:
    """Refuse to ship a run whose config differs from the task's recipe in the world: the shipped command
    (`teachers train <task> --world W`) must reproduce the teacher, so every change belongs in RECIPES
    (the conflict setting aside for a recipe whose rewards do not read it). A run without config.yaml
    (not made by `teachers train`, or cut off before it wrote one) is refused."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: not a run of `python -m flowopd_lib.teachers train {task}` "
                          f"(or one cut off at its start); train it with that command, then ship it")
    ignored = {"out_dir", "init_adapter", *MAY_CHANGE_ON_RESUME} - {"updates"}
    if not reads_pickscore(task):
        ignored.add("conflict")  # the dial does not change what this recipe trains on
    changed = [c.replace(" -> ", ", recipe ").replace(": ", ": run ", 1)
               for c in config_changes(saved_path, recipe_config(task, str(run_dir), world_name=world_name), ignored)]
    changed += cold_start_changes(task, run_dir)
    if changed:
        raise ConfigError(f"{run_dir} was not trained by the {task!r} recipe ({'; '.join(changed)}); "
                          f"put those values in teachers.RECIPES[{task!r}] (or WORLD_CHANGES[{world_name!r}]) so the "
                          f"shipped command reproduces it")


def check_shippable(task: str, run_dir: str | Path, destination: Path | None = None, force: bool = False,
                    world_name: str = "toy") -> None:
    """Everything `ship` needs, checked before anything is measured or written (a UserError, one
    line): a finished run of the task's recipe (config.yaml, a loadable adapter of all the config's
    updates, readable records) and, where the task's teacher is already shipped, `force`."""
    run_dir, target = Path(run_dir), Path(destination or assets_of(world_name)) / task
    check_run_follows_recipe(task, run_dir, world_name)
    adapters.check_folder(run_dir / "adapter", f"the adapter of {run_dir}")
    planned = read_mapping(run_dir / "config.yaml", "a run's config").get("updates")
    done = adapters.metadata(run_dir / "adapter").get("updates")
    if done != planned:
        raise cli.UserError(f"{run_dir} is not finished: its adapter has {done} of {planned} updates; finish it with "
                            f"`python -m flowopd_lib.teachers train {task} --out {run_dir}`, then ship it")
    for record, read in (("metrics.csv", read_csv), ("sft/adapter/adapter.json", read_json_object)):
        if (run_dir / record).exists():
            read(run_dir / record, f"the run's {record}")
    check_writable(target)
    if target.exists() and not force:
        raise cli.UserError(f"the {task} teacher is already shipped ({target}); pass --force to replace it (the "
                            f"current one is kept as {REPLACED_TEACHERS / task}.previous-<date>)")


def ship(task: str, run_dir: str | Path, metrics: dict | None = None, destination: Path | None = None,
         force: bool = False, world_name: str = "toy") -> Path:
    """Ship a finished run's adapter to <destination>/<task>/ (default: assets/teachers) with its learning
    curve, the recipe, protocol, command and `metrics`. Checked first (`check_shippable`), built beside
    the target and swapped in; a replaced teacher is kept in REPLACED_TEACHERS, dated."""
    run_dir, destination = Path(run_dir), Path(destination or assets_of(world_name))
    check_shippable(task, run_dir, destination, force, world_name)
    replaced = replace_directory(destination / task, lambda folder: write_teacher(task, run_dir, metrics, folder, world_name),
                                 REPLACED_TEACHERS)
    if replaced is not None:
        print(f"the teacher it replaces is kept in {replaced}")
    return destination / task


def write_teacher(task: str, run_dir: Path, metrics: dict | None, folder: Path, world_name: str = "toy") -> None:
    """The shipped teacher's files in `folder`: the run's adapter, its learning curve (a few kB) and
    metadata saying how it was made and measured."""
    shutil.copytree(run_dir / "adapter", folder, dirs_exist_ok=True)
    if (run_dir / "metrics.csv").exists():
        curve = read_csv(run_dir / "metrics.csv", "the run's metrics.csv")
        keep = ["step"] + [c for c in curve if c.startswith(("eval/", "reward", "time/"))]
        curve[keep].to_csv(folder / "learning_curve.csv", index=False)
    info = adapters.metadata(folder)
    cold_start = run_dir / "sft" / "adapter" / "adapter.json"
    if cold_start.exists():  # say plainly that this teacher began from ground-truth renders
        recorded = read_json_object(cold_start, "the cold start's metadata")
        info["cold_start"] = {"sft_on_renders": recorded.get("sft_on_renders"),
                              "note": "a toy-world privilege: flow matching on ground-truth renders of the "
                                      "task's training prompts before RL"}
    info.update({"task": task, "trainer": RECIPES[task][0], "protocol": PROTOCOL,
                 "world": world_name, "command": f"python -m flowopd_lib.teachers train {task} --out {run_dir}"
                                                 + (f" --world {world_name}" if world_name != "toy" else ""),
                 **({"metrics": metrics} if metrics else {})})
    (folder / "adapter.json").write_text(json.dumps(info, indent=1, default=str))


def shipped(destination: Path | None = None, world_name: str = "toy") -> dict[str, Path]:
    """task -> directory of each shipped teacher (of the world, or under `destination`)."""
    destination = Path(destination or assets_of(world_name))
    return {d.name: d for d in sorted(destination.glob("*")) if (d / "adapter.json").exists()}


def shipped_directories(tasks: tuple[str, ...] = DISTILLED, world_name: str = "toy") -> dict[str, str]:
    """task -> directory (a string, as notebooks and configs take it) of the shipped teacher of each of
    `tasks` in the world: the notebooks' default teachers."""
    available = shipped(world_name=world_name)
    missing = [t for t in tasks if t not in available]
    if missing:
        raise FileNotFoundError(f"no shipped teacher for {missing} under {assets_of(world_name)}; "
                                f"shipped: {sorted(available)}")
    return {t: str(available[t]) for t in tasks}


def table(destination: Path | None = None, world_name: str = "toy") -> str:
    """Markdown of the shipped teachers' recorded rows: every metric of the base and the teacher
    (± one standard error) and the teacher's paired change with its 95% bootstrap interval."""
    lines = []
    for task, directory in shipped(destination, world_name).items():
        info = read_json_object(directory / "adapter.json", "a shipped teacher's record")
        try:
            lines += _table_rows(task, info)
        except (KeyError, TypeError, ValueError) as error:  # a record without metrics, or of another shape
            raise FileError(f"{directory / 'adapter.json'} is not a complete shipped teacher's record ("
                            f"{type(error).__name__}: {error}): ship the teacher again with `python -m "
                            f"flowopd_lib.teachers ship {task} --run RUN --force`") from None
    return "\n".join(lines) if lines else "no teacher shipped yet\n"


MATRIX_METRICS = ("geneval", "ocr", "pickscore", "pickscore_true", "deqa")


def matrix(destination: Path | None = None, world_name: str = "toy"):
    """The cross-task matrix of a world's shipped teachers (rows) on every metric (columns): each
    recorded paired change from the base as "diff [low, high]" (95% interval), a cell marked * where
    its interval excludes 0. DataFrame of strings; `matrix_values` gives the numbers."""
    import pandas as pd

    cells = {}
    for task, change in matrix_values(destination, world_name).items():
        cells[f"{task} teacher"] = {m: f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
                                    + ("*" if c["low"] > 0 or c["high"] < 0 else "") for m, c in change.items()}
    return pd.DataFrame.from_dict(cells, orient="index", columns=list(MATRIX_METRICS))


def matrix_values(destination: Path | None = None, world_name: str = "toy") -> dict[str, dict]:
    """task -> metric -> {diff, low, high} of each shipped teacher's record (MATRIX_METRICS order)."""
    out = {}
    found = shipped(destination, world_name)
    for task, directory in sorted(found.items(), key=lambda item: list(RECIPES).index(item[0])):
        change = read_json_object(directory / "adapter.json", "a shipped teacher's record").get("metrics", {}).get("change")
        if not isinstance(change, dict):
            raise FileError(f"{directory / 'adapter.json'} has no recorded changes: ship the teacher again with "
                            f"`python -m flowopd_lib.teachers ship {task} --run RUN --force`")
        out[task] = {m: change[m] for m in MATRIX_METRICS if m in change}
    return out


def _table_rows(task: str, info: dict) -> list[str]:
    """`table`'s lines of one shipped teacher from its adapter.json."""
    m = info["metrics"]
    protocol = m["protocol"]
    lines = [f"### {task} teacher ({info['trainer']}, {info.get('updates')} updates, "
             f"{info.get('train_minutes')} min)", "",
             f"`{info['command']}`; protocol: CFG {protocol['cfg_scale']:g}, {protocol['steps']} ODE steps, "
             f"{protocol['n_prompts']} test prompts x {protocol['samples_per_prompt']} samples, seed {protocol['seed']}",
             "", f"shipping bar: {task} >= base + {SHIP_BARS[task]:g}: "
             f"{'cleared' if m['change'][task]['diff'] >= SHIP_BARS[task] else 'missed'}",
             "", "| metric | base | teacher | change [95% CI] |", "|---|---|---|---|"]
    for metric, change in m["change"].items():
        lines.append(f"| {metric} | {m['base'][metric]:.3f} ± {m['base'][metric + '_se']:.3f} | "
                     f"{m['teacher'][metric]:.3f} ± {m['teacher'][metric + '_se']:.3f} | "
                     f"{change['diff']:+.3f} [{change['low']:+.3f}, {change['high']:+.3f}] |")
    return lines + [""]


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one teacher by its recipe (resumes from out/checkpoints)")
    t.add_argument("task", choices=sorted(RECIPES))
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("-c", "--config", action="append", default=[], metavar="key=value",
                   help="override a config field (value read as YAML)")
    t.add_argument("--eval-prompts", type=cli.count, default=90)
    t.add_argument("--world", default="toy", choices=sorted(WORLDS), help="the base and conflict setting (WORLDS)")
    t.add_argument("--force", action="store_true", help="train afresh where --out holds a run the recipe would "
                                                        "replace, not continue (moved to <out>.previous-<date> first)")
    e = sub.add_parser("efficiency", help="Flow-GRPO vs DiffusionNFT vs AWM on one sample budget: curves + figure")
    e.add_argument("task", choices=sorted(RECIPES))
    e.add_argument("--samples", type=cli.count, default=8192, help="rollout samples per trainer")
    e.add_argument("--eval-every-samples", type=cli.count, default=2048)
    e.add_argument("--out", required=True)
    e.add_argument("--trainers", nargs="+", default=list(EFFICIENCY_TRAINERS), choices=list(EFFICIENCY_TRAINERS))
    e.add_argument("--eval-prompts", type=cli.count, default=90)
    s = sub.add_parser("ship", help="measure a finished run's adapter against the base on every task and copy "
                                    "it into assets/teachers/<task> with its metrics (checked first)")
    s.add_argument("task", choices=sorted(RECIPES))
    s.add_argument("--run", required=True)
    s.add_argument("--world", default="toy", choices=sorted(WORLDS), help="the world the run was trained in (WORLDS)")
    s.add_argument("--force", action="store_true", help="replace the task's shipped teacher (kept in "
                                                        "runs/replaced_teachers/<task>.previous-<date>)")
    tab = sub.add_parser("table", help="markdown of the shipped teachers' recorded metrics")
    tab.add_argument("--world", default="toy", choices=sorted(WORLDS))
    tab.add_argument("--matrix", action="store_true", help="the cross-task matrix: every teacher's change on every "
                                                           "metric, 95% interval, * where it excludes 0")
    args = parser.parse_args(argv)
    if args.command == "table":
        print(matrix(world_name=args.world).to_markdown() if args.matrix else table(world_name=args.world))
    elif args.command == "train":
        overrides = dict(cli.key_value(item, "-c") for item in args.config)
        train(args.task, args.out, overrides, args.eval_prompts, args.force, args.world)
    elif args.command == "efficiency":
        print(efficiency(args.task, args.samples, args.eval_every_samples, args.out, tuple(args.trainers),
                         args.eval_prompts).to_string())
    else:
        check_shippable(args.task, args.run, force=args.force, world_name=args.world)  # before minutes of measuring
        metrics = measure(args.task, Path(args.run) / "adapter", conflict_setting=world(args.world).conflict)
        print(json.dumps(metrics, indent=1))
        print(ship(args.task, args.run, metrics, force=args.force, world_name=args.world))


if __name__ == "__main__":
    main()
