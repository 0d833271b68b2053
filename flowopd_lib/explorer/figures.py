"""The explorer's figures: matplotlib views of traces and groups, saved as PNG or GIF.

They read the arrays of a `Trace` or `Group` (trace.py) and never call the model, so an executed
notebook keeps files, not live widgets: `trace_figure` (one step), `steps_figure` (a trajectory at
a glance), `compare_figure` (models on the same noise), `group_figure` (GRPO's view vs OPD's),
`save_png`, `save_gif`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import rollout
from .trace import Group, Trace, label


def heat_colors(tr: Trace) -> np.ndarray | None:
    """The distance maps as RGB [T, H, W, 3], one colour scale for the whole trajectory."""
    import matplotlib

    if tr.distance is None:
        return None
    scale = max(float(tr.distance.max()), 1e-12)
    return matplotlib.colormaps["magma"](tr.distance / scale)[..., :3].astype(np.float32)


def _show(ax, image: np.ndarray | None, title: str) -> None:
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=7)
    if image is None:
        ax.text(0.5, 0.5, "no teacher", ha="center", va="center", fontsize=7, transform=ax.transAxes)
    else:
        ax.imshow(image, interpolation="nearest")


def draw_curve(ax, tr: Trace, step: int | None = None) -> None:
    """Per-step KL to the teacher and MAR term against the step, the current step marked."""
    ks = np.arange(tr.steps)
    ax.plot(ks, tr.kl, marker=".", label=f"KL to {tr.teacher or 'teacher'}")
    ax.plot(ks, tr.mar, marker=".", label=f"MAR (anchor {label(tr.anchor)})")
    values = np.concatenate([tr.kl, tr.mar])
    if np.all(values[~np.isnan(values)] > 0):
        ax.set_yscale("log")
    if step is not None:
        ax.axvline(step, color="black", lw=1)
        ax.plot([step, step], [tr.kl[step], tr.mar[step]], "o", color="black", ms=4)
    ax.set_xlabel("step", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)


def _step_title(tr: Trace, k: int) -> str:
    return f"k={k} s={tr.sigmas[k]:.3g}"


def trace_figure(tr: Trace, step: int | None = None):
    """One step of a trace (default: the last): state, both predictions, distance map, KL/MAR curve."""
    import matplotlib.pyplot as plt

    k = tr.steps - 1 if step is None else step
    heat = heat_colors(tr)
    fig, axes = plt.subplots(1, 5, figsize=(11, 2.4), gridspec_kw={"width_ratios": [1, 1, 1, 1, 2]})
    _show(axes[0], tr.states[k], f"state x_s ({_step_title(tr, k)})")
    _show(axes[1], tr.student_x0[k], f"{label(tr.adapter)}: predicted x_0")
    _show(axes[2], None if tr.teacher_x0 is None else tr.teacher_x0[k], f"{tr.teacher or 'teacher'}: predicted x_0")
    _show(axes[3], None if heat is None else heat[k], "||v_student - v_teacher||")
    draw_curve(axes[4], tr, k)
    fig.suptitle(f"{tr.text}  ({tr.mode.upper()}, seed {tr.seed})", fontsize=8)
    fig.tight_layout()
    return fig


def _columns(steps: int, n: int) -> list[int]:
    return sorted(set(np.linspace(0, steps - 1, min(n, steps)).round().astype(int).tolist()))


def steps_figure(tr: Trace, columns: int = 6):
    """A trajectory at a glance: rows state / student / teacher / distance over evenly spaced steps,
    the sample, and the KL/MAR curve."""
    import matplotlib.pyplot as plt

    ks = _columns(tr.steps, columns)
    heat = heat_colors(tr)
    rows = [("state x_s", tr.states), (f"{label(tr.adapter)} x_0", tr.student_x0),
            (f"{tr.teacher or 'teacher'} x_0", tr.teacher_x0), ("|v_s - v_t|", heat)]
    fig = plt.figure(figsize=(1.25 * (len(ks) + 1) + 3.2, 5.2))
    grid = fig.add_gridspec(len(rows), len(ks) + 2, width_ratios=[1] * (len(ks) + 1) + [2.6])
    for r, (name, images) in enumerate(rows):
        for c, k in enumerate(ks):
            ax = fig.add_subplot(grid[r, c])
            _show(ax, None if images is None else images[k], _step_title(tr, k) if r == 0 else "")
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    _show(fig.add_subplot(grid[0, len(ks)]), tr.states[-1], "sample")
    draw_curve(fig.add_subplot(grid[:, -1]), tr)
    fig.suptitle(f"{tr.text}  ({label(tr.adapter)}, {tr.mode.upper()}, seed {tr.seed})", fontsize=8)
    fig.tight_layout()
    return fig


def compare_figure(traces: dict[str, Trace], columns: int = 6):
    """Models x steps: each model's predicted clean image along its own trajectory from the same noise."""
    import matplotlib.pyplot as plt

    first = next(iter(traces.values()))
    ks = _columns(first.steps, columns)
    fig, axes = plt.subplots(len(traces), len(ks) + 1, figsize=(1.25 * (len(ks) + 1), 1.35 * len(traces) + 0.4),
                             squeeze=False)
    for r, (name, tr) in enumerate(traces.items()):
        for c, k in enumerate(ks):
            _show(axes[r][c], tr.student_x0[k], _step_title(tr, k) if r == 0 else "")
        _show(axes[r][-1], tr.states[-1], "sample" if r == 0 else "")
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.suptitle(f"{first.text}  (predicted x_0, {first.mode.upper()}, seed {first.seed})", fontsize=8)
    fig.tight_layout()
    return fig


