"""Evaluation shared over the processes of a distributed job: per-sample scores, gathered.

Why: `evaluation.sample_scores` runs in one process, so an SD3.5-M evaluation at the paper's
protocol (GenEval 553 prompts x 4 images, OCR 1018, PickScore 2048, DeQA on DrawBench's 200; 40
ODE steps with CFG) would keep one GPU busy while the job's others idle. As Flow-GRPO does, every
process here makes and scores its share of the images, and the scores are gathered.

    cfg = EvalConfig(eval_prompts={"geneval": 553, "ocr": 1018, "pickscore": 2048, "deqa": 200},
                     eval_samples={"geneval": 4}, eval_steps=40, eval_cfg=4.5,
                     eval_prompt_files={"deqa": "path/to/drawbench.txt"})  # else deqa reads pickscore/test.txt
    scores = evaluate_on_ranks(model, cfg, accelerator, seed=42, task_rewards=..., prompt_root=..., shift=3.0)
    metrics = metrics_from_scores(scores)            # {"geneval": ..., "ocr": ..., "Avg": ..., "geneval/<tag>": ...}

    python -m flowopd_lib.distributed_eval ADAPTER_DIR|base job.yaml --out scores.csv   # CLI (EvalJob fields)
    launch_eval(adapter_dir, cfg, "scores.csv", num_processes=8, accelerate_config=...)  # from a notebook

The work: for each task, sample j (its noise: seed + j, paired across models as in
`sample_scores`) and batch of `eval_batch_size` consecutive test prompts, one work batch; the list
is built alike on every process, and each process takes a contiguous run of it (runs differ by at
most one batch; a process may get none). Each batch is made with `rollout.generate(..., indices=)`,
the noise and batch boundaries of the one-process call, so every image is the one
`sample_scores(..., batch_size=eval_batch_size)` makes, bit for bit. Scores equal too where the
scorer judges each image alone (the toy GenEval, OCR and DeQA); a scorer that is a network over
the batch (the toy PickScore proxy, CLIP-based ones) can round its last float bits differently,
since `sample_scores` scores a whole task at once and this a batch at a time.

Collectives: exactly one `gather_object` per evaluation, on every process, whatever it holds (an
empty list for a process without work), so no process waits on a collective another never joins.
A process that fails sends its traceback instead of scores and every process raises it (a process
that dies or hangs outright still leaves the others waiting, up to the process group's timeout).

GenEval's metric is the mean over categories of per-image correctness: GenEval's `correct` (at
least n objects of the class) where the scorer reports it, which `evaluation.judge` asks Flow-GRPO's
GenEval server for (only_strict=False); the server's "strict" (exact counts) is stricter and its
"reward" is partial credit, neither GenEval's score (`evaluation` module docstring).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import traceback
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import cli, data, evaluation, rollout
from .config import Config, ConfigError, param
from .cli import UserError
from .distributed import Collectives
from .rewards import conflict, pickscore
from .tasks import TASKS
from .toy.grammar import GENEVAL_TAGS

PromptSource = Callable[[str, int, int], list]  # (task, n, seed) -> n prompts


@dataclasses.dataclass
class EvalConfig(Config):
    """The evaluation protocol and how it runs; trainers' configs derive from it (field names
    start with eval_, as notebooks and run specs name them, but for text_encoders_on_cpu, which
    training and evaluation jobs share)."""

    eval_tasks: tuple[str, ...] | None = param(None, "tasks evaluated; None: the tasks trained on (a trainer's "
                                               "datasets), every task in the CLI")
    eval_prompts: int | dict[str, int] = param(90, "test prompts per task: one count, or task -> count (SD3.5-M's "
                                               "test sets: {geneval: 553, ocr: 1018, pickscore: 2048, deqa: 200}); "
                                               "never more than the task's test file holds")
    eval_samples: int | dict[str, int] = param(1, "images per test prompt (sample j from the noise of seed + j, "
                                               "paired across models): one count, or task -> count, missing tasks "
                                               "1 (GenEval's protocol: {geneval: 4})")
    eval_steps: int = param(evaluation.PROTOCOL["steps"], "ODE steps of the evaluation (default: the toy world's "
                            "protocol, evaluation.PROTOCOL; SD3.5-M: 40)", range=(1, None))
    eval_cfg: float = param(evaluation.PROTOCOL["cfg_scale"], "classifier-free guidance of the evaluation (1 = off; "
                            "default: the toy world's protocol, evaluation.PROTOCOL; SD3.5-M: 4.5)", range=(0, None))
    eval_batch_size: int | None = param(None, "images each process makes at once (CFG doubles the transformer's "
                                        "batch); None: rollout.default_batch_size, 128 toy images, 16 of "
                                        "SD3.5-M at 512 px", range=(1, None))
    eval_prompt_files: dict[str, str] = param(None, "task -> test prompt file used instead of the task's file under "
                                              "prompt_root (e.g. deqa: a DrawBench prompt file, one a line)",
                                              default_factory=dict)

    conflict: float = param(0.0, "the toy world's conflict dial (rewards/conflict.py): how far the hidden taste, "
                            "and the PickScore proxy learned from it, trades faithfulness for appeal (0: today's "
                            "world; each setting needs its shipped proxy)", range=(0, 1))
    text_encoders_on_cpu: bool = param(False, "keep the frozen text encoders on the CPU, in training and "
                                       "evaluation (SD3.5-M: frees ~10 GiB of each GPU for 24-48 GB cards; new "
                                       "prompts are encoded there)")

    def check(self) -> None:
        super().check()
        if self.conflict:
            try:  # before any compute: the setting's proxy must exist
                pickscore.weights_dir(self.conflict)
            except UserError as error:
                raise ConfigError(f"{type(self).__name__}.conflict={self.conflict:g}: {error}") from None
        for field in ("eval_tasks", "eval_prompt_files"):
            unknown = [t for t in (getattr(self, field) or ()) if t not in TASKS]
            if unknown:
                raise ConfigError(f"{type(self).__name__}.{field} has unknown task(s) {unknown}; "
                                  f"tasks are {list(TASKS)}")
        if self.eval_tasks is not None and (not self.eval_tasks or len(set(self.eval_tasks)) != len(self.eval_tasks)):
            raise ConfigError(f"{type(self).__name__}.eval_tasks={list(self.eval_tasks)}: name each task once "
                              "(None: the default tasks)")
        for field in ("eval_prompts", "eval_samples"):
            value = getattr(self, field)
            counts = value if isinstance(value, dict) else {"every task": value}
            unknown = [t for t in counts if t != "every task" and t not in TASKS]
            bad = {t: n for t, n in counts.items() if n < 1}
            if unknown or bad:
                raise ConfigError(f"{type(self).__name__}.{field}={value!r}: give each task (of {list(TASKS)}) "
                                  f"a count >= 1" + (f"; unknown: {unknown}" if unknown else ""))

    def evaluated_tasks(self, default: tuple[str, ...] = TASKS) -> tuple[str, ...]:
        return tuple(self.eval_tasks) if self.eval_tasks is not None else tuple(default)

    def prompts_for(self, task: str) -> int:
        if isinstance(self.eval_prompts, int):
            return self.eval_prompts
        if task not in self.eval_prompts:
            raise ConfigError(f"eval_prompts={self.eval_prompts} has no count for task {task!r}, which is evaluated")
        return self.eval_prompts[task]

    def samples_for(self, task: str) -> int:
        return self.eval_samples if isinstance(self.eval_samples, int) else self.eval_samples.get(task, 1)


@dataclasses.dataclass
class EvalJob(EvalConfig):
    """What the CLI evaluates with: the protocol plus the model, seed and prompts settings a
    trainer's config holds under the same names (`job_from` copies them from one)."""

    base: str = param("toy", "base model: 'toy', a ToyFlowModel.save directory, or SD3 ('sd3.5-medium', a folder)")
    seed: int = param(0, "seed of the test prompts' draw and of the noise (sample j: seed + j)")
    shift: float = param(1.0, "timestep shift of the sampling grid (3 for SD3.5)", range=(0, None))
    prompt_root: str | None = param(None, "a Flow-GRPO dataset/ folder (None = the toy world's prompts)")
    task_rewards: dict[str, str] = param(None, "task -> the reward that judges it (missing: the reward named like "
                                         "the task; SD3.5-M: geneval_server, rapidocr, pickscore_v1, deqa_server)",
                                         default_factory=dict)


