"""How large must an evaluation be to decide? Interval half-widths of a paired difference against size.

A claim such as "the PickScore teacher lowers GenEval" is decided when the paired 95% interval of the
difference excludes 0; its half-width shrinks with the number of test draws and of samples per draw
(sample j of every draw from the noise of seed + j, for both models). This samples a world's shipped
teacher of each task and its base on the task's test draws of the decisive protocol
(`evaluation.DECISIVE`) at `--samples` seeds once, then, for every (draws, samples) on a grid,
recomputes the paired bootstrap interval of teacher minus base on a subset (the first n draws, the
first k seeds) and reports its half-width. The row at the protocol's own sizes (`decisive`) is the
protocol measured exactly; the others say what a smaller evaluation would give, with its cost in images.

    python -m flowopd_lib.diagnostics.eval_power --world dial --samples 16 --out flowopd_lib/assets/measured/eval_power_dial

writes `<task>.csv` per task into the folder (a later run of other `--tasks` adds theirs) and prints
each task's decisive row against its target (TARGETS). The dial world's measurement is shipped as
assets/measured/eval_power_dial/<task>.csv (`shipped`; notebook 02 and docs/toy_world.md show it). The GenEval
one sampled 16 seeds, when the protocol held 16; it holds 8 (0.028), whose row is read off the same
table (the first 8 seeds of every draw).

GenEval's test file holds 90 prompts (the grammar limits distinct prompts per category); its draws go
category by category in turn, so 270 draws hold all 90 (the small categories repeat) and its width
falls mostly by samples per draw, down to the floor the prompts' own spread sets.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from .. import adapters, cli, evaluation, models, stats, teachers
from ..rewards import conflict

TARGETS = {"geneval": 0.03, "ocr": 0.03, "pickscore": 0.03, "deqa": 0.08}  # issue 36 D's half-widths
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "measured" / "eval_power_dial"


def shipped(folder: Path = SHIPPED) -> pd.DataFrame:
    """Per measured task: the quick evaluation (90 draws x 1 sample, `make run`'s) and the decisive one
    (evaluation.DECISIVE, its row marked anew from the current protocol) with half-widths and images."""
    from ..safe_files import read_csv

    rows = []
    for path in sorted(folder.glob("*.csv")):
        table = read_csv(path, "an evaluation-power table")
        task = table["task"].iloc[0]
        sizes = {"quick": (90, 1), "decisive": (evaluation.DECISIVE["eval_prompts"][task],
                                                evaluation.DECISIVE["eval_samples"][task])}
        for name, (n, k) in sizes.items():
            row = table[(table["prompts"] == n) & (table["samples"] == k)]
            rows.append({"task": task, "evaluation": name, "draws": n, "samples": k,
                         "images_per_model": n * k, "teacher - base": row["diff"].iloc[0] if len(row) else float("nan"),
                         "half_width": row["half_width"].iloc[0] if len(row) else float("nan"), "target": TARGETS[task]})
    return pd.DataFrame(rows)


def teacher_of(task: str, world_name: str) -> Path:
    """The world's shipped teacher of `task` (a cli.UserError naming how to ship one if none is)."""
    found = teachers.shipped(world_name=world_name)
    if task not in found:
        raise cli.UserError(f"no shipped {task} teacher in the {world_name} world ({teachers.assets_of(world_name)}); "
                            f"ship it with `python -m flowopd_lib.teachers ship {task} --world {world_name} --run RUN`")
    return found[task]


def sample_table(task: str, samples: int, world_name: str = "dial") -> pd.DataFrame:
    """Per-sample scores of the world's base and its shipped teacher of `task` on the task's decisive
    test draws, in the world's conflict setting."""
    where = teachers.world(world_name)
    model = models.load_base(where.base)
    name = adapters.load(model, teacher_of(task, world_name), f"teacher_{task}")
    views = {"base": adapters.view(model, None), "teacher": adapters.view(model, name)}
    with conflict.setting(where.conflict):
        return evaluation.sample_scores(views, tasks=(task,), n_prompts=evaluation.DECISIVE["eval_prompts"][task],
                                        samples_per_prompt=samples, **evaluation.PROTOCOL)


def half_widths(scores: pd.DataFrame, metric: str, prompt_counts: list[int], sample_counts: list[int]) -> pd.DataFrame:
    """Half-width of the paired 95% interval of teacher - base for each (draws, samples): draws taken
    in order, the same subset for both models."""
    rows = []
    chosen = scores[scores["metric"] == metric]
    for k in sample_counts:
        per_prompt = chosen[chosen["sample"] < k].groupby(["model", "prompt", "stratum"], as_index=False)["value"].mean()
        a = per_prompt[per_prompt["model"] == "teacher"].sort_values("prompt")
        b = per_prompt[per_prompt["model"] == "base"].sort_values("prompt")
        for n in prompt_counts:
            a_n, b_n = a.iloc[:n], b.iloc[:n]
            diff, low, high = stats.paired_difference(a_n["value"].to_numpy(), b_n["value"].to_numpy(),
                                                      a_n["stratum"].to_numpy())
            rows.append({"metric": metric, "prompts": len(a_n), "samples": k, "images_per_model": len(a_n) * k,
                         "diff": diff, "half_width": (high - low) / 2})
    return pd.DataFrame(rows)


def grid(task: str, scores: pd.DataFrame, samples: int) -> pd.DataFrame:
    """The task's half-width table on the standard grid, its decisive row marked."""
    n_max = scores["prompt"].nunique()
    prompt_counts = sorted({n for n in (30, 60, 90, 120, 180, 200, n_max) if n <= n_max})
    sample_counts = sorted({k for k in (1, 2, 4, 8, 16, samples) if k <= samples})
    table = half_widths(scores, task, prompt_counts, sample_counts)
    table.insert(0, "task", task)
    table["decisive"] = (table["prompts"] == evaluation.DECISIVE["eval_prompts"][task]) & (
        table["samples"] == evaluation.DECISIVE["eval_samples"][task])
    table["target"] = TARGETS[task]
    return table


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--world", default="dial", choices=sorted(teachers.WORLDS), help="whose base and teachers")
    parser.add_argument("--tasks", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--samples", type=cli.count, default=16, help="seeds per draw sampled once (the grid's largest)")
    parser.add_argument("--out", type=Path, default=Path("runs/eval_power"), help="folder of <task>.csv (made if missing)")
    args = parser.parse_args(argv)
    short = [t for t in args.tasks if evaluation.DECISIVE["eval_samples"][t] > args.samples]
    if short:
        raise cli.UserError(f"--samples {args.samples} is fewer than the decisive protocol's samples for {short} "
                            f"({ {t: evaluation.DECISIVE['eval_samples'][t] for t in short} }): raise --samples")
    for task in args.tasks:  # a missing teacher is refused before any sampling
        teacher_of(task, args.world)
    if args.out.exists() and not args.out.is_dir():
        raise cli.UserError(f"--out {args.out} is a file; name a folder (one CSV per task is written into it)")
    args.out.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        started = time.time()
        table = grid(task, sample_table(task, args.samples, args.world), args.samples)
        table["sampling_minutes_two_models"] = (time.time() - started) / 60
        table.to_csv(args.out / f"{task}.csv", index=False)
        print(table.round(3).to_string(index=False), flush=True)
        row = table[table["decisive"]].iloc[0]
        verdict = "reaches" if row["half_width"] <= row["target"] else "misses"
        print(f"{task}: decisive protocol ({row['prompts']} draws x {row['samples']} samples) half-width "
              f"{row['half_width']:.3f} {verdict} its target {row['target']}; wrote {args.out / f'{task}.csv'}", flush=True)


if __name__ == "__main__":
    main()
