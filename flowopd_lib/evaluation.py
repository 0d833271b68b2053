"""The shared evaluation protocol: one table row per model, one column per metric.

Protocol (the paper's, in miniature: docs/toy_world.md): test prompts of each task, ODE sampling with fixed
steps, CFG and seeds (`PROTOCOL`; every model starts from the same noise), each task judged by its reward:

    geneval          GenEval accuracy on geneval prompts (+ geneval/<tag> per category): the mean over
                     categories of the per-image correctness (`geneval_correct`)
    ocr              mean OCR reward (1 - normalised edit distance) on ocr prompts
    pickscore        learned preference score (the proxy GRPO optimises) on pickscore prompts
    pickscore_true   the hidden taste behind it (the truth: reward hacking = proxy up, truth down)
    deqa             image quality, 1-5, on deqa prompts
    Avg              mean of the normalised metrics, as the paper's Avg column

With `cache_dir`, each (model, task) result is stored under a key made of the model's weights (the
base's and its adapter's, see `fingerprint`), the judging reward's version (`rewards.version`) and
the protocol, so a study evaluates each adapter once: the stage that trains it and the summary that
tabulates it share the measurement.

GenEval's per-image correctness: the toy reward's "strict" (GenEval's rules on the toy scenes). Flow-GRPO's
GenEval server (`geneval_server`, reward-server's gen_eval.py) reports three things per image: "scores",
partial credit (its training reward); "strict_rewards", correct only if every count is exact (== n objects,
exactly n of the colour); and "rewards", GenEval's own `correct` (at least n objects of the class, as
GenEval's evaluate_images.py), computed only when the request says only_strict=False (else all 0).
The paper's and GenEval's numbers are `correct`, so evaluation asks the server with only_strict=False
and uses "correct" (`geneval_correct`); the server's "strict" is stricter and not GenEval's score.

pass@k and headroom (`headroom`): for tasks with an exact success (`success`: GenEval's per-image
correctness, OCR text read exactly), n samples per test prompt from the seeds seed, seed + 1, ...
(paired: sample j of a prompt starts from the same noise for every model) give pass@k, the chance
that at least one of k samples is exactly right (`pass_at_k`, the unbiased estimator of Chen et
al. 2021, averaged over prompts, with its standard error over prompts). headroom = pass@k - pass@1:
what the model can already do on some draws but not reliably, the part RL can sharpen into pass@1.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import data, rewards, rollout, safe_files, stats
from .models.base import FlowModel
from .toy.grammar import GENEVAL_TAGS

TASKS = ("geneval", "ocr", "pickscore", "deqa")
# The paper's Avg = mean(GenEval, OCR, DeQA / 5, PickScore / 26); the toy PickScore is already in [0, 1].
NORMALISERS = {"geneval": 1.0, "ocr": 1.0, "pickscore": 1.0, "deqa": 5.0}
EXACT_TASKS = ("geneval", "ocr")  # tasks whose samples are exactly right or not (`success`)

# The toy world's evaluation protocol, declared here once: the shipped teachers were trained and measured
# under it (their adapter.json records it), and every default of the toy world (these functions, EvalConfig,
# the notebooks) follows it. CFG 1 (no guidance): at CFG 1 the base's skills are latent and the
# forward-process trainers need no guidance in their rollouts. SD3.5-M's spec overrides it (CFG 4.5, 40 steps).
PROTOCOL = {"cfg_scale": 1.0, "steps": 20, "seed": 0}

# The evaluation that decides, in EvalConfig's terms (test draws and samples per draw, per task): at these
# sizes a paired teacher - base difference has a 95% interval half-width <= 0.03 on GenEval, OCR and
# PickScore and <= 0.08 on DeQA, measured on the dial world's teachers by diagnostics.eval_power
# (docs/toy_world.md "How large an evaluation decides"). GenEval's 270 draws hold each of its 90 test
# prompts (its small categories repeat by design); OCR's 400 need its test file's extension.
# The study's specs name it (`eval_protocol: decisive`); `make run` keeps 90 x 1.
DECISIVE = {"eval_prompts": {"geneval": 270, "ocr": 400, "pickscore": 200, "deqa": 200},
            "eval_samples": {"geneval": 8, "ocr": 4, "pickscore": 4, "deqa": 8}}
NAMED_PROTOCOLS = {"decisive": DECISIVE}


def protocol_sizes(name: str | None, eval_prompts, eval_samples) -> tuple:
    """(eval_prompts, eval_samples) of a named evaluation (NAMED_PROTOCOLS), or the ones given (name None)."""
    if name is None:
        return eval_prompts, eval_samples
    if name not in NAMED_PROTOCOLS:
        raise ValueError(f"eval_protocol={name!r}: the named evaluations are {sorted(NAMED_PROTOCOLS)} "
                         f"(None: eval_prompts x eval_samples as given)")
    return NAMED_PROTOCOLS[name]["eval_prompts"], NAMED_PROTOCOLS[name]["eval_samples"]


def task_metrics(task: str, prompts: list, images: torch.Tensor, reward_name: str | None = None) -> dict[str, float]:
    """Metrics of one task from its reward's outputs (see the module docstring)."""
    scores = judge(task, images, prompts, reward_name)
    if task == "geneval":  # GenEval's overall score: the mean of the per-category accuracies
        categories = rewards.geneval.per_category(geneval_correct(scores).float().cpu(), prompts)
        out = {"geneval": categories.pop("overall"), "geneval_partial": scores["reward"].float().mean().item()}
        return {**out, **{f"geneval/{tag}": acc for tag, acc in categories.items()}}
    mean = lambda key: scores[key].float().mean().item()  # noqa: E731
    if task == "pickscore":  # the toy proxy also reports the hidden taste it approximates
        return {"pickscore": mean("reward"), **({"pickscore_true": mean("true")} if "true" in scores else {})}
    if task == "deqa":  # on the 1-5 scale (the DeQA server's reward is quality / 5)
        return {"deqa": mean("quality" if "quality" in scores else "reward")}
    return {task: mean("reward")}