def job_from(config) -> EvalJob:
    """The EvalJob of the fields `config` (a trainer's config, any Config, or a dict) shares with it;
    a trainer's eval_tasks None becomes its trained tasks (its `datasets`), as in training."""
    values = dict(config) if isinstance(config, dict) else config.to_dict()
    if values.get("eval_tasks") is None and values.get("datasets"):
        values["eval_tasks"] = list(values["datasets"])
    names = [f.name for f in dataclasses.fields(EvalJob)]
    return EvalJob.from_dict({k: values[k] for k in names if k in values and values[k] is not None})


# ----------------------------------------------------------------------------- the work and its shares

@dataclasses.dataclass(frozen=True)
class WorkBatch:
    """One unit of work: the images of prompts [start, stop) of a task's test list, sample j."""
    task: str
    sample: int  # j: the noise of seed + j
    start: int
    stop: int


def work_plan(prompt_counts: dict[str, int], samples: dict[str, int], batch_size: int) -> list[WorkBatch]:
    """Every batch of the evaluation, in `sample_scores`' order (task, sample, prompts); the batches
    of one (task, sample) are the ones `rollout.generate` cuts the whole list into."""
    return [WorkBatch(task, j, start, min(start + batch_size, n))
            for task, n in prompt_counts.items() for j in range(samples[task]) for start in range(0, n, batch_size)]


