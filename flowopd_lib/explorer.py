"""The trajectory explorer: see what on-policy distillation does, step by step (issue 7).

Data first. `trace` samples one trajectory (SDE or ODE) from a model (the base or one adapter)
and computes, at every state it visits, what Flow-OPD looks at: the student's and the routed
teacher's velocities as predicted clean images `decode(x_s - s v)`, the per-pixel distance
||v_student - v_teacher||, the per-step KL to the teacher (minus the dense reward, `opd.step_kl`)
and the MAR term (the same KL form against the anchor, the base by default). `compare` runs
several models from the same noise; `group` draws G SDE samples of one prompt with their rewards
(what GRPO sees) and their per-step KLs to the teacher (what OPD sees). Only these three call the
model (without gradients); they return numpy arrays.

Then views of those arrays, which never call the model: matplotlib figures (`trace_figure`,
`steps_figure`, `compare_figure`, `group_figure`), `save_png` / `save_gif` (executed notebooks keep
files, not live widgets), and `Explorer`, an ipywidgets UI whose Play + slider re-render from the
cached arrays.

    tr = explorer.trace(model, prompt, adapter="student", seed=0, steps=10)
    explorer.save_png(explorer.steps_figure(tr), "out/trajectory.png")
    explorer.save_gif(tr, "out/trajectory.gif")
    explorer.Explorer(model)        # the last line of a notebook cell
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import adapters, flow, grpo, opd, rollout, toy
from .models.base import FlowModel

MODES = ("sde", "ode")
BASE_LABEL = "base"  # how the base model (adapter None) is named in figures and menus


def label(adapter: str | None) -> str:
    return BASE_LABEL if adapter is None else adapter


def as_prompt(text: str, task: str) -> toy.Prompt:
    """A typed prompt of a task: its spec parsed from the text, or empty when the toy grammar
    cannot parse it (it still samples and routes; only the rewards need the spec)."""
    try:
        return toy.parse_prompt(text, task)
    except ValueError:
        return toy.Prompt(text, task, {})


def routed_teacher(model: FlowModel, prompt) -> str | None:
    """The adapter OPD routes the prompt to (`opd.teacher_name(task)`), None when the model lacks it."""
    task = getattr(prompt, "task", None)
    name = opd.teacher_name(task) if task else None
    return name if name in adapters.names(model) else None


def to_images(model: FlowModel, latents: torch.Tensor) -> np.ndarray:
    """Latents [N, C, h, w] -> images [N, H, W, 3] float32 in [0, 1]."""
    return model.decode(latents).permute(0, 2, 3, 1).float().cpu().numpy()


# ----------------------------------------------------------------------------- one trajectory

@dataclass
class Trace:
    """One trajectory and what OPD sees along it; step k goes from states[k] (at sigmas[k]) to states[k + 1]."""
    prompt: object                 # toy.Prompt (or a plain string)
    adapter: str | None            # the sampled model (None = the base)
    teacher: str | None            # the adapter it is compared with (None: the model has no teacher for the task)
    anchor: str | None             # the MAR anchor (None = the base)
    mode: str                      # "sde" or "ode"
    seed: int
    noise_level: float             # of the SDE, and of the step Gaussians the KLs compare
    sigmas: np.ndarray             # [T + 1]
    latents: np.ndarray            # [T + 1, C, h, w] the states x_s
    states: np.ndarray             # [T + 1, H, W, 3] decoded states; states[-1] is the sample
    student_x0: np.ndarray         # [T, H, W, 3] decode(x_s - s v_student)
    teacher_x0: np.ndarray | None  # [T, H, W, 3] decode(x_s - s v_teacher), None without a teacher
    distance: np.ndarray | None    # [T, H, W] ||v_student - v_teacher|| per latent pixel, upsampled
    kl: np.ndarray                 # [T] per-step KL to the teacher (NaN without a teacher)
    mar: np.ndarray                # [T] per-step KL-form distance to the anchor

    @property
    def steps(self) -> int:
        return len(self.kl)

    @property
    def text(self) -> str:
        return rollout.text_of(self.prompt)


def _embeddings(model: FlowModel, text: str, n: int, cfg_scale: float):
    cond = model.encode_prompts([text] * n)
    return cond, (model.encode_prompts([""] * n) if cfg_scale != 1.0 else None)


def _next_state(v, x, sigma, sigma_next, mode: str, noise_level: float, noise: torch.Tensor) -> torch.Tensor:
    if mode == "ode":
        return flow.ode_step(v, x, sigma, sigma_next)
    return flow.sde_step(v, x, sigma, sigma_next, noise_level, noise=noise).prev_sample


def _check(mode: str, noise_level: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    if noise_level <= 0:
        raise ValueError(f"noise_level={noise_level}: the step KLs compare SDE Gaussians, so it must be > 0 "
                         "(mode='ode' samples without noise)")


@torch.no_grad()
def trace(model: FlowModel, prompt, adapter: str | None = None, seed: int = 0, steps: int = 10, mode: str = "sde",
          noise_level: float = flow.NOISE_LEVEL, cfg_scale: float = 1.0, teacher: str | None = None, anchor: str | None = None,
          shift: float = 1.0) -> Trace:
    """Sample one trajectory from `adapter` (None = the base) and compute, at its states, the
    teacher's and the anchor's velocities (teacher None = the prompt's routed teacher).

    The SDE trajectory equals `rollout.sample_trajectories` for the same seed (what OPD trains on);
    the ODE one starts from the same noise."""
    _check(mode, noise_level)
    teacher = routed_teacher(model, prompt) if teacher is None else teacher
    sigmas = flow.sigma_schedule(steps, shift).to(model.device)
    noise = rollout.sample_noise(model, [seed], steps)[0]
    cond, uncond = _embeddings(model, rollout.text_of(prompt), 1, cfg_scale)
    names = list(dict.fromkeys([adapter, anchor] + ([teacher] if teacher else [])))
    x, states, velocities = noise[:1], [noise[:1]], {n: [] for n in names}
    for k in range(steps):
        for name in names:
            velocities[name].append(rollout.guided_velocity(adapters.view(model, name), x, sigmas[k].expand(1),
                                                            cond, uncond, cfg_scale))
        x = _next_state(velocities[adapter][-1], x, sigmas[k], sigmas[k + 1], mode, noise_level, noise[k + 1:k + 2])
        states.append(x)
    latents = torch.cat(states)
    v = {n: torch.cat(vs).float() for n, vs in velocities.items()}
    return _trace_from(model, prompt, adapter, teacher, anchor, mode, seed, noise_level, sigmas, latents, v)


def _trace_from(model, prompt, adapter, teacher, anchor, mode, seed, noise_level, sigmas, latents, v) -> Trace:
    """The arrays of a Trace from its states [T + 1, ...] and each model's velocities [T, ...]."""
    x, s, s_next = latents[:-1].float(), sigmas[:-1], sigmas[1:]
    predict_x0 = lambda velocity: to_images(model, (x - s.view(-1, 1, 1, 1) * velocity).to(latents.dtype))  # noqa: E731
    kl_to = lambda name: opd.step_kl(v[adapter], v[name], x, s, s_next, noise_level).cpu().numpy()  # noqa: E731
    states = to_images(model, latents)
    teacher_x0 = distance = None
    kl = np.full(len(x), np.nan, dtype=np.float32)
    if teacher:
        teacher_x0, kl = predict_x0(v[teacher]), kl_to(teacher)
        per_latent_pixel = (v[adapter] - v[teacher]).norm(dim=1, keepdim=True)
        distance = torch.nn.functional.interpolate(per_latent_pixel, size=states.shape[1:3], mode="nearest")[:, 0]
        distance = distance.cpu().numpy()
    return Trace(prompt, adapter, teacher, anchor, mode, seed, noise_level, sigmas.cpu().numpy(),
                 latents.float().cpu().numpy(), states, predict_x0(v[adapter]), teacher_x0, distance, kl,
                 kl_to(anchor))


def compare(model: FlowModel, prompt, adapters_list: list[str | None], seed: int = 0, steps: int = 10,
            mode: str = "ode", **trace_kwargs) -> dict[str, Trace]:
    """One trace per model (None = the base), all from the same noise: label -> Trace."""
    return {label(name): trace(model, prompt, name, seed, steps, mode, **trace_kwargs) for name in adapters_list}


# ----------------------------------------------------------------------------- a group of samples

@dataclass
class Group:
    """G SDE samples of one prompt: the terminal rewards GRPO learns from, the dense KLs OPD learns from."""
    prompt: object
    adapter: str | None
    teacher: str | None
    reward_weights: dict
    images: np.ndarray      # [G, H, W, 3]
    rewards: np.ndarray     # [G] weighted reward (grpo.combined_rewards)
    advantages: np.ndarray  # [G] group-normalised advantages (grpo.group_advantages)
    kl: np.ndarray          # [G, T] per-step KL to the teacher at each sample's own states (NaN without one)


@torch.no_grad()
def group(model: FlowModel, prompt: toy.Prompt, adapter: str | None = None, G: int = 8, seed: int = 0,
          steps: int = 10, noise_level: float = flow.NOISE_LEVEL, cfg_scale: float = 1.0, rewards: dict | None = None,
          teacher: str | None = None, shift: float = 1.0) -> Group:
    """G SDE samples (seeds seed .. seed + G - 1; sample 0 is `trace(..., seed=seed)`), their rewards
    (default: the reward named like the prompt's task) and per-step KLs to the (routed) teacher."""
    _check("sde", noise_level)
    teacher = routed_teacher(model, prompt) if teacher is None else teacher
    weights = rewards or {prompt.task: 1.0}
    traj = rollout.sample_trajectories(adapters.view(model, adapter), [prompt] * G, [seed + i for i in range(G)],
                                       steps, noise_level, cfg_scale, shift)
    total, _ = grpo.combined_rewards(traj.images, traj.prompts, weights)
    advantages, _ = grpo.group_advantages(total, G)
    kl = torch.full((G, steps), float("nan"))
    if teacher:
        teacher_view = adapters.view(model, teacher)
        for k in range(steps):
            v_teacher = rollout.guided_velocity(teacher_view, traj.latents[:, k], traj.sigmas[k].expand(G),
                                                traj.cond, traj.uncond, cfg_scale)
            kl[:, k] = opd.step_kl(traj.velocities[:, k], v_teacher, traj.latents[:, k], traj.sigmas[k],
                                   traj.sigmas[k + 1], noise_level).cpu()
    return Group(prompt, adapter, teacher, weights, traj.images.permute(0, 2, 3, 1).cpu().numpy(),
                 total.numpy(), advantages.numpy(), kl.numpy())


# ----------------------------------------------------------------------------- figures (no model calls)

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


# ----------------------------------------------------------------------------- the widget

def png_bytes(image: np.ndarray, size: int) -> bytes:
    """An image [H, W, 3] in [0, 1] as PNG bytes, upscaled to size x size with sharp pixels."""
    from PIL import Image

    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).resize((size, size), Image.NEAREST).save(out, format="PNG")
    return out.getvalue()


