"""Learning curves of one training run, or of a chain of runs that continue each other.

A long run is sometimes two stages (toy_mix_budget.yaml: Mix at one teacher's budget, then the same
adapter continued to the total budget), each with its own metrics.csv counting updates from 1.
This reads them in order, shifts each stage's updates by the ones before it, and plots the chosen
columns (held-out evaluations, KL to the base, reward, gradient norm) on one update axis, one panel
per column, with a dotted line where a stage begins:

    python -m flowopd_lib.diagnostics.curves \\
        papermill_runs/outputs/toy_mix_budget/mix_nft_teacher_budget \\
        papermill_runs/outputs/toy_mix_budget/mix_nft_total_budget \\
        --columns eval/geneval eval/ocr eval/pickscore kl_ref --logy kl_ref --out docs/figures/mix_long.png

It also prints the columns every `--every` updates as a table (the numbers behind the picture).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def chained_metrics(run_dirs: list[str | Path]) -> pd.DataFrame:
    """metrics.csv of each run in order, `step` shifted by the updates of the runs before it;
    a `stage` column names the run directory each row comes from."""
    if not run_dirs:
        raise ValueError("name at least one run directory")
    parts, offset = [], 0
    for directory in map(Path, run_dirs):
        path = directory / "metrics.csv"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: is {directory} a training run's output folder?")
        metrics = pd.read_csv(path)
        parts.append(metrics.assign(step=metrics["step"] + offset, stage=directory.name))
        offset += int(metrics["step"].max())
    return pd.concat(parts, ignore_index=True)


def every(metrics: pd.DataFrame, columns: list[str], interval: int) -> pd.DataFrame:
    """The last value of each column in every window of `interval` updates (rows: the window's last
    update, so a final partial window shows where the run ended)."""
    missing = [c for c in columns if c not in metrics]
    if missing:
        raise KeyError(f"no column {missing} in the metrics; there are {sorted(c for c in metrics if c != 'stage')}")
    windows = metrics.groupby((metrics["step"] - 1) // interval)
    table = windows[columns].last()
    table.index = windows["step"].max().to_numpy()
    return table.rename_axis("update")


def plot(metrics: pd.DataFrame, columns: list[str], logy: tuple[str, ...] = (), title: str = "", path=None):
    """One panel per column against the chained update, a dotted line at each stage's start."""
    import matplotlib.pyplot as plt

    ncols = min(3, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.7 * nrows), squeeze=False)
    for ax in axes.flat[len(columns):]:
        ax.axis("off")
    starts = metrics.groupby("stage", sort=False)["step"].min().iloc[1:] - 1
    for ax, column in zip(axes.flat, columns):
        rows = metrics[["step", column]].dropna()
        ax.plot(rows["step"], rows[column], marker="." if len(rows) < 60 else None, lw=1)
        for start in starts:
            ax.axvline(start, color="grey", ls=":", lw=1)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("update")
        if column in logy:
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="training run folders (with metrics.csv), in the order they ran")
    parser.add_argument("--columns", nargs="+", default=["eval/geneval", "eval/ocr", "eval/pickscore", "kl_ref"])
    parser.add_argument("--logy", nargs="*", default=[], help="columns drawn on a log scale")
    parser.add_argument("--every", type=int, default=50, help="table: one row per this many updates")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", help="save the figure here (png)")
    args = parser.parse_args(argv)
    metrics = chained_metrics(args.run_dirs)
    print(every(metrics, args.columns, args.every).round(3).to_markdown())
    if args.out:
        plot(metrics, args.columns, tuple(args.logy), args.title, args.out)
        print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