def shard(n_items: int, num_processes: int, rank: int) -> range:
    """The contiguous run of n_items that process `rank` of `num_processes` takes: the first
    n_items % num_processes processes take one more; a process may take none."""
    base, extra = divmod(n_items, num_processes)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def eval_prompt_source(cfg: EvalConfig, prompt_root: str | None = None) -> PromptSource:
    """(task, n, seed) -> n test prompts: `cfg.eval_prompt_files[task]` if given, else the task's
    test file (toy, or under `prompt_root`); more than a file holds is `data.TestSetTooSmall`."""
    def source(task: str, n: int, seed: int) -> list:
        if task in cfg.eval_prompt_files:
            return data.prompt_source({task: cfg.eval_prompt_files[task]}, cycle=False)(task, n, seed)
        return data.prompts(task, n, "test", seed, prompt_root)
    return source


def eval_prompt_sets(cfg: EvalConfig, seed: int = 0, prompt_root: str | None = None,
                     prompts_for_task: PromptSource | None = None,
                     default_tasks: tuple[str, ...] = TASKS) -> dict[str, list]:
    """task -> its test prompts under `cfg` (the same on every process). Cheap: a trainer can call
    it before its first update, so a test set asked for beyond its file fails then, not after training."""
    source = prompts_for_task or eval_prompt_source(cfg, prompt_root)
    return {task: source(task, cfg.prompts_for(task), seed) for task in cfg.evaluated_tasks(default_tasks)}


# ----------------------------------------------------------------------------- evaluation

def _runs(plan: list[WorkBatch], share: range) -> list[list[int]]:
    """The share's batches grouped into runs of one (task, sample), in order."""
    runs = []
    for i in share:
        if runs and (plan[runs[-1][-1]].task, plan[runs[-1][-1]].sample) == (plan[i].task, plan[i].sample):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _score_run(model, batches: list[WorkBatch], prompts: list, cfg: EvalConfig, seed: int, shift: float,
               reward: str | None, batch_size: int, progress) -> list[dict[str, np.ndarray]]:
    """Per-sample values of each metric (`evaluation.sample_values`) of consecutive work batches of
    one (task, sample). Their latents come from one `generate` call (one noise draw: the draw is as
    long as the task's prompt list), then each batch is decoded and scored on its own."""
    first, last = batches[0], batches[-1]
    latents = rollout.generate(model, [p.text for p in prompts[first.start:last.stop]], steps=cfg.eval_steps,
                               cfg_scale=cfg.eval_cfg, seed=seed + first.sample, shift=shift, batch_size=batch_size,
                               return_latents=True, indices=range(first.start, last.stop), total=len(prompts))
    out = []
    for batch in batches:  # decoded as generate decodes its batches: the same images
        images = model.decode(latents[batch.start - first.start:batch.stop - first.start])
        values = evaluation.sample_values(batch.task, prompts[batch.start:batch.stop], images, reward)
        out.append({metric: v.cpu().numpy() for metric, v in values.items()})
        progress.update()
    return out


