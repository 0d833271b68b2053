"""The trajectory explorer: see what on-policy distillation does, step by step.

A research tool beside the method (no stage imports it), in three layers:

    trace.py    data: `trace` (one trajectory and, at each of its states, the student's and the
                routed teacher's predicted clean images, their velocity distance, the per-step KL
                to the teacher and the MAR term), `compare` (several models from the same noise),
                `group` (G samples of one prompt: GRPO's rewards vs OPD's per-step KLs). The only
                model calls; they return numpy arrays.
    figures.py  matplotlib views of those arrays (`trace_figure`, `steps_figure`, `compare_figure`,
                `group_figure`) and `save_png` / `save_gif`: executed notebooks keep files.
    widget.py   `Explorer`, an ipywidgets UI whose Play + slider re-render from the cached arrays.

    tr = explorer.trace(model, prompt, adapter="student", seed=0, steps=10)
    explorer.save_png(explorer.steps_figure(tr), "out/trajectory.png")
    explorer.save_gif(tr, "out/trajectory.gif")
    explorer.Explorer(model)        # the last line of a notebook cell

Every public name is re-exported here, so `from flowopd_lib import explorer; explorer.trace(...)`
works. (`explorer.trace` is the function; the module is `flowopd_lib.explorer.trace` in sys.modules,
reached with `from flowopd_lib.explorer.trace import ...`.)
"""
from .figures import (compare_figure, draw_curve, group_figure, heat_colors, save_gif, save_png, steps_figure,
                      trace_figure)
from .trace import (BASE_LABEL, MODES, Group, Trace, as_prompt, compare, group, label, routed_teacher, to_images,
                    trace)  # binds the name `trace` to the function, over the submodule
from .widget import PANELS, Explorer, curve_png, panel_titles, png_bytes

__all__ = ["BASE_LABEL", "Explorer", "Group", "MODES", "PANELS", "Trace", "as_prompt", "compare", "compare_figure",
           "curve_png", "draw_curve", "group", "group_figure", "heat_colors", "label", "panel_titles", "png_bytes",
           "routed_teacher", "save_gif", "save_png", "steps_figure", "to_images", "trace", "trace_figure"]
