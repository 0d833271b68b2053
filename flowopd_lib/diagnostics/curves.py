"""Learning curves of training runs side by side, where a run may be a chain of stages that continue each other.

A long run is sometimes two stages (toy_mix_budget.yaml: Mix at one teacher's budget, then the same
adapter continued to the total budget), each with its own metrics.csv counting updates from 1.
`A+B` reads them in order and shifts B's updates by A's, so the chain has one update axis (a dotted
line marks where B begins). Several runs (each a folder or a chain) share the panels, one line each,
labelled by their last folder's name; one panel per column (held-out evaluations, KL to the base or
to the teachers, reward, gradient norm):

    python -m flowopd_lib.diagnostics.curves \
        papermill_runs/outputs/toy_mix_budget/mix_nft_teacher_budget+papermill_runs/outputs/toy_mix_budget/mix_nft_total_budget \
        --columns eval/geneval eval/ocr eval/pickscore kl_ref --logy kl_ref --out docs/figures/mix_long.png

It also prints each run's columns every `--every` updates as a table (the numbers behind the picture).
Every input (runs, columns, --every, --out's folder and format) is checked before anything is
printed or drawn; a mistake is one line, exit status 2.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import cli, viz
from ..safe_files import FileError, read_csv


def chained_metrics(run_dirs: list[str | Path]) -> pd.DataFrame:
    """metrics.csv of each run in order, `step` shifted by the updates of the runs before it;
    a `stage` column names the run directory each row comes from."""
    if not run_dirs:
        raise ValueError("name at least one run directory")
    parts, offset = [], 0
    for directory in map(Path, run_dirs):
        path = directory / "metrics.csv"
        if not path.exists():
            raise FileError(f"{path} does not exist: is {directory} a training run's output folder?")
        metrics = read_csv(path, "a run's metrics")
        if "step" not in metrics:
            raise FileError(f"{path} has no 'step' column: not a training run's metrics.csv")
        parts.append(metrics.assign(step=metrics["step"] + offset, stage=directory.name))
        offset += int(metrics["step"].max())
    return pd.concat(parts, ignore_index=True)


def every(metrics: pd.DataFrame, columns: list[str], interval: int) -> pd.DataFrame:
    """The last value of each column in every window of `interval` updates (rows: the window's last
    update, so a final partial window shows where the run ended)."""
    if interval < 1:
        raise ValueError(f"interval={interval}: give 1 or more updates")
    missing = [c for c in columns if c not in metrics]
    if missing:
        raise KeyError(f"no column {missing} in the metrics; there are {sorted(c for c in metrics if c != 'stage')}")
    windows = metrics.groupby((metrics["step"] - 1) // interval)
    table = windows[columns].last()
    table.index = windows["step"].max().to_numpy()
    return table.rename_axis("update")


def check_figure_format(path: Path) -> None:
    """Refuse a figure file whose suffix matplotlib cannot write (before any table is printed)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise cli.UserError(f"--out {path}: matplotlib writes {sorted(formats)}, not {path.suffix or 'a file without a suffix'}; "
                            "e.g. --out curves.png")


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("runs", nargs="+", help="training run folders (with metrics.csv); A+B: B continued A")
    parser.add_argument("--columns", nargs="+", default=["eval/geneval", "eval/ocr", "eval/pickscore", "kl_ref"])
    parser.add_argument("--logy", nargs="*", default=[], help="columns drawn on a log scale")
    parser.add_argument("--every", type=cli.count, default=50, help="table: one row per this many updates")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=cli.new_file, help="save the figure here (png; its folder must exist)")
    args = parser.parse_args(argv)
    if args.out:
        check_figure_format(args.out)
    runs = {Path(chain.split("+")[-1]).name: chained_metrics(chain.split("+")) for chain in args.runs}
    if len(runs) < len(args.runs):
        raise cli.UserError(f"two runs end in folders of the same name: {args.runs}; each run is labelled by its "
                            "last folder's name")
    present = set().union(*runs.values())
    absent = [c for c in args.columns if c not in present]
    if absent:
        raise cli.UserError(f"no run has column(s) {absent}; they have {sorted(present - {'stage'})}")
    for label, metrics in runs.items():
        print(f"\n{label}\n")
        print(every(metrics, [c for c in args.columns if c in metrics], args.every).round(3).to_markdown())
    if args.out:
        viz.panels(runs, args.columns, tuple(args.logy), args.title, args.out)
        print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