@torch.no_grad()
def evaluate_on_ranks(model, cfg: EvalConfig, accelerator=None, seed: int = 0, task_rewards: dict | None = None,
                      prompt_root: str | None = None, shift: float = 1.0,
                      prompts_for_task: PromptSource | None = None, name: str = "model",
                      default_tasks: tuple[str, ...] = TASKS) -> pd.DataFrame:
    """Per-sample scores of one model, shared over the job's processes and gathered to all of them:
    `evaluation.sample_scores`' table (columns model, metric, prompt, sample, stratum, value; its
    row order) for `cfg`'s protocol. Every process must call it (it holds a collective).

    `accelerator`: an accelerate Accelerator (None: this process alone). `seed`: of the test
    prompts' draw and the noise; `task_rewards`: task -> judging reward (missing: named like the
    task); `prompts_for_task` replaces the test files (`eval_prompt_source`); tasks:
    `cfg.eval_tasks`, else `default_tasks`. The model is used as it is (its device, its active
    adapter): a trainer wraps this in its EMA weights and adapter."""
    conflict.use(cfg.conflict)  # the job's world: the dial is one setting per process
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    prompt_sets = eval_prompt_sets(cfg, seed, prompt_root, prompts_for_task, default_tasks)
    samples = {task: cfg.samples_for(task) for task in prompt_sets}
    batch_size = cfg.eval_batch_size or rollout.default_batch_size(model)
    plan = work_plan({task: len(p) for task, p in prompt_sets.items()}, samples, batch_size)
    mine = shard(len(plan), world, rank)
    local = []
    try:
        with tqdm(total=len(mine), desc=f"evaluation batches, process {rank}", disable=rank != 0) as progress:
            for run in _runs(plan, mine):
                task = plan[run[0]].task
                values = _score_run(model, [plan[i] for i in run], prompt_sets[task], cfg, seed, shift,
                                    (task_rewards or {}).get(task), batch_size, progress)
                local += zip(run, values)
    except Exception:
        if world == 1:
            raise
        local = [(-1, {"rank": rank, "error": traceback.format_exc()})]  # the others must not wait for it
    # one all_gather_object, which every process joins whatever it holds (an empty list included)
    gathered = Collectives(accelerator).gather_objects(local) if accelerator is not None else local
    failures = [payload for i, payload in gathered if i < 0]
    if failures:
        raise RuntimeError("evaluation failed on process(es) " + ", ".join(str(f["rank"]) for f in failures)
                           + ":\n" + "\n".join(f["error"] for f in failures))
    return _table(plan, dict(gathered), prompt_sets, samples, name)


def _table(plan: list[WorkBatch], values: dict[int, dict[str, np.ndarray]], prompt_sets: dict[str, list],
           samples: dict[str, int], name: str) -> pd.DataFrame:
    """The gathered batch values as `sample_scores`' table (same rows, same order, float64 values)."""
    if sorted(values) != list(range(len(plan))):
        raise RuntimeError(f"gathered {len(values)} of {len(plan)} evaluation batches")  # a sharding bug
    frames = []
    for task, prompts in prompt_sets.items():
        batches = [i for i, b in enumerate(plan) if b.task == task]
        arrays = {metric: np.zeros((samples[task], len(prompts))) for metric in values[batches[0]]}
        for i in batches:
            for metric, v in values[i].items():
                arrays[metric][plan[i].sample, plan[i].start:plan[i].stop] = v.astype(np.float64)
        frames += evaluation.score_rows(name, task, prompts, arrays)
    return pd.concat(frames, ignore_index=True)


def evaluator(cfg, accelerator=None) -> Callable:
    """The `eval_fn` of a training run (trainer.OnPolicyTrainer.evaluate): the config's own protocol
    (its eval_* fields, seed, shift, prompt_root, task_rewards; tasks default to those it trains)
    sharded over the run's processes (default: accelerate's view of this launch), returning the
    table's metrics. Every process must call it. Checks the test-set sizes now, before training."""
    tasks = tuple(cfg.datasets)
    eval_prompt_sets(cfg, cfg.seed, cfg.prompt_root, default_tasks=tasks)  # TestSetTooSmall before any compute

    def evaluate(model) -> dict[str, float]:
        from accelerate import PartialState

        # looked up at the call, not before: a PartialState made before the trainer's Accelerator
        # would fix the process group without ACCELERATE_USE_CPU's gloo ranks
        scores = evaluate_on_ranks(model, cfg, accelerator or PartialState(), seed=cfg.seed, task_rewards=cfg.task_rewards,
                                   prompt_root=cfg.prompt_root, shift=cfg.shift, default_tasks=tasks)
        return metrics_from_scores(scores)

    return evaluate


