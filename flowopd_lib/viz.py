"""Matplotlib figures shared by the notebooks: image grids and training curves from metrics.csv."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch


def image_grid(images: torch.Tensor, titles: list[str] | None = None, ncols: int = 8, path=None, scale: float = 1.3):
    """Images [N, 3, H, W] in [0, 1] as a grid with optional (small) titles."""
    import matplotlib.pyplot as plt

    n = len(images)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(scale * ncols, (scale + 0.25 * bool(titles)) * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].permute(1, 2, 0).cpu().float().numpy(), interpolation="nearest")
            if titles:
                ax.set_title(titles[i], fontsize=5, wrap=True)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "metrics.csv")


def plot_curves(metrics: pd.DataFrame, columns: list[str], title: str = "", path=None, logy: bool = False):
    """One line per column against `step` (rows where the column is missing are skipped), with ± one
    standard error where a `<column>_se` column exists. A column with one point (an evaluation at the
    end only) is a labelled marker, and the title says so, rather than a dot on an empty axis."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    lengths = []
    for col in columns:
        if col not in metrics:
            continue
        se = f"{col}_se" if f"{col}_se" in metrics else None
        rows = metrics[["step", col] + ([se] if se else [])].dropna(subset=[col])
        lengths.append(len(rows))
        marker = "o" if len(rows) < 30 else None
        if se:
            ax.errorbar(rows["step"], rows[col], yerr=rows[se].fillna(0), label=col, marker=marker, capsize=3)
        else:
            ax.plot(rows["step"], rows[col], label=col, marker=marker)
        if len(rows) == 1:
            step, value = rows["step"].iloc[0], rows[col].iloc[0]
            ax.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(8, 4), fontsize=8)
    if lengths and max(lengths) == 1:
        ax.margins(x=0.5)
        title = f"{title} (one evaluation, at step {int(metrics['step'].max())})" if title else "one evaluation"
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    if lengths:
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def curve_ends(run_dirs: dict[str, str | Path], prefix: str, last: int = 3) -> pd.DataFrame:
    """Per run (rows) and metric starting with `prefix` (columns): "first -> mean of the last
    `last` values", the table form of `compare_runs` (e.g. the KL to each teacher during OPD)."""
    rows = {}
    for label, directory in run_dirs.items():
        m = read_metrics(directory)
        rows[label] = {c: f"{m[c].dropna().iloc[0]:.1f} -> {m[c].dropna().iloc[-last:].mean():.1f}"
                       for c in m if c.startswith(prefix)}
    return pd.DataFrame.from_dict(rows, orient="index")


def compare_runs(run_dirs: dict[str, str | Path], prefix: str, title: str = "", path=None):
    """One panel per metric whose name starts with `prefix` (e.g. "teacher_kl/"), one line per run:
    the same curves of several runs side by side (e.g. the OPD objectives). Standard-error columns
    (`*_se`) are no panels of their own."""
    metrics = {label: read_metrics(d) for label, d in run_dirs.items()}
    names = sorted({c for m in metrics.values() for c in m if c.startswith(prefix) and not c.endswith("_se")})
    return panels(metrics, names or [prefix], title=title, path=path)


def panels(runs: dict[str, pd.DataFrame], columns: list[str], logy: tuple[str, ...] = (), title: str = "", path=None):
    """One panel per column, one line per run (label -> its metrics) against `step`; where a run's
    metrics carry a `stage` column (diagnostics.curves' chains), a dotted line where a later stage begins."""
    import matplotlib.pyplot as plt

    ncols = min(3, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.7 * nrows), squeeze=False)
    for ax in axes.flat[len(columns):]:
        ax.axis("off")
    for label, metrics in runs.items():
        starts = metrics.groupby("stage", sort=False)["step"].min().iloc[1:] - 1 if "stage" in metrics else []
        for ax, column in zip(axes.flat, columns):
            if column not in metrics:
                continue
            rows = metrics[["step", column]].dropna()
            line, = ax.plot(rows["step"], rows[column], marker="." if len(rows) < 60 else None, lw=1, label=label)
            for start in starts:
                ax.axvline(start, color=line.get_color(), ls=":", lw=1)
    for ax, column in zip(axes.flat, columns):
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("update")
        if column in logy:
            ax.set_yscale("log")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_efficiency(table: pd.DataFrame, title: str = "", path=None):
    """Learning curves against rollout samples with +-1 standard error, one line per trainer (the
    legend gives its samples/s): `teachers.efficiency`'s table (trainer, samples, metric, se, samples_per_s)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, rows in table.groupby("trainer", sort=False):
        rate = rows["samples_per_s"].dropna()
        label = f"{name} ({rate.iloc[-1]:.0f} samples/s)" if len(rate) else name
        ax.errorbar(rows["samples"], rows["metric"], yerr=rows["se"], marker="o", capsize=3, label=label)
    ax.set_xlabel("rollout samples")
    ax.set_ylabel("own metric")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def bars(table: pd.DataFrame, title: str, path=None, columns=("geneval", "ocr", "pickscore", "deqa", "Avg")):
    """Grouped bars of a model x metric table (deqa / 5, so every metric is on [0, 1]), with
    +-1 standard error where the table has `<metric>_se` columns."""
    shown = table[[c for c in columns if c in table]].astype(float).copy()
    errors = pd.DataFrame({c: table[f"{c}_se"] if f"{c}_se" in table else 0.0 for c in shown}, index=table.index)
    if "deqa" in shown:
        shown["deqa"], errors["deqa"] = shown["deqa"] / 5, errors["deqa"] / 5
    ax = shown.plot.bar(yerr=errors, capsize=2, figsize=(max(6, 0.9 * len(table)), 3.4), rot=30, title=title)
    ax.legend(fontsize=7, ncol=len(shown.columns))
    ax.figure.tight_layout()
    if path is not None:
        ax.figure.savefig(path, dpi=120)
    return ax


def changes_figure(changes: pd.DataFrame, title: str = "", path=None, reference: str = "base"):
    """One panel per metric: each model's paired change from `reference` with its 95% interval
    (`evaluation.changes`), a dashed line at 0; filled markers where the interval excludes 0."""
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(changes.index.get_level_values("metric")))
    models = changes.index.get_level_values("model").nunique()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 1.6 + 0.45 * models), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = changes.xs(metric, level="metric")
        y = range(len(rows))
        for i, (model, r) in enumerate(rows.iterrows()):
            measured = r["verdict"] != "no difference"
            ax.errorbar(r["diff"], i, xerr=[[r["diff"] - r["low"]], [r["high"] - r["diff"]]], fmt="o", capsize=3,
                        color="C0" if measured else "0.5", markerfacecolor="C0" if measured else "white")
        ax.axvline(0, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_yticks(list(y), rows.index if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_title(f"{metric} - {reference}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
