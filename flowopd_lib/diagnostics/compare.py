"""Paired comparisons between any two rows of a finished study's summary, from its evaluation cache.

The summary (notebook 05) tabulates each model alone; a question such as "does Flow-OPD add anything
to the merge it starts from?" needs the paired difference of two rows on the same prompts and noise.
This reads the summary stage's parameters (row label -> adapter, evaluation protocol) and the
per-sample scores its summary kept (`scores.csv`: the samples behind its tables and claims; a summary
from before that file is scored again through the run's evaluation cache) and prints `row - reference`
per metric with a paired bootstrap 95% interval:

    python -m flowopd_lib.diagnostics.compare papermill_runs/outputs/toy_full \\
        "Flow-OPD (merge init)" "merge (cold start)"

`--with OTHER_RUN` adds the rows of another run evaluated under the same protocol (e.g. Mix at a
teacher's budget, from its own spec, against the study's students); a differing protocol is refused.
OTHER_RUN is a run folder (its summary is the --summary-stage) or a summary folder itself, for a run
whose summary stage has another name (dial_opd_methods' summary_merge against dial_full's summary).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import cli
from ..safe_files import read_mapping

TABLES = ("main", "seesaw", "mar", "estimators", "merges")
# What makes two runs' evaluations paired (the same prompts, noise and scorers), with the defaults
# the summary notebook uses when a key is absent.
PROTOCOL_DEFAULTS = {"base": "toy", "conflict": None, "seed": None, "eval_protocol": None, "eval_prompts": 90,
                     "eval_samples": 1, "eval_steps": None, "eval_cfg": None, "shift": 1.0, "prompt_root": None,
                     "task_rewards": None}


def rows_of(params: dict) -> dict[str, str | None]:
    """Every row label of the summary's tables -> its adapter directory (None: the base)."""
    rows: dict[str, str | None] = {}
    for table in TABLES:
        rows.update(params.get(table) or {})
    return rows


def protocol_of(params: dict) -> dict:
    """The evaluation protocol of a summary's parameters (absent keys at the summary's defaults)."""
    return {key: params.get(key, default) for key, default in PROTOCOL_DEFAULTS.items()}


def joined_rows(params_by_run: dict[str, dict]) -> dict[str, str | None]:
    """The rows of several runs' summaries, refused (cli.UserError) unless every run used the first's
    protocol and a label shared by two runs names the same adapter in both."""
    (first, first_params), *others = params_by_run.items()
    rows, origin = dict(rows_of(first_params)), dict.fromkeys(rows_of(first_params), first)
    expected = protocol_of(first_params)
    for run, params in others:
        protocol = protocol_of(params)
        differ = {k: (v, protocol[k]) for k, v in expected.items() if protocol[k] != v}
        if differ:
            raise cli.UserError(f"{run} was evaluated under another protocol than {first} "
                             f"({{key: (value in {first}, value in {run})}}: {differ}); its rows are not paired with the first run's")
        for label, adapter in rows_of(params).items():
            if label in rows and not same_adapter(rows[label], adapter):
                raise cli.UserError(f"row {label!r} is {rows[label]} in {origin[label]} but {adapter} in {run}, "
                                 "and their weights differ")
            rows.setdefault(label, adapter)
            origin.setdefault(label, run)
    return rows


def same_adapter(first: str | None, second: str | None) -> bool:
    """Whether two rows are one model: the same directory, or adapters with equal tensors (two runs
    that each merge the same teachers write the same weights; their file metadata may differ)."""
    if first == second:
        return True
    if first is None or second is None:
        return False
    from safetensors.torch import load_file

    files = [Path(d) / "pytorch_lora_weights.safetensors" for d in (first, second)]
    if not all(f.exists() for f in files):
        return False
    weights = [load_file(f) for f in files]
    return weights[0].keys() == weights[1].keys() and all(weights[0][k].equal(weights[1][k]) for k in weights[0])


def summary_folder(run: str | Path, summary_stage: str) -> Path:
    """A run's summary folder: `run` itself where it holds a summary's parameters.yaml, else its
    `summary_stage` stage."""
    return Path(run) if (Path(run) / "parameters.yaml").exists() else Path(run) / summary_stage