def judge(task: str, images: torch.Tensor, prompts: list, reward_name: str | None = None) -> dict[str, torch.Tensor]:
    """The scores of the reward that judges `task` (default: the reward named like it), as
    `rewards.score`; a GenEval server is asked for GenEval's own correctness too (module docstring)."""
    name = reward_name or task
    scorer = rewards._REGISTRY.get(name)  # rewards exposes no getter; the registered (configured) client
    if task == "geneval" and isinstance(scorer, rewards.real.GenEvalServer) and scorer.only_strict:
        return dataclasses.replace(scorer, only_strict=False)(images, prompts)
    return rewards.score(name, images, prompts)


def geneval_correct(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-image GenEval correctness (0/1) from a GenEval scorer's output: "correct" where the scorer
    reports it (the GenEval server asked with only_strict=False), else "strict" (the toy reward)."""
    return scores["correct"] if "correct" in scores else scores["strict"]


def _geneval_judged_by_server(task: str, reward: str | None) -> bool:
    return task == "geneval" and isinstance(rewards._REGISTRY.get(reward or task), rewards.real.GenEvalServer)


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
    # results judged by a GenEval server before it was asked for `correct` used its stricter "strict"
    judged = {"geneval_metric": "correct"} if _geneval_judged_by_server(task, reward) else {}
    text = json.dumps({"model": model_fingerprint, "task": task, "reward": reward, "prompts": [p.text for p in prompts],
                       "reward_version": rewards.version(reward or task),
                       **protocol, **judged}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def evaluate(models: FlowModel | dict[str, FlowModel], tasks: tuple[str, ...] = TASKS, n_prompts: int = 128,
             steps: int = PROTOCOL["steps"], cfg_scale: float = PROTOCOL["cfg_scale"], seed: int = PROTOCOL["seed"], prompt_root: str | None = None,
             reward_for_task: dict[str, str] | None = None, shift: float = 1.0,
             prompts_for_task: Callable[[str, int, int], list] | None = None,
             cache_dir: str | Path | None = None, batch_size: int | None = None) -> pd.DataFrame:
    """The metric table: one row per model (index = name), columns as in the module docstring.

    Prompts: `data.prompts` of the test split (toy, or Flow-GRPO's files under `prompt_root`), or
    any `prompts_for_task(task, n, seed)`; `reward_for_task` maps a task to the reward that judges
    it (default: the reward of the same name; SD3.5-M: geneval_server, rapidocr, ...).
    `cache_dir`: reuse results of the same weights under the same protocol (module docstring).
    `batch_size`: images generated at once (None: `rollout.default_batch_size`); another size keeps
    the noise and can change the images' last float bits (rollout's module docstring)."""
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
                entry = _cached(cached, lambda content: _is_metrics(content, task))
                if entry is not None:
                    row.update(entry)
                    continue
            images = rollout.generate(model, [p.text for p in prompts], steps=steps, cfg_scale=cfg_scale, seed=seed,
                                      shift=shift, batch_size=batch_size)
            metrics = task_metrics(task, prompts, images, reward)
            row.update(metrics)
            if cached is not None:
                _write_atomically(cached, metrics)
        if all(t in row for t in NORMALISERS):
            row["Avg"] = average(row)
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    main = [c for c in ("geneval", "ocr", "pickscore", "pickscore_true", "deqa", "Avg") if c in table]
    return table[main + [c for c in table.columns if c not in main]]


# ----------------------------------------------------------------------------- pass@k and headroom

def pass_at_k_per_prompt(successes, k: int) -> np.ndarray:
    """pass@k of each prompt [P] from successes [P, n] (bool or 0/1; tensor or array): with c of n
    samples right, the unbiased estimator of Chen et al. 2021 (HumanEval), 1 - C(n - c, k) / C(n, k),
    computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i). Raises ValueError unless 1 <= k <= n."""
    s = successes.detach().cpu().numpy() if isinstance(successes, torch.Tensor) else np.asarray(successes)
    if s.ndim != 2:
        raise ValueError(f"successes must be [prompts, samples]; got shape {s.shape}")
    if s.dtype != bool and not np.isin(s, (0, 1)).all():
        raise ValueError("successes must be bool or 0/1")
    n = s.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples per prompt; got k={k}, n={n}")
    if s.shape[0] == 0:
        raise ValueError("successes has no prompts")
    c = s.astype(np.int64).sum(1)
    per_prompt = np.ones(len(c))
    for p, cp in enumerate(c):
        if n - cp >= k:  # else every k-subset holds a success
            per_prompt[p] = 1.0 - np.prod(1.0 - k / np.arange(n - cp + 1, n + 1))
    return per_prompt


def pass_at_k(successes, k: int) -> tuple[float, float]:
    """(pass@k, its standard error over prompts) from successes [P, n]: the mean of
    `pass_at_k_per_prompt` and std(ddof=1) / sqrt(P) (nan for one prompt)."""
    per_prompt = pass_at_k_per_prompt(successes, k)
    return stats.metric_and_se(per_prompt, np.zeros(len(per_prompt)))


def success(task: str, prompts: list, images: torch.Tensor, reward_name: str | None = None) -> torch.Tensor:
    """Exact success of each sample, bool [N], for N prompts and images [N, 3, H, W]: GenEval's
    correctness (`geneval_correct`), OCR's reward == 1 (the quoted text read exactly).
    `reward_name` as `reward_for_task` of `evaluate` (default: the reward named like the task)."""
    if task not in EXACT_TASKS:
        raise ValueError(f"task {task!r} has no exact success; tasks with one: {EXACT_TASKS}")
    scores = judge(task, images, prompts, reward_name)
    return (geneval_correct(scores) == 1) if task == "geneval" else (scores["reward"] == 1)


def _pass_row(s: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    row = {}
    for k in ks:
        row[f"pass@{k}"], row[f"pass@{k}_se"] = pass_at_k(s, k)
    return row


def headroom(model: FlowModel, tasks: tuple[str, ...] = EXACT_TASKS, n_prompts: int = 90, samples_per_prompt: int = 8,
             ks: tuple[int, ...] = (1, 4, 8), steps: int = PROTOCOL["steps"], cfg_scale: float = PROTOCOL["cfg_scale"], seed: int = 20,
             prompts_for_task: Callable[[str, int, int], list] | None = None, prompt_root: str | None = None,
             reward_for_task: dict[str, str] | None = None, shift: float = 1.0,
             batch_size: int | None = None) -> pd.DataFrame:
    """pass@k and headroom of one model: a row per task, and for geneval one per category ("geneval/<tag>").

    Prompts as `evaluate` draws them (`n_prompts` test prompts per task, drawn with `seed`); sample j
    of every prompt is `rollout.generate(..., seed=seed + j)` (j < samples_per_prompt), so every
    model sees the same noise and sample 0 is what `evaluate(seed=seed)` generates. Columns:
    pass@k for each k in `ks`, their standard errors over prompts (pass@k_se), headroom =
    pass@max(ks) - pass@1, prompts (count). The geneval row averages its categories' rows, as GenEval's
    overall score does (the toy test prompts weigh the tags equally, so that is also the mean over
    prompts), with standard error sqrt(sum of squared category errors) / categories."""
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in EXACT_TASKS]
    if bad:
        raise ValueError(f"tasks {bad} have no exact success; tasks with one: {EXACT_TASKS}")
    ks = tuple(dict.fromkeys(ks))
    if not ks:
        raise ValueError("give at least one k")
    for k in ks:  # fail before generating anything
        if not 1 <= k <= samples_per_prompt:
            raise ValueError(f"pass@k needs 1 <= k <= n samples per prompt; got k={k}, n={samples_per_prompt}")
    prompts_for_task = prompts_for_task or (lambda task, n, s: data.prompts(task, n, "test", s, prompt_root))
    prompt_sets = {task: prompts_for_task(task, n_prompts, seed) for task in tasks}
    columns = {task: [] for task in tasks}  # per task: samples_per_prompt bool [P] tensors
    for sample_seed in tqdm(range(seed, seed + samples_per_prompt), desc="headroom seeds"):
        for task, prompts in prompt_sets.items():
            images = rollout.generate(model, [p.text for p in prompts], steps=steps, cfg_scale=cfg_scale,
                                      seed=sample_seed, shift=shift, batch_size=batch_size)
            columns[task].append(success(task, prompts, images, (reward_for_task or {}).get(task)).cpu())
    top = max(ks)
    rows = {}
    for task, prompts in prompt_sets.items():
        s = torch.stack(columns[task], 1).numpy()  # [P, n]
        if task != "geneval":
            rows[task] = {**_pass_row(s, ks), "headroom": pass_at_k(s, top)[0] - pass_at_k(s, 1)[0],
                          "prompts": len(prompts)}
            continue
        tags = np.array([p.spec["tag"] for p in prompts])
        present = [t for t in GENEVAL_TAGS if (tags == t).any()] + sorted(set(tags) - set(GENEVAL_TAGS))
        overall = {}  # GenEval's overall score: the mean over categories (stats.metric_and_se's strata)
        for k in tuple(dict.fromkeys((1, *ks))):
            overall[f"pass@{k}"], overall[f"pass@{k}_se"] = stats.metric_and_se(pass_at_k_per_prompt(s, k), tags)
        rows["geneval"] = {**overall, "headroom": overall[f"pass@{top}"] - overall["pass@1"], "prompts": len(prompts)}
        for t in present:
            r = _pass_row(s[tags == t], tuple(dict.fromkeys((1, *ks))))
            rows[f"geneval/{t}"] = {**r, "headroom": r[f"pass@{top}"] - r["pass@1"], "prompts": int((tags == t).sum())}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "task"
    table["prompts"] = table["prompts"].astype(int)
    return table[[f"pass@{k}" for k in ks] + [f"pass@{k}_se" for k in ks] + ["headroom", "prompts"]]


# ----------------------------------------------------------------------------- metrics with uncertainty

def sample_values(task: str, prompts: list, images: torch.Tensor, reward_name: str | None = None) -> dict[str, torch.Tensor]:
    """Each sample's contribution [N] to the task's metrics (the metric is their mean, per category
    for GenEval): geneval per-image correctness (`geneval_correct`); ocr, pickscore (+ pickscore_true),
    deqa (1-5) scores."""
    scores = judge(task, images, prompts, reward_name)
    if task == "geneval":
        return {"geneval": geneval_correct(scores).float()}
    if task == "pickscore":
        return {"pickscore": scores["reward"].float(), **({"pickscore_true": scores["true"].float()}
                                                         if "true" in scores else {})}
    if task == "deqa":
        return {"deqa": scores["quality" if "quality" in scores else "reward"].float()}
    return {task: scores["reward"].float()}


def sample_scores(models: FlowModel | dict[str, FlowModel], tasks: tuple[str, ...] = TASKS, n_prompts: int = 90,
                  samples_per_prompt: int = 1, steps: int = PROTOCOL["steps"], cfg_scale: float = PROTOCOL["cfg_scale"],
                  seed: int = PROTOCOL["seed"],
                  shift: float = 1.0, prompt_root: str | None = None, reward_for_task: dict[str, str] | None = None,
                  prompts_for_task: Callable[[str, int, int], list] | None = None,
                  cache_dir: str | Path | None = None, batch_size: int | None = None) -> pd.DataFrame:
    """Per-sample scores, one row per (model, metric, prompt, sample): columns model, metric, prompt
    (index in the task's prompt list), sample, stratum (GenEval's category; the task otherwise),
    value. Sample j of a prompt starts from the noise of seed + j for every model (paired), so sample
    0 is what `evaluate(seed=seed)` generates. `summarise` and `compare` turn it into tables.
    `cache_dir`: reuse the scores of the same weights under the same protocol (as `evaluate`);
    `batch_size` as in `evaluate`. `distributed_eval.evaluate_on_ranks` makes this table with the
    work shared over the processes of a distributed job."""
    if not isinstance(models, dict):
        models = {"model": models}
    prompts_for_task = prompts_for_task or (lambda task, n, s: data.prompts(task, n, "test", s, prompt_root))
    prompt_sets = {task: prompts_for_task(task, n_prompts, seed) for task in tasks}
    protocol = {"steps": steps, "cfg_scale": cfg_scale, "seed": seed, "shift": shift,
                "samples_per_prompt": samples_per_prompt, "kind": "per-sample"}
    frames = []
    for name, model in models.items():
        model_fingerprint = fingerprint(model) if cache_dir is not None else None
        for task, prompts in prompt_sets.items():
            reward = (reward_for_task or {}).get(task)
            cached = None if cache_dir is None else \
                Path(cache_dir) / f"{_cache_key(model_fingerprint, task, prompts, reward, protocol)}.json"
            shape = (samples_per_prompt, len(prompts))
            entry = None if cached is None else _cached(cached, lambda content: _is_sample_values(content, task, shape))
            if entry is not None:
                values = {k: np.asarray(v) for k, v in entry.items()}
            else:
                values = {}
                for j in range(samples_per_prompt):
                    images = rollout.generate(model, [p.text for p in prompts], steps=steps, cfg_scale=cfg_scale,
                                              seed=seed + j, shift=shift, batch_size=batch_size)
                    for metric_name, v in sample_values(task, prompts, images, reward).items():
                        values.setdefault(metric_name, []).append(v.cpu().numpy())
                values = {k: np.stack(v).astype(np.float64) for k, v in values.items()}  # [samples, prompts]
                if cached is not None:
                    _write_atomically(cached, {k: v.tolist() for k, v in values.items()})
            frames += score_rows(name, task, prompts, values)
    return pd.concat(frames, ignore_index=True)


def score_rows(name: str, task: str, prompts: list, values: dict[str, np.ndarray]) -> list[pd.DataFrame]:
    """`sample_scores`' rows of one (model, task): values are metric -> [samples, prompts]."""
    strata = [p.spec["tag"] if task == "geneval" else task for p in prompts]
    return [pd.DataFrame({"model": name, "metric": metric, "prompt": range(len(prompts)), "sample": j,
                          "stratum": strata, "value": row})
            for metric, v in values.items() for j, row in enumerate(v)]


