"""The explorer's ipywidgets UI: pick a prompt, a model and a seed; step through the trajectory.

`Explorer` samples a new trace (trace.py) only when the prompt, model, seed or sampler changes;
its Play button and step slider re-render from the cached arrays (as PNG bytes, cached per step),
so stepping never calls the model. Needs a live kernel; figures.py saves the same views as files.
"""
from __future__ import annotations

import io

import numpy as np

from .. import adapters, flow, toy
from ..models.base import FlowModel
from ..tasks import TASKS
from .figures import draw_curve, heat_colors
from .trace import BASE_LABEL, MODES, Trace, as_prompt, label, trace


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
        self.prompts = prompts or [p for task in TASKS for p in toy.sample_prompts(task, prompts_per_task, "test")]
        self.prompt_menu = widgets.Dropdown(options=[(f"{p.task}: {p.text}", i) for i, p in enumerate(self.prompts)],
                                            description="test prompt", layout={"width": "420px"})
        self.text = widgets.Text(description="prompt", continuous_update=False, layout={"width": "420px"})
        self.task = widgets.Dropdown(options=TASKS, description="task (routing)")
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


__all__ = ["Explorer", "PANELS", "curve_png", "panel_titles", "png_bytes"]
