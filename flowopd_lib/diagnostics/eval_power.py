"""How large must an evaluation be to decide? Interval half-widths of a paired difference against size.

A claim such as "the PickScore teacher lowers GenEval" is decided when the paired 95% interval of the
difference excludes 0; its half-width shrinks with the number of test prompts and of samples per
prompt (sample j of every prompt from the noise of seed + j, for both models). This samples each
shipped teacher and the base on every test prompt of the teacher's task at `--samples` seeds once,
then, for every (prompts, samples) on a grid, recomputes the paired bootstrap interval of teacher minus
base on a subset (the first n prompts of each stratum, the first k seeds), and reports the half-width:
the smallest evaluation that reaches a target width is read off the table, with its cost in images.

    python -m flowopd_lib.diagnostics.eval_power --samples 8 --out docs/figures/eval_power.csv

GenEval's test split holds 90 prompts (the grammar limits distinct prompts per category), so its width
can only fall by adding samples per prompt, down to the floor the prompts' own spread sets.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from .. import adapters, cli, evaluation, models, stats, teachers
from ..toy.splits import read_prompts

TASK_METRIC = {"geneval": "geneval", "ocr": "ocr", "pickscore": "pickscore", "deqa": "deqa"}


def sample_table(task: str, samples: int, base: str = "toy") -> pd.DataFrame:
    """Per-sample scores of the base and the task's shipped teacher on all of the task's test prompts."""
    model = models.load_base(base)
    name = adapters.load(model, teachers.shipped()[task], f"teacher_{task}")
    # the test file's size: GenEval's draws repeat its small tags by design (any n is drawn), others refuse more
    n_prompts = len(read_prompts(task, "test"))
    views = {"base": adapters.view(model, None), "teacher": adapters.view(model, name)}
    return evaluation.sample_scores(views, tasks=(task,), n_prompts=n_prompts, samples_per_prompt=samples,
                                    **evaluation.PROTOCOL)


def half_widths(scores: pd.DataFrame, metric: str, prompt_counts: list[int], sample_counts: list[int]) -> pd.DataFrame:
    """Half-width of the paired 95% interval of teacher - base for each (prompts per task, samples):
    prompts taken in the test file's order, the same subset for both models."""
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


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--tasks", nargs="+", default=list(TASK_METRIC), choices=list(TASK_METRIC))
    parser.add_argument("--samples", type=cli.count, default=8, help="seeds per prompt sampled once (the grid's largest)")
    parser.add_argument("--out", type=cli.new_file, default=Path("runs/eval_power.csv"),
                        help="CSV of the half-widths (its folder must exist)")
    args = parser.parse_args(argv)
    tables = []
    for task in args.tasks:
        started = time.time()
        scores = sample_table(task, args.samples)
        n_max = scores["prompt"].nunique()
        prompt_counts = sorted({n for n in (30, 60, 90, 120, 200, n_max) if n <= n_max})
        sample_counts = sorted({k for k in (1, 2, 4, 8, 16, args.samples) if k <= args.samples})
        table = half_widths(scores, TASK_METRIC[task], prompt_counts, sample_counts)
        table.insert(0, "task", task)
        table["sampling_minutes"] = (time.time() - started) / 60
        tables.append(table)
        print(table.round(3).to_string(index=False), flush=True)
    pd.concat(tables).to_csv(args.out, index=False)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