def metrics_from_scores(scores: pd.DataFrame, model: str | None = None) -> dict[str, float]:
    """The table metrics of one model's per-sample scores (`evaluation.evaluate`'s columns): each
    metric's mean over images; GenEval's, the mean over categories of the per-category mean of
    per-image correctness (GenEval's overall score), with geneval/<tag> each category's; Avg when
    all four tasks are there. `evaluation.summarise` adds standard errors."""
    if model is not None:
        scores = scores[scores["model"] == model]
    models = scores["model"].unique()
    if len(models) != 1:
        raise ValueError(f"metrics_from_scores needs the scores of one model; got {list(models)} (pass model=)")
    out, categories = {}, {}
    for metric, rows in scores.groupby("metric", sort=False):
        if metric == "geneval":
            per_tag = rows.groupby("stratum", sort=False)["value"].mean()
            tags = [t for t in GENEVAL_TAGS if t in per_tag.index] + sorted(set(per_tag.index) - set(GENEVAL_TAGS))
            categories = {f"geneval/{t}": float(per_tag[t]) for t in tags}
            out["geneval"] = float(np.mean(list(categories.values())))
        else:
            out[metric] = float(rows["value"].mean())
    if all(t in out for t in evaluation.NORMALISERS):
        out["Avg"] = evaluation.average(out)
    main = [m for m in ("geneval", "ocr", "pickscore", "pickscore_true", "deqa", "Avg") if m in out]
    return {**{m: out[m] for m in main}, **{m: v for m, v in out.items() if m not in main}, **categories}


# ----------------------------------------------------------------------------- command line