def group_figure(g: Group):
    """Top: the G samples with reward and advantage (GRPO's view). Bottom: their per-step KLs to the
    teacher (OPD's view), and reward against the trajectory's total KL."""
    import matplotlib.pyplot as plt

    n = len(g.images)
    fig = plt.figure(figsize=(max(1.3 * n, 8), 4.6))
    grid = fig.add_gridspec(2, n, height_ratios=[1, 1.6])
    for i in range(n):
        _show(fig.add_subplot(grid[0, i]), g.images[i], f"r={g.rewards[i]:.2f} A={g.advantages[i]:+.1f}")
    half = max(n // 2, 1)
    ax = fig.add_subplot(grid[1, :half])
    for i, kl in enumerate(g.kl):
        ax.plot(kl, marker=".", label=f"sample {i}")
    ax.set_xlabel("step", fontsize=7)
    ax.set_ylabel(f"KL to {g.teacher or 'teacher'}", fontsize=7)
    ax.tick_params(labelsize=6)
    scatter = fig.add_subplot(grid[1, half:])
    scatter.scatter(g.kl.sum(axis=1), g.rewards)
    scatter.set_xlabel("total KL over the trajectory", fontsize=7)
    scatter.set_ylabel(f"reward {g.reward_weights}", fontsize=7)
    scatter.tick_params(labelsize=6)
    fig.suptitle(f"{rollout.text_of(g.prompt)}  ({label(g.adapter)}, G={n})", fontsize=8)
    fig.tight_layout()
    return fig


def save_png(fig, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _figure_pixels(fig, dpi: int) -> np.ndarray:
    fig.set_dpi(dpi)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_gif(tr: Trace, path: str | Path, fps: float = 3.0, dpi: int = 80) -> Path:
    """An animated GIF of `trace_figure` over every step (PIL; loops forever)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    frames = []
    for k in range(tr.steps):
        fig = trace_figure(tr, k)
        frames.append(Image.fromarray(_figure_pixels(fig, dpi)))
        plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


__all__ = ["compare_figure", "draw_curve", "group_figure", "heat_colors", "save_gif", "save_png", "steps_figure",
           "trace_figure"]
