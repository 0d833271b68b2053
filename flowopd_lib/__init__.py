"""flowopd_lib: Flow-OPD (multi-teacher on-policy distillation for flow-matching text-to-image
models), one code path from the CPU toy world to SD3.5-Medium.

Submodules load on first use (`from flowopd_lib import toy, rewards`), so `import flowopd_lib`
stays fast and never pulls diffusers/transformers unless a model is asked for.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "flow", "config", "tracking", "checkpoint", "toy", "rewards", "models", "rollout", "pretrain",
    "evaluation", "viz",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