def write_csv_atomically(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write beside the target, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_csv(partial, index=False)
    os.replace(partial, path)
    return path


def read_scores(path: str | Path) -> pd.DataFrame:
    """A scores CSV as written (floats read back exactly: pandas 3 parses round-trip by default)."""
    exact = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
    return pd.read_csv(path, **exact)


SCORE_COLUMNS = ("model", "metric", "prompt", "sample", "stratum", "value")


def cached_scores(path: Path) -> pd.DataFrame | None:
    """A cached scores CSV, or None when there is none or it is damaged (then it is recomputed: a
    warning names the file; a cache must never stop a run)."""
    if not path.exists():
        return None
    try:
        frame = read_scores(path)
        if not set(SCORE_COLUMNS) <= set(frame.columns) or not pd.api.types.is_numeric_dtype(frame["value"]):
            raise ValueError("not a scores table")
        return frame
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        warnings.warn(f"the cached scores {path} are damaged ({error}); evaluating again", stacklevel=2)
        return None


@cli.entry
def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator

    from . import adapters, models
    from .train import parse_override
    from .trainer import check_world

    parser = cli.parser(__doc__)
    parser.add_argument("adapter", nargs="?", help="an adapter directory (adapters.load reads it), or 'base'")
    parser.add_argument("config", nargs="?", help="YAML file of EvalJob fields (--help-config lists them)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--out", type=cli.new_file, help="per-sample scores CSV (written by process 0; its folder "
                                                        "must exist)")
    parser.add_argument("--name", help="the model column of the scores (default: the adapter argument)")
    parser.add_argument("--help-config", action="store_true", help="list the EvalJob fields and exit")
    args = parser.parse_args(argv)
    if args.help_config:
        print(EvalJob.help())
        return
    if not (args.adapter and args.config and args.out):
        parser.error("give ADAPTER_DIR (or base), CONFIG.yaml and --out SCORES.csv")
    values = yaml_mapping(args.config)
    values.update(parse_override(parser, item) for item in args.overrides)
    job = EvalJob.from_dict(values)
    if args.adapter != "base":
        adapters.check_folder(args.adapter, "the adapter argument")  # before any process loads a model
    acc = Accelerator()
    check_world(acc.num_processes)
    model = models.load_base(job.base)
    model = model if model.device == acc.device else model.to(acc.device)
    if job.text_encoders_on_cpu:
        model.text_encoders_to("cpu")
    evaluated = model if args.adapter == "base" else adapters.view(model, adapters.load(model, args.adapter))
    scores = evaluate_on_ranks(evaluated, job, acc, seed=job.seed, task_rewards=job.task_rewards,
                               prompt_root=job.prompt_root, shift=job.shift, name=args.name or args.adapter)
    if acc.is_main_process:
        write_csv_atomically(scores, args.out)
        print(json.dumps(metrics_from_scores(scores), indent=1))


def yaml_mapping(path: str | Path) -> dict:
    """The EvalJob fields of a YAML file (safe_files.read_mapping: a damaged file is one line naming it)."""
    from .safe_files import read_mapping

    return read_mapping(path, "a YAML file of EvalJob fields")


def launch_eval(adapter: str | Path | None, config, out: str | Path, num_processes: int = 1,
                accelerate_config: str | None = None, name: str | None = None) -> pd.DataFrame:
    """Evaluate an adapter directory (None: the base) in fresh processes, as `train.launch` runs a
    stage (one process; CPU ranks under torch.distributed.run; GPUs under accelerate launch), and
    return its per-sample scores (also at `out`). `config`: an EvalJob, or any config holding its
    fields (a trainer's: eval_*, base, seed, shift, prompt_root, task_rewards), or a dict; the job
    is written beside `out` as <out>.job.yaml."""
    from .train import launch_command

    out = Path(out)
    job_path = out.with_name(out.name + ".job.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    job_from(config).to_yaml(job_path)
    target = ["-m", "flowopd_lib.distributed_eval", str(adapter) if adapter is not None else "base", str(job_path),
              "--out", str(out), *(["--name", name] if name else [])]
    command, env = launch_command(target, num_processes, accelerate_config)
    subprocess.run(command, check=True, env=env)
    scores = read_scores(out)
    # named here, not by the CSV: pandas reads a row named "None" (notebook 05's base) or "NA" as missing
    return scores if name is None else scores.assign(model=name)


def launched_scores(models: dict[str, str | Path | None], config, out_dir: str | Path, num_processes: int = 1,
                    accelerate_config: str | None = None, cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Per-sample scores of several models (row name -> adapter directory, None: the base), each in
    a job of its own over `num_processes` (`launch_eval`): how notebooks evaluate at full scale, on
    the node's GPUs rather than in their kernel. The scores are also kept as out_dir/<i>.csv.

    `cache_dir` (the runner's per-run evaluation cache): a model evaluated before under the same job
    (same base, protocol and test prompts) with the same adapter weights (the bytes of its weight
    file) is read back, not generated again: the base and the teachers are evaluated once per run."""
    frames = []
    for i, (name, adapter) in enumerate(models.items()):
        cached = Path(cache_dir) / f"launched_{launched_key(adapter, config)}.csv" if cache_dir else None
        reused = cached_scores(cached) if cached is not None else None
        if reused is not None:
            frames.append(reused.assign(model=name))
            continue
        frames.append(launch_eval(adapter, config, Path(out_dir) / f"model{i}.csv", num_processes, accelerate_config,
                                  name=name))
        if cached is not None:
            write_csv_atomically(frames[-1], cached)
    return pd.concat(frames, ignore_index=True)


def launched_key(adapter: str | Path | None, config) -> str:
    """Cache key of a launched evaluation: the job (base, protocol, prompts' seed) and the adapter's
    weight files' bytes ("base" for the base alone)."""
    import hashlib

    h = hashlib.sha256(job_from(config).to_yaml().encode())
    if adapter is None:
        h.update(b"base")
    else:
        for path in sorted(Path(adapter).glob("*.safetensors")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:32]


def metrics_table(scores: pd.DataFrame) -> pd.DataFrame:
    """One row of `metrics_from_scores` per model of a per-sample table (the notebooks' metric table)."""
    rows = {name: metrics_from_scores(scores, model=name) for name in dict.fromkeys(scores["model"])}
    return pd.DataFrame.from_dict(rows, orient="index")


if __name__ == "__main__":
    main()