def _cached(path: Path, sound: Callable[[dict], bool]) -> dict | None:
    """A cache entry's content, or None (a miss) where there is none or it is damaged (empty, cut
    off, not JSON, not of the shape written: `sound` says): a damaged entry is recomputed and
    rewritten, with a one-line warning naming it."""
    if not path.exists():
        return None
    try:
        content = safe_files.read_json_object(path, "an evaluation cache entry")
        if sound(content):
            return content
        problem = f"{path}: an evaluation cache entry not of the shape this evaluation writes"
    except safe_files.FileError as error:
        problem = re.sub(r"[;.]? *[Rr]estore it or delete it$", "", str(error))  # it is rewritten here instead
    warnings.warn(f"damaged evaluation cache entry, recomputed and rewritten: {problem}", stacklevel=3)
    return None


def _is_metrics(content: dict, task: str) -> bool:
    """`evaluate`'s entry: the task's metrics, each a number."""
    return task in content and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in content.values())


def _is_sample_values(content: dict, task: str, shape: tuple[int, int]) -> bool:
    """`sample_scores`' entry: the task's metrics, each [samples, prompts] numbers."""
    try:
        return task in content and all(np.asarray(v, dtype=np.float64).shape == shape for v in content.values())
    except (TypeError, ValueError):  # ragged lists, strings
        return False