def kept_scores(params_by_run: dict[str, dict], rows: dict[str, str | None], summary_stage: str) -> pd.DataFrame | None:
    """The per-sample scores of `rows` (label -> adapter directory) from the runs' summaries
    (notebook 05's scores.csv, models named by directory; the first run holding a directory wins),
    relabelled; None where a run has no scores.csv (summaries from before it) or a row is in none."""
    from ..safe_files import read_csv

    paths = [summary_folder(run, summary_stage) / "scores.csv" for run in params_by_run]
    if not all(path.exists() for path in paths):
        return None
    kept = pd.concat([read_csv(path, "a summary's per-sample scores") for path in paths], ignore_index=True)
    kept["model"] = kept["model"].fillna("None").astype(str)  # the base's name, str(None), reads back as missing
    kept = kept.drop_duplicates(["model", "metric", "prompt", "sample"])
    frames = [kept[kept["model"] == str(directory)].assign(model=label) for label, directory in rows.items()]
    return None if any(frame.empty for frame in frames) else pd.concat(frames, ignore_index=True)


def paired(run_dir: str | Path, labels: list[str], reference: str, summary_stage: str = "summary",
           other_runs: tuple[str | Path, ...] = ()) -> pd.DataFrame:
    """`label - reference` for each label, per metric: diff and its paired 95% interval (low, high).
    Rows may come from `other_runs` too (same protocol). The summaries' per-sample scores
    (`kept_scores`) where they hold every row; else the rows are scored again, through run_dir's
    evaluation cache."""
    from .. import adapters, evaluation, models
    from ..rewards import conflict

    params_by_run = {str(run): read_mapping(summary_folder(run, summary_stage) / "parameters.yaml",
                                            "a summary's parameters") for run in (run_dir, *other_runs)}
    params = params_by_run[str(run_dir)]
    rows = joined_rows(params_by_run)
    unknown = [label for label in [*labels, reference] if label not in rows]
    if unknown:
        runs = " + ".join(str(summary_folder(run, summary_stage)) for run in params_by_run)
        raise cli.UserError(f"no row(s) {unknown} in {runs}; rows: {sorted(rows)}")
    kept = kept_scores(params_by_run, {label: rows[label] for label in [reference, *labels]}, summary_stage)
    if kept is not None:
        return pd.concat({label: evaluation.compare(kept, label, reference) for label in labels})
    protocol = protocol_of(params)
    model = models.load_base(protocol["base"])
    views = {}
    for i, label in enumerate([reference, *labels]):
        name = adapters.load(model, rows[label], f"r{i}") if rows[label] else None
        views[label] = adapters.view(model, name)
    prompts, samples = evaluation.protocol_sizes(protocol["eval_protocol"], protocol["eval_prompts"],
                                                 protocol["eval_samples"])
    frames = []
    with conflict.setting(protocol["conflict"] or 0.0):  # the world the summary scored in
        for task in evaluation.TASKS:  # one task at a time: a named evaluation sizes each task its own way
            frames.append(evaluation.sample_scores(
                views, tasks=(task,), n_prompts=prompts if isinstance(prompts, int) else prompts[task],
                samples_per_prompt=samples if isinstance(samples, int) else samples.get(task, 1),
                steps=protocol["eval_steps"] or evaluation.PROTOCOL["steps"],
                cfg_scale=protocol["eval_cfg"] or evaluation.PROTOCOL["cfg_scale"],
                seed=protocol["seed"] or 0, shift=protocol["shift"], prompt_root=protocol["prompt_root"],
                reward_for_task=protocol["task_rewards"], cache_dir=params.get("eval_cache")))
    scores = pd.concat(frames, ignore_index=True)
    return pd.concat({label: evaluation.compare(scores, label, reference) for label in labels})


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("run_dir", help="a run's output folder, e.g. papermill_runs/outputs/toy_full")
    parser.add_argument("rows", nargs="+", help="row labels of the summary's tables; the last is the reference")
    parser.add_argument("--summary-stage", default="summary")
    parser.add_argument("--with", dest="other_runs", action="append", default=[], metavar="OTHER_RUN",
                        help="also the rows of this run (same evaluation protocol): its folder, or its "
                             "summary folder where that stage has another name; repeatable")
    args = parser.parse_args(argv)
    if len(args.rows) < 2:
        raise cli.UserError("name at least two rows: the compared row(s), then the reference")
    for run in (args.run_dir, *args.other_runs):
        if not Path(run).is_dir():
            raise cli.UserError(f"{run}: no such run folder (the outputs of a run spec, e.g. "
                                "papermill_runs/outputs/toy_full)")
    table = paired(args.run_dir, args.rows[:-1], args.rows[-1], args.summary_stage, tuple(args.other_runs))
    print(f"row - {args.rows[-1]!r}, paired 95% bootstrap interval:\n")
    print(table.round(3).to_markdown())


if __name__ == "__main__":
    main()
