"""The shared evaluation protocol: one table row per model, one column per metric.

Protocol (METHOD.md section 8, in miniature): test prompts of each task, ODE sampling with fixed
steps, CFG and seeds (every model starts from the same noise), each task judged by its reward:

    geneval          strict GenEval accuracy on geneval prompts (+ geneval/<tag> per category)
    ocr              mean OCR reward (1 - normalised edit distance) on ocr prompts
    pickscore        learned preference score (the proxy GRPO optimises) on pickscore prompts
    pickscore_true   the hidden taste behind it (the truth: reward hacking = proxy up, truth down)
    deqa             image quality, 1-5, on deqa prompts
    Avg              mean of the normalised metrics, as the paper's Avg column

With `cache_dir`, each (model, task) result is stored under a key made of the model's weights (the
base's and its adapter's, see `fingerprint`), the judging reward's version (`rewards.version`) and
the protocol, so a study evaluates each adapter once: the stage that trains it and the summary that
tabulates it share the measurement.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from . import data, rewards, rollout
from .models.base import FlowModel

TASKS = ("geneval", "ocr", "pickscore", "deqa")
# The paper's Avg = mean(GenEval, OCR, DeQA / 5, PickScore / 26); the toy PickScore is already in [0, 1].
NORMALISERS = {"geneval": 1.0, "ocr": 1.0, "pickscore": 1.0, "deqa": 5.0}


def task_metrics(task: str, prompts: list, images: torch.Tensor, reward_name: str | None = None) -> dict[str, float]:
    """Metrics of one task from its reward's outputs (see the module docstring)."""
    scores = rewards.score(reward_name or task, images, prompts)
    if task == "geneval":  # GenEval's overall score: the mean of the per-category accuracies
        categories = rewards.geneval.per_category(scores["strict"].float().cpu(), prompts)
        out = {"geneval": categories.pop("overall"), "geneval_partial": scores["reward"].float().mean().item()}
        return {**out, **{f"geneval/{tag}": acc for tag, acc in categories.items()}}
    mean = lambda key: scores[key].float().mean().item()  # noqa: E731
    if task == "pickscore":  # the toy proxy also reports the hidden taste it approximates
        return {"pickscore": mean("reward"), **({"pickscore_true": mean("true")} if "true" in scores else {})}
    if task == "deqa":  # on the 1-5 scale (the DeQA server's reward is quality / 5)
        return {"deqa": mean("quality" if "quality" in scores else "reward")}
    return {task: mean("reward")}


def scores_of(model: FlowModel, **kwargs) -> dict[str, float]:
    """One model's metrics as a dict (for logging during training); kwargs as `evaluate`."""
    return evaluate({"model": model}, **kwargs).iloc[0].to_dict()


def average(row: dict[str, float]) -> float:
    return sum(row[t] / NORMALISERS[t] for t in NORMALISERS) / len(NORMALISERS)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model) -> str:
    """sha256 of every weight a model's samples depend on (+ the adapter scaling or active adapters).

    An adapter view (`adapters.view`) counts the base's weights plus its own adapter's weights and
    scaling, whatever the adapter is called (a teacher loaded under another name is the same model;
    other adapters on the same base do not change its samples); any other model counts all its
    weights and which adapters are active."""
    from .adapters import AdaptedModel

    if isinstance(model, AdaptedModel):
        base, adapter = model.model, model.name
        tensors = [(n.replace(".base_layer.", "."), t) for n, t in [*base.named_parameters(), *base.named_buffers()]
                   if "lora_" not in n]  # names as without peft's wrappers: a base with or without adapters
        scaling = None
        if adapter is not None:
            tensors += [(n.replace(f".{adapter}.", "."), t) for n, t in base.transformer.named_parameters()
                        if "lora_" in n and f".{adapter}." in n]
            config = base.transformer.peft_config[adapter]
            scaling = [config.r, config.lora_alpha, config.use_rslora, config.use_dora]
        return _digest(tensors) + json.dumps(scaling)
    active = list(model.transformer.active_adapters()) if getattr(model.transformer, "peft_config", None) else []
    return _digest([*model.named_parameters(), *model.named_buffers()]) + json.dumps(active)


def _cache_key(model_fingerprint: str, task: str, prompts: list, reward: str | None, protocol: dict) -> str:
    text = json.dumps({"model": model_fingerprint, "task": task, "reward": reward, "prompts": [p.text for p in prompts],
                       "reward_version": rewards.version(reward or task),
                       **protocol}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def evaluate(models: FlowModel | dict[str, FlowModel], tasks: tuple[str, ...] = TASKS, n_prompts: int = 128,
             steps: int = 20, cfg_scale: float = 3.0, seed: int = 0, prompt_root: str | None = None,
             reward_for_task: dict[str, str] | None = None, shift: float = 1.0,
             prompts_for_task: Callable[[str, int, int], list] | None = None,
             cache_dir: str | Path | None = None) -> pd.DataFrame:
    """The metric table: one row per model (index = name), columns as in the module docstring.

    Prompts: `data.prompts` of the test split (toy, or Flow-GRPO's files under `prompt_root`), or
    any `prompts_for_task(task, n, seed)`; `reward_for_task` maps a task to the reward that judges
    it (default: the reward of the same name; SD3.5-M: geneval_server, rapidocr, ...).
    `cache_dir`: reuse results of the same weights under the same protocol (module docstring)."""
    if not isinstance(models, dict):
        models = {"model": models}
    prompts_for_task = prompts_for_task or (lambda task, n, s: data.prompts(task, n, "test", s, prompt_root))
    prompt_sets = {task: prompts_for_task(task, n_prompts, seed) for task in tasks}
    protocol = {"steps": steps, "cfg_scale": cfg_scale, "seed": seed, "shift": shift}
    rows = {}
    for name, model in models.items():
        row = {}
        model_fingerprint = fingerprint(model) if cache_dir is not None else None
        for task, prompts in prompt_sets.items():
            reward = (reward_for_task or {}).get(task)
            cached = None
            if cache_dir is not None:
                cached = Path(cache_dir) / f"{_cache_key(model_fingerprint, task, prompts, reward, protocol)}.json"
                if cached.exists():
                    row.update(json.loads(cached.read_text()))
                    continue
            images = rollout.generate(model, [p.text for p in prompts], steps=steps, cfg_scale=cfg_scale, seed=seed,
                                      shift=shift)
            metrics = task_metrics(task, prompts, images, reward)
            row.update(metrics)
            if cached is not None:  # write-then-rename: stages running side by side never read half a file
                cached.parent.mkdir(parents=True, exist_ok=True)
                partial = cached.with_suffix(f".{os.getpid()}.tmp")
                partial.write_text(json.dumps(metrics))
                partial.replace(cached)
        if all(t in row for t in NORMALISERS):
            row["Avg"] = average(row)
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    main = [c for c in ("geneval", "ocr", "pickscore", "pickscore_true", "deqa", "Avg") if c in table]
    return table[main + [c for c in table.columns if c not in main]]


def sample_grid(models: dict[str, FlowModel], prompts: list[str], steps: int = 20, cfg_scale: float = 3.0,
                seed: int = 0, path=None, shift: float = 1.0):
    """A models x prompts grid of samples from the same noise (a matplotlib Figure)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), len(prompts), figsize=(1.3 * len(prompts), 1.45 * len(models)),
                             squeeze=False)
    for r, (name, model) in enumerate(models.items()):
        images = rollout.generate(model, prompts, steps=steps, cfg_scale=cfg_scale, seed=seed, shift=shift)
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
            if r == 0:
                ax.set_title(prompts[c], fontsize=5, wrap=True)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