def _write_atomically(path: Path, content) -> None:
    """Write-then-rename: stages running side by side never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(content))
    partial.replace(path)


def _per_prompt(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean over samples: one row per (model, metric, prompt) with its stratum."""
    return scores.groupby(["model", "metric", "prompt", "stratum"], sort=False, as_index=False)["value"].mean()


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per model: each metric and its standard error (`<metric>_se`, over prompts), from
    `sample_scores`."""
    rows: dict[str, dict[str, float]] = {}
    for (model, metric_name), group in _per_prompt(scores).groupby(["model", "metric"], sort=False):
        value, se = stats.metric_and_se(group["value"].to_numpy(), group["stratum"].to_numpy())
        rows.setdefault(model, {}).update({metric_name: value, f"{metric_name}_se": se})
    return pd.DataFrame.from_dict(rows, orient="index")


def compare(scores: pd.DataFrame, model: str, reference: str, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """`model` minus `reference` on each metric, with a paired bootstrap 95% interval (the same
    prompts and noise for both, resampled together): columns diff, low, high."""
    per_prompt = _per_prompt(scores)
    rows = {}
    for metric_name, group in per_prompt.groupby("metric", sort=False):
        a = group[group["model"] == model].sort_values("prompt")
        b = group[group["model"] == reference].sort_values("prompt")
        if a.empty or b.empty:
            raise ValueError(f"compare: no {metric_name!r} scores for {model if a.empty else reference!r}; "
                             f"models: {sorted(per_prompt['model'].unique())}")
        diff, low, high = stats.paired_difference(a["value"].to_numpy(), b["value"].to_numpy(),
                                                  a["stratum"].to_numpy(), n_boot=n_boot, seed=seed)
        rows[metric_name] = {"diff": diff, "low": low, "high": high}
    return pd.DataFrame.from_dict(rows, orient="index")


def changes(scores: pd.DataFrame, reference: str = "base", metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Every other model minus `reference` (paired, as `compare`): one row per (model, metric) with diff,
    low, high (95% bootstrap interval) and `verdict`: "up" or "down" where the interval excludes 0,
    "no difference" where it covers 0."""
    rows = []
    for model in [m for m in scores["model"].unique() if m != reference]:
        table = compare(scores, model, reference)
        for metric_name, r in table.iterrows():
            if metrics is None or metric_name in metrics:
                verdict = "up" if r["low"] > 0 else "down" if r["high"] < 0 else "no difference"
                rows.append({"model": model, "metric": metric_name, **r.to_dict(), "verdict": verdict})
    return pd.DataFrame(rows).set_index(["model", "metric"])

def sample_grid(models: dict[str, FlowModel], prompts: list[str], steps: int = PROTOCOL["steps"],
                cfg_scale: float = PROTOCOL["cfg_scale"], seed: int = PROTOCOL["seed"], path=None, shift: float = 1.0, batch_size: int | None = None):
    """A models x prompts grid of samples from the same noise (a matplotlib Figure)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), len(prompts), figsize=(1.3 * len(prompts), 1.45 * len(models)),
                             squeeze=False)
    for r, (name, model) in enumerate(models.items()):
        images = rollout.generate(model, prompts, steps=steps, cfg_scale=cfg_scale, seed=seed, shift=shift,
                                  batch_size=batch_size)
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
