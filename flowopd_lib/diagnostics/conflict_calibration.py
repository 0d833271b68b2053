"""Calibrate the conflict dial on the teachers alone: at each setting, each named teacher's recipe,
trained briefly on the glyph base, against that base on every metric (paired, 95% intervals).

    python -m flowopd_lib.diagnostics.conflict_calibration --settings 0 0.5 0.75 --tasks pickscore \
        --updates 60 --out runs/conflict_calibration [--adapter geneval=runs/teachers/geneval/adapter]

The dial (rewards/conflict.py) changes only the PickScore taste and proxy, so a teacher whose rewards
do not read PickScore (GenEval, OCR) is trained once, at setting 0, and measured at every setting
(its PickScore column moves with the dial); the others are trained at each setting. `--adapter
task=dir` measures a teacher trained elsewhere (its recorded base) instead of training one.

Each run lives in <out>/<task>_c<setting>/ (resumed when the command runs again) and each measurement
in <out>/<task>_c<setting>_measure.json (reused); <out>/calibration.csv holds a row per (setting,
teacher, metric), <out>/calibration.png one panel per metric: each teacher's change against the dial.
`default_setting` reads the default off the table: the smallest setting at which the PickScore
teacher lowers GenEval (interval below 0) and another teacher lowers another task's metric. The
measured table is shipped as assets/measured/conflict_calibration.csv (`shipped_table`; docs/toy_world.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .. import cli, teachers
from ..rewards import conflict, pickscore
from ..safe_files import read_csv

WORLD = "dial"  # teachers.WORLDS: the glyph base; the setting varies here
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "measured" / "conflict_calibration.csv"
METRICS = ("geneval", "ocr", "pickscore", "pickscore_true", "deqa")


def run_setting(task: str, setting: float) -> float:
    """The setting a teacher of `task` is trained at to be measured at `setting`."""
    return setting if teachers.reads_pickscore(task) else 0.0


def teacher_adapter(task: str, setting: float, out: Path, updates: int, given: dict[str, Path]) -> Path:
    """The adapter measured for (task, setting): a given one, or a short run of the recipe (trained or resumed)."""
    if task in given:
        return given[task]
    trained_at = run_setting(task, setting)
    run_dir = out / f"{task}_c{trained_at:g}"
    teachers.train(task, str(run_dir), {"conflict": trained_at, "updates": updates, "eval_every": 20}, world_name=WORLD)
    return run_dir / "adapter"


def measured(task: str, adapter: Path, setting: float, path: Path, samples: int) -> dict:
    """teachers.measure of the adapter against its base at `setting`, cached in `path` (JSON)."""
    if path.exists():
        return json.loads(path.read_text())
    result = teachers.measure(task, adapter, samples_per_prompt=samples, conflict_setting=setting)
    path.write_text(json.dumps(result, indent=1, default=float))
    return result


def rows_of(task: str, setting: float, result: dict) -> list[dict]:
    return [{"setting": setting, "teacher": task, "metric": metric, **{k: float(v) for k, v in change.items()}}
            for metric, change in result["change"].items() if metric in METRICS]


def shipped_table() -> pd.DataFrame:
    """The calibration measured for the repository (rows: setting, teacher, metric, diff, low, high)."""
    return read_csv(SHIPPED, "the shipped conflict calibration")


def default_setting(table: pd.DataFrame) -> float | None:
    """The smallest setting at which the PickScore teacher lowers GenEval (its 95% interval below 0)
    and at least one more teacher lowers a metric of another task; None if no setting does."""
    for setting, rows in table.groupby("setting"):
        down = rows[rows["high"] < 0]
        pickscore_on_geneval = ((down["teacher"] == "pickscore") & (down["metric"] == "geneval")).any()
        others = down[(down["teacher"] != "pickscore") & (down["metric"] != down["teacher"])]
        if pickscore_on_geneval and not others.empty:
            return float(setting)
    return None


def figure(table: pd.DataFrame, path: Path):
    """One panel per metric: each teacher's paired change from the base against the dial."""
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if m in set(table["metric"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.1 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, (teacher, rows) in enumerate(table[table["metric"] == metric].groupby("teacher")):
            rows = rows.sort_values("setting")
            ax.errorbar(rows["setting"] + 0.01 * i, rows["diff"], yerr=[rows["diff"] - rows["low"], rows["high"] - rows["diff"]],
                        marker="o", capsize=3, label=f"{teacher} teacher")
        ax.axhline(0, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_title(f"{metric}: teacher - base", fontsize=9)
        ax.set_xlabel("conflict")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--settings", type=float, nargs="+", required=True, help="conflict settings in [0, 1]")
    parser.add_argument("--tasks", nargs="+", default=["pickscore"], help="teachers trained (recipes: teachers.RECIPES)")
    parser.add_argument("--adapter", action="append", default=[], metavar="task=dir",
                        help="measure this adapter as the task's teacher instead of training one (repeatable)")
    parser.add_argument("--updates", type=cli.count, default=60, help="updates of each short teacher run")
    parser.add_argument("--samples", type=cli.count, default=2, help="samples per test prompt of each measurement")
    parser.add_argument("--out", required=True, help="folder of the runs, measurements, table and figure")
    args = parser.parse_args(argv)
    settings = [conflict.check(s) for s in args.settings]
    given = {}
    for item in args.adapter:
        task, _, directory = item.partition("=")
        if task not in teachers.RECIPES or not (Path(directory) / "adapter.json").exists():
            raise cli.UserError(f"--adapter {item}: give task=dir, a task of {sorted(teachers.RECIPES)} and a saved adapter folder")
        given[task] = Path(directory)
    unknown = [t for t in args.tasks if t not in teachers.RECIPES]
    if unknown:
        raise cli.UserError(f"--tasks {unknown}: no such recipe; recipes: {sorted(teachers.RECIPES)}")
    for setting in settings:
        pickscore.weights_dir(setting)  # every setting's proxy exists, before any training
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in dict.fromkeys([*args.tasks, *given]):
        for setting in settings:
            adapter = teacher_adapter(task, setting, out, args.updates, given)
            result = measured(task, adapter, setting, out / f"{task}_c{setting:g}_measure.json", args.samples)
            rows += rows_of(task, setting, result)
    table = pd.DataFrame(rows)
    table.to_csv(out / "calibration.csv", index=False)
    figure(table, out / "calibration.png")
    print(table.round(3).to_string(index=False))
    print(f"default setting (PickScore teacher lowers GenEval, another teacher another metric): {default_setting(table)}")


if __name__ == "__main__":
    cli.entry(main)()