def curve_png(tr: Trace, step: int) -> bytes:
    """The KL/MAR curve with `step` marked, as PNG bytes (a pyplot-free figure: nothing leaks into
    the notebook's inline output)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 2.4), dpi=90)
    draw_curve(fig.add_subplot(), tr, step)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


PANELS = ("state", "student", "teacher", "distance", "sample")


def panel_titles(tr: Trace) -> dict[str, str]:
    return {"state": "state x_s", "student": f"{label(tr.adapter)}: x_0 prediction",
            "teacher": f"{tr.teacher or 'no teacher'}: x_0 prediction", "distance": "|v_model - v_teacher|",
            "sample": "the sample"}


class Explorer:
    """Pick a prompt, a model and a seed; step through the trajectory with Play + slider.

    Changing the prompt, model, seed or mode samples a new trace (the only model calls); stepping
    re-renders from the trace's arrays, with each step's PNGs cached. Display it as a cell's last
    expression (or `display(explorer.widget)`)."""

    def __init__(self, model: FlowModel, prompts: list | None = None, steps: int = 10, seed: int = 0,
                 mode: str = "sde", noise_level: float = flow.NOISE_LEVEL, cfg_scale: float = 1.0, prompts_per_task: int = 4,
                 size: int = 128):
        import ipywidgets as widgets

        self.model, self.steps, self.noise_level, self.cfg_scale, self.size = model, steps, noise_level, cfg_scale, size
        self.prompts = prompts or [p for task in toy.TASKS for p in toy.sample_prompts(task, prompts_per_task, "test")]
        self.prompt_menu = widgets.Dropdown(options=[(f"{p.task}: {p.text}", i) for i, p in enumerate(self.prompts)],
                                            description="test prompt", layout={"width": "420px"})
        self.text = widgets.Text(description="prompt", continuous_update=False, layout={"width": "420px"})
        self.task = widgets.Dropdown(options=toy.TASKS, description="task (routing)")
        self.model_menu = widgets.Dropdown(options=[BASE_LABEL, *adapters.names(model)], description="model")
        self.seed = widgets.IntText(value=seed, description="seed", layout={"width": "160px"})
        self.mode = widgets.ToggleButtons(options=MODES, value=mode, description="sampler",
                                          style={"button_width": "60px"})
        self.play = widgets.Play(min=0, max=steps - 1, interval=500, description="play")
        self.slider = widgets.IntSlider(min=0, max=steps - 1, description="step")
        self.slider.add_class("flowopd-slider")
        widgets.jslink((self.play, "value"), (self.slider, "value"))
        square = {"width": f"{size}px", "height": f"{size}px"}
        self.images = {name: widgets.Image(format="png", layout=square) for name in PANELS}
        self.titles = {name: widgets.HTML(layout={"width": f"{size + 10}px"}) for name in PANELS}
        self.curve = widgets.Image(format="png")
        self.status = widgets.HTML()
        self.widget = self._layout(widgets)
        self._quiet = False
        self._select_prompt(self.prompts[0])
        self.prompt_menu.observe(lambda change: self._select_prompt(self.prompts[change["new"]]), "value")
        for control in (self.text, self.task, self.model_menu, self.seed, self.mode):
            control.observe(lambda _: self.resample(), "value")
        self.slider.observe(lambda change: self.show(change["new"]), "value")

    def _layout(self, widgets):
        for name, image in [*self.images.items(), ("curve", self.curve)]:
            image.add_class(f"flowopd-{name}")  # handles for the browser test
        panels = [widgets.VBox([self.titles[name], self.images[name]]) for name in PANELS]
        controls = widgets.VBox([widgets.HBox([self.prompt_menu, self.model_menu]),
                                 widgets.HBox([self.text, self.task]),
                                 widgets.HBox([self.seed, self.mode]),
                                 widgets.HBox([self.play, self.slider])])
        return widgets.VBox([controls, widgets.HBox(panels), widgets.HBox([self.curve, self.status])])

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _select_prompt(self, prompt) -> None:
        """Fill the text box and task from a test prompt, then sample once."""
        self._quiet = True
        self.text.value, self.task.value = prompt.text, prompt.task
        self._quiet = False
        self.resample()

    @property
    def prompt(self) -> toy.Prompt:
        chosen = self.prompts[self.prompt_menu.value]
        same = chosen.text == self.text.value and chosen.task == self.task.value
        return chosen if same else as_prompt(self.text.value, self.task.value)

    @property
    def adapter(self) -> str | None:
        return None if self.model_menu.value == BASE_LABEL else self.model_menu.value

    def resample(self) -> None:
        """Sample a new trace for the current controls (the widget's only model calls)."""
        if self._quiet:
            return
        self.trace = trace(self.model, self.prompt, self.adapter, self.seed.value, self.steps, self.mode.value,
                           self.noise_level, self.cfg_scale)
        self._heat = heat_colors(self.trace)
        self._frames: dict[int, dict[str, bytes]] = {}
        self.images["sample"].value = png_bytes(self.trace.states[-1], self.size)
        for name, title in panel_titles(self.trace).items():
            self.titles[name].value = (f"<div title='{title}' style='font-size: 11px; font-weight: bold; "
                                       f"white-space: nowrap; overflow: hidden; text-overflow: ellipsis'>{title}</div>")
        self.show(self.slider.value)

    def frame(self, k: int) -> dict[str, bytes]:
        """PNGs of step k (cached): the four image panels and the curve."""
        if k not in self._frames:
            tr, blank = self.trace, np.full((1, 1, 3), 0.85, dtype=np.float32)
            teacher_x0 = blank if tr.teacher_x0 is None else tr.teacher_x0[k]
            distance = blank if self._heat is None else self._heat[k]
            self._frames[k] = {"state": png_bytes(tr.states[k], self.size), "student": png_bytes(tr.student_x0[k], self.size),
                               "teacher": png_bytes(teacher_x0, self.size), "distance": png_bytes(distance, self.size),
                               "curve": curve_png(tr, k)}
        return self._frames[k]

    def show(self, k: int) -> None:
        """Render step k from the cached arrays (no model call)."""
        tr, frame = self.trace, self.frame(k)
        for name in ("state", "student", "teacher", "distance"):
            self.images[name].value = frame[name]
        self.curve.value = frame["curve"]
        self.status.value = (f"<p>step {k + 1} of {tr.steps}, s = {tr.sigmas[k]:.3f}<br>"
                             f"model: {label(tr.adapter)}<br>teacher: {tr.teacher or 'none for task ' + self.task.value}"
                             f"<br>KL to teacher: {tr.kl[k]:.4g}<br>MAR ({label(tr.anchor)}): {tr.mar[k]:.4g}</p>")


__all__ = ["BASE_LABEL", "Explorer", "Group", "MODES", "Trace", "as_prompt", "compare", "compare_figure", "curve_png",
           "draw_curve", "group", "group_figure", "heat_colors", "png_bytes", "routed_teacher", "save_gif", "save_png",
           "steps_figure", "trace", "trace_figure"]
