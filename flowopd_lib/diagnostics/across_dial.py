"""Where, as conflict grows, does each method win? Every method's distance to the teachers against the dial.

A study at one setting of the conflict dial (a run of dial_full.yaml: `dial_full` at 0.5, `dial_full_toy`
at setting 0 with `--world toy`) ends in notebook 05's summary, which keeps every model's per-sample
scores (`scores.csv`). For each setting, each method of its main table (seeds of one method pooled)
and each distilled task, this measures the method minus that task's teacher on the teacher's own
metric, paired (same prompts and noise) with a 95% bootstrap interval, beside the teacher's own gain
over the base; 0 is "as good as the teacher". One panel per task, the settings along x:

    python -m flowopd_lib.diagnostics.across_dial --run 0=papermill_runs/outputs/dial_full_toy \\
        --run 0.5=papermill_runs/outputs/dial_full --out docs/figures/across_dial

writes `across_dial.csv` and `across_dial.png` into the folder.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

from .. import claims, cli
from . import compare
from ..safe_files import read_mapping

DISTILLED = ("geneval", "ocr", "pickscore")
SEED = re.compile(r", seed \d+\)$")  # "Flow-OPD (merge init, seed 1)" is a seed of "Flow-OPD (merge init)"


def method_of(label: str) -> str:
    """The method a row label is a seed of (the label itself for seed 0 or a single run)."""
    return SEED.sub(")", label)


def labelled_scores(run_dir: Path, summary_stage: str = "summary") -> tuple[pd.DataFrame, dict]:
    """(per-sample scores with models relabelled by the main table's row labels, that table)."""
    folder = run_dir / summary_stage
    main = read_mapping(folder / "parameters.yaml", "a summary's parameters").get("main") or {}
    scores = compare.kept_scores({str(run_dir): {}}, main, summary_stage)
    if scores is None:
        raise cli.UserError(f"{folder / 'scores.csv'} lacks some row of the summary's main table: run its "
                            "summary stage again")
    return scores, main


def distances(scores: pd.DataFrame, main: dict, setting: float, n_boot: int = 2000) -> pd.DataFrame:
    """Rows (setting, method, task, diff, low, high): each method (its seeds pooled) minus the task's
    teacher on the task's metric, and the teacher's gain over the base (method `teacher - base`)."""
    pp = claims.per_prompt(scores)
    methods: dict[str, list[str]] = {}
    for label in main:
        if label != "base" and not label.startswith("teacher "):
            methods.setdefault(method_of(label), []).append(label)
    rows = []
    for task in DISTILLED:
        teacher = f"teacher {task}"
        if teacher not in pp.columns or task not in pp.index.get_level_values("metric"):
            continue
        measured = {"teacher - base": claims.difference(pp, teacher, "base", task, n_boot=n_boot)}
        for method, labels in methods.items():
            measured[method] = claims.difference(pp, labels, teacher, task, n_boot=n_boot)
        rows += [{"setting": setting, "method": m, "task": task, "diff": d, "low": lo, "high": hi}
                 for m, (d, lo, hi) in measured.items()]
    return pd.DataFrame(rows)


def measure(runs: dict[float, str | Path], summary_stage: str = "summary") -> pd.DataFrame:
    """`distances` of every run (conflict setting -> its run folder), one table; each run's summary
    files are checked before any bootstrap (a missing one is a cli.UserError naming it)."""
    runs = {float(setting): Path(run).expanduser() for setting, run in runs.items()}
    for run in runs.values():
        for name in ("parameters.yaml", "scores.csv"):
            if not (run / summary_stage / name).is_file():
                raise cli.UserError(f"{run / summary_stage / name} is missing: run the study's summary stage "
                                    f"(python -m flowopd_lib.runs <spec> --only {summary_stage})")
    return pd.concat([distances(*labelled_scores(run, summary_stage), setting) for setting, run in runs.items()],
                     ignore_index=True)


def figure(table: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(table["task"]))
    methods = list(dict.fromkeys(table["method"]))
    settings = sorted(set(table["setting"]))
    spread = 0.25 * (min(b - a for a, b in zip(settings, settings[1:])) if len(settings) > 1 else 0.1)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        part = table[table["task"] == task]
        for method, rows in part.groupby("method", sort=False):
            rows = rows.sort_values("setting")
            # methods side by side around each setting, so that their intervals do not hide each other
            x = rows["setting"] + spread * (methods.index(method) / max(1, len(methods) - 1) - 0.5)
            style = dict(color="black", ls="--") if method == "teacher - base" else {}
            ax.errorbar(x, rows["diff"], yerr=[rows["diff"] - rows["low"], rows["high"] - rows["diff"]],
                        marker="o", ms=4, capsize=2, lw=1, label=method, **style)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(settings)
        ax.set_title(f"{task}: method - teacher (dashed: teacher - base)", fontsize=9)
        ax.set_xlabel("conflict setting")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside, not over, the data
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def setting_and_run(text: str) -> tuple[float, Path]:
    setting, sep, run = text.partition("=")
    try:
        value = float(setting)
    except ValueError:
        value = None
    if not sep or value is None or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: write SETTING=RUN_DIR with a conflict setting in [0, 1], e.g. "
                            "0.5=papermill_runs/outputs/dial_full")
    return value, Path(run).expanduser()


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--run", action="append", required=True, type=setting_and_run, metavar="SETTING=RUN_DIR",
                        help="a study's run folder at a conflict setting; repeatable")
    parser.add_argument("--summary-stage", default="summary")
    parser.add_argument("--out", type=Path, default=Path("runs/across_dial"), help="folder (made if missing)")
    args = parser.parse_args(argv)
    table = measure(dict(args.run), args.summary_stage)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "across_dial.csv", index=False)
    figure(table, args.out / "across_dial.png")
    print(table.round(3).to_string(index=False))
    print(f"wrote {args.out / 'across_dial.csv'} and {args.out / 'across_dial.png'}")


if __name__ == "__main__":
    main()
