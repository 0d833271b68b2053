"""Paired comparisons between any two rows of a finished study's summary, from its evaluation cache.

The summary (notebook 05) tabulates each model alone; a question such as "does Flow-OPD add anything
to the merge it starts from?" needs the paired difference of two rows on the same prompts and noise.
This reads the summary stage's parameters (row label -> adapter, evaluation protocol), scores the
named rows through the run's evaluation cache (no new sampling when the summary ran) and prints
`row - reference` per metric with a paired bootstrap 95% interval:

    python -m flowopd_lib.diagnostics.compare papermill_runs/outputs/toy_full \\
        "Flow-OPD (merge init)" "merge (cold start)"
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

TABLES = ("main", "seesaw", "mar", "estimators", "merges")


def rows_of(params: dict) -> dict[str, str | None]:
    """Every row label of the summary's tables -> its adapter directory (None: the base)."""
    rows: dict[str, str | None] = {}
    for table in TABLES:
        rows.update(params.get(table) or {})
    return rows


def paired(run_dir: str | Path, labels: list[str], reference: str, summary_stage: str = "summary") -> pd.DataFrame:
    """`label - reference` for each label, per metric: diff and its paired 95% interval (low, high)."""
    from .. import adapters, evaluation, models

    params = yaml.safe_load((Path(run_dir) / summary_stage / "parameters.yaml").read_text())
    rows = rows_of(params)
    unknown = [label for label in [*labels, reference] if label not in rows]
    if unknown:
        raise SystemExit(f"error: no row(s) {unknown} in {run_dir}/{summary_stage}; rows: {sorted(rows)}")
    model = models.load_base(params.get("base", "toy"))
    views = {}
    for i, label in enumerate([reference, *labels]):
        name = adapters.load(model, rows[label], f"r{i}") if rows[label] else None
        views[label] = adapters.view(model, name)
    scores = evaluation.sample_scores(
        views, n_prompts=params["eval_prompts"], samples_per_prompt=params.get("eval_samples", 1),
        steps=params["eval_steps"], cfg_scale=params["eval_cfg"], seed=params["seed"], shift=params.get("shift", 1.0),
        prompt_root=params.get("prompt_root"), reward_for_task=params.get("task_rewards"),
        cache_dir=params.get("eval_cache"))
    return pd.concat({label: evaluation.compare(scores, label, reference) for label in labels})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's output folder, e.g. papermill_runs/outputs/toy_full")
    parser.add_argument("rows", nargs="+", help="row labels of the summary's tables; the last is the reference")
    parser.add_argument("--summary-stage", default="summary")
    args = parser.parse_args(argv)
    if len(args.rows) < 2:
        raise SystemExit("error: name at least two rows: the compared row(s), then the reference")
    table = paired(args.run_dir, args.rows[:-1], args.rows[-1], args.summary_stage)
    print(f"row - {args.rows[-1]!r}, paired 95% bootstrap interval:\n")
    print(table.round(3).to_markdown())


if __name__ == "__main__":
    main()
