"""The on-policy training loop shared by GRPO (stage 0) and Flow-OPD (stage 2).

Both stages repeat one update:

    draw prompts -> sample G SDE trajectories per prompt from the trained adapter
    -> label them        GRPO: rewards -> group advantages (+ reference velocities for its KL)
                         OPD:  routed teacher and anchor velocities at the stored states
    -> optimizer steps on a per-step objective over the trained steps

Only `label` and `step_loss` differ (subclasses); this module holds the rest: the prompt schedule,
sharding over processes with prompt groups kept whole, minibatches, gradient all-reduce, clipping,
AdamW, an EMA of the adapter (what is evaluated and saved), checkpoints that resume exactly, metrics.

Resuming: a run directory resumes only with the config its checkpoints were trained with (the
budget, evaluation and checkpoint cadence may change: MAY_CHANGE_ON_RESUME; anything else is a
ResumeError listing old -> new); a corrupt newest checkpoint falls back to the previous one. A run
directory without checkpoints that holds a finished run (its adapter) or another config's run is
refused too: training would replace it (`check_run_dir`; the commands' --force moves it to a dated
backup first, `prepare_run_dir`, which also checks the config's input files before any compute).

Non-finite values: rewards (grpo.py), labels, loss terms and gradients are checked before every
optimizer step; a NaN or inf raises NonFiniteError (naming it, its prompt and the update) on every
process, so it never reaches the weights, the EMA or a checkpoint.

Determinism: the prompts, noise and minibatch order of update u depend only on (seed, u), so a run
resumed from a checkpoint equals an uninterrupted one, and N processes match one process up to
float tolerance (each holds a contiguous block of whole prompt groups; losses are normalised by
global counts and gradients summed across processes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from . import adapters, checkpoint, data, precision, rewards, rollout, safe_files
from .config import Config, ConfigError, param
from .distributed import Collectives
from .distributed_eval import EvalConfig
from .models.base import FlowModel
from .rewards import conflict
from .safe_files import read_mapping
from .tasks import TASKS
from .tracking import Run


class NonFiniteError(FloatingPointError):
    """A reward, label, loss term or gradient of an update is NaN or infinite.

    Raised on every process before the update's optimizer step, so neither the adapter nor a
    checkpoint takes the value: the run directory's latest checkpoint stays the one to resume from.
    The message names the value (reward, label or loss term), the sample's prompt and the update."""


class ResumeError(ConfigError):
    """The run directory holds a run of another config: resuming it would mix two runs."""


# Fields a resumed run may change: its budget, evaluation and checkpoint cadence, where the run
# directory is, and execution settings that change memory use, not what is trained (the tests show
# micro-batches, rollout chunks and gradient checkpointing give the same update).
MAY_CHANGE_ON_RESUME = ("updates", "time_budget_minutes", "eval_every", "checkpoint_every", "out_dir",
                        "micro_batch", "rollout_chunks", "gradient_checkpointing",
                        # the evaluation protocol, but not the world's conflict dial: it changes the rewards
                        *(f.name for f in dataclasses.fields(EvalConfig) if f.name != "conflict"))


def config_changes(saved_path: Path, cfg, ignored=()) -> list[str]:
    """`field: old -> new` for each field of the config saved at `saved_path` (a run's config.yaml)
    that differs from `cfg`, fields in `ignored` aside."""
    # a field the saved config lacks was added after the run began: the run had its default
    saved = {**type(cfg).defaults(), **read_mapping(saved_path, "a run's config")}
    current = yaml.safe_load(cfg.to_yaml())
    missing = object()
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
            for k in dict.fromkeys([*current, *saved])
            if k not in ignored and saved.get(k, missing) != current.get(k, missing)]


def check_run_dir(cfg) -> None:
    """Refuse a run directory that training with `cfg` would not continue but replace (ResumeError,
    one line naming the fix): checkpoints of another config (only MAY_CHANGE_ON_RESUME may differ),
    or, without a checkpoint to resume from, a finished run (its adapter) or a run of another config."""
    out = Path(cfg.out_dir)
    saved = out / "config.yaml"
    changed = config_changes(saved, cfg, MAY_CHANGE_ON_RESUME) if saved.exists() else []
    has_checkpoints = any((out / "checkpoints").glob("step_*"))
    fresh = (f"start fresh: another out_dir, or delete {out} (or --force on the command line: it moves "
             f"{out} to {out.name}{safe_files.BACKUP}<date> beside it)")
    if has_checkpoints and changed:
        raise ResumeError(f"cannot resume {out}: its checkpoints were trained with another config ({saved}); "
                          f"these fields differ (old -> new): {'; '.join(changed)}. Only "
                          f"{', '.join(MAY_CHANGE_ON_RESUME)} may change on resume. Use the old values to continue, "
                          f"or {fresh}")
    finished = (out / "adapter" / adapters.WEIGHT_NAME).exists()
    if not has_checkpoints and (finished or changed):
        held = "a finished run (adapter/)" if finished else f"a run of another config ({'; '.join(changed)})"
        raise ResumeError(f"{out} holds {held} and no checkpoint to resume from: training would replace it; {fresh}")


def prepare_run_dir(cfg, force: bool = False, produced: tuple[str, ...] = ()) -> Path | None:
    """What a command checks before any compute: `cfg`'s input files (`check_inputs`; `produced`:
    fields whose files the command makes first) and its run directory (`check_run_dir`). With
    `force`, a refused run directory is moved to a dated backup beside it (returned) instead."""
    cfg.check_inputs(produced)
    try:
        check_run_dir(cfg)
    except ResumeError:
        if not force:
            raise
        backup = safe_files.set_aside(cfg.out_dir)
        print(f"--force: moved {cfg.out_dir} to {backup}; training afresh")
        return backup
    return None


PromptSource = Callable[[str, int, int], list]  # (task, n, seed) -> prompts of that task


@dataclasses.dataclass
class OnPolicyConfig(EvalConfig):
    base: str = param("toy", "base model: 'toy' (the shipped one) or a directory saved by ToyFlowModel.save")
    adapter: str = param("student", "name of the trained LoRA adapter")
    init_adapter: str | None = param(None, "directory of a saved adapter to start from (e.g. a merge); None = fresh LoRA")
    lora_rank: int = param(8, "LoRA rank", range=(1, None))
    lora_alpha: float = param(8.0, "LoRA alpha (scale = alpha / rank)", range=(0, None))
    datasets: dict[str, float] = param(None, "task -> sampling ratio of its training prompts, e.g. {geneval: 3, ocr: 1}",
                           default_factory=lambda: {"geneval": 1.0})
    dataset_mode: str = param("mixed", "'mixed': each update draws prompts of every task by ratio; 'alternate': "
                              "each update uses one task, cycling by ratio (the released code's alternation)",
                              choices=("mixed", "alternate"))
    prompts_per_update: int = param(8, "distinct prompts per update (all processes together)", range=(1, None))
    group_size: int = param(8, "trajectories per prompt (G)", range=(1, None))
    sde_steps: int = param(10, "sampling steps of a training trajectory (T)", range=(1, None))
    train_fraction: float = param(0.9, "fraction of the T steps trained on (the first ones; 0.9 = 9 of 10)",
                                  range=(0, 1))
    noise_level: float = param(0.7, "SDE noise level a", range=(0, None))
    shared_initial_noise: bool = param(False, "start the G trajectories of a prompt from one initial noise, so "
                                       "their rewards differ only through the SDE steps that are trained")
    ode_after_trained: bool = param(False, "sample the untrained steps (after the first train_fraction) with the "
                                    "ODE, as Flow-GRPO-Fast and MixGRPO do: rewards then vary only through the "
                                    "noise of the trained steps (on the toy GenEval it did not make the gradient "
                                    "less noisy: docs/findings.md)")
    cfg_scale: float = param(1.0, "classifier-free guidance in rollouts and training (1 = off)", range=(1, None))
    shift: float = param(1.0, "timestep shift of the sampling grid (3 for SD3.5)", range=(0, None))
    prompt_root: str | None = param(None, "a Flow-GRPO dataset/ folder to train on (None = the toy world's prompts)")
    task_rewards: dict = param(None, "task -> the reward that judges it (toy: same names; SD3.5-M: geneval_server, "
                               "rapidocr, pickscore_v1, deqa_server)",
                               default_factory=lambda: {"geneval": "geneval", "ocr": "ocr", "pickscore": "pickscore",
                                                        "deqa": "deqa"})
    rollout_chunks: int = param(1, "sample each process's trajectories in this many sub-batches, one after the "
                                "other (bounds GPU memory); GRPO scores a sub-batch on a worker thread while "
                                "the next one samples, as Flow-GRPO does", range=(1, None))
    minibatches: int = param(2, "optimizer steps per inner epoch (samples split into this many minibatches)",
                             range=(1, None))
    micro_batch: int | None = param(None, "samples per forward/backward inside a minibatch (gradient accumulation "
                                    "bounds GPU memory; None = the whole minibatch at once)", range=(1, None))
    gradient_checkpointing: bool = param(False, "recompute each transformer block in the backward pass instead of "
                                         "storing its activations (SD3.5-M on smaller GPUs; ~30% slower)")
    inner_epochs: int = param(1, "passes over each update's samples", range=(1, None))
    lr: float = param(1e-3, "AdamW learning rate (constant, so resumed runs match)", range=(0, 1))
    weight_decay: float = param(1e-4, "AdamW weight decay", range=(0, 1))
    grad_clip: float = param(1.0, "gradient-norm clip", range=(0, None))
    ema_decay: float = param(0.9, "EMA decay of the adapter weights per optimizer step (0 = no EMA)", range=(0, 1))
    updates: int = param(100, "number of updates (rollout + optimizer steps)", range=(0, None))
    time_budget_minutes: float | None = param(None, "stop after this many minutes of updates (summed across resumes)",
                                              range=(0, None))
    eval_every: int = param(0, "evaluate the EMA adapter every N updates (0 = only at the end)", range=(0, None))
    checkpoint_every: int = param(10, "save a resumable checkpoint every N updates", range=(1, None))
    seed: int = param(0, "seed of prompts, noise and minibatch order")
    out_dir: str = param("runs/student", "run directory (adapter/, checkpoints/, metrics.csv)")

    def check(self) -> None:
        super().check()
        unknown = [t for t in self.datasets if t not in TASKS]
        if unknown:
            raise ConfigError(f"datasets has unknown task(s) {unknown}; tasks are {list(TASKS)}")
        if not self.datasets or any(r <= 0 for r in self.datasets.values()):
            raise ConfigError(f"datasets={self.datasets}: give each task a ratio > 0")
        if self.trained_steps < 1:
            raise ConfigError(f"train_fraction={self.train_fraction} trains no step of {self.sde_steps}")
        unknown = {task: name for task, name in self.task_rewards.items() if name not in rewards.available()}
        if unknown or set(self.task_rewards) - set(TASKS):
            raise ConfigError(f"{type(self).__name__}.task_rewards={self.task_rewards}: give each task (of "
                              f"{list(TASKS)}) a registered reward; " + (f"unknown: {unknown}; " if unknown else "")
                              + f"rewards are {rewards.available()}")

    def input_adapters(self) -> dict[str, str]:
        """field -> adapter folder this config loads (subclasses add theirs)."""
        return {"init_adapter": self.init_adapter} if self.init_adapter else {}

    def prompt_files(self) -> dict[str, Path]:
        """What -> prompt file this config reads from disk outside the shipped toy files: the
        trained tasks' train files and the evaluated tasks' test files under prompt_root, and
        eval_prompt_files."""
        files = {f"eval_prompt_files[{task!r}]": Path(f) for task, f in self.eval_prompt_files.items()}
        if self.prompt_root is None:
            return files
        root = Path(self.prompt_root)
        files.update({f"{task} train prompts": data.prompt_file(task, "train", root) for task in self.datasets})
        evaluated = [t for t in self.evaluated_tasks(tuple(self.datasets)) if t not in self.eval_prompt_files]
        files.update({f"{task} test prompts": data.prompt_file(task, "test", root) for task in evaluated})
        return files

    def check_prompt_files(self) -> None:
        """Refuse, before any compute, a prompt_root or prompt file that is not there."""
        name = type(self).__name__
        if self.prompt_root is not None and not Path(self.prompt_root).is_dir():
            raise ConfigError(f"{name}.prompt_root={self.prompt_root!r}: no such folder; point it at a Flow-GRPO "
                              "dataset/ folder (data.py lists its files), or leave it None for the toy world's prompts")
        missing = {what: str(path) for what, path in self.prompt_files().items() if not path.is_file()}
        if missing:
            raise ConfigError(f"{name}: no prompt file {missing} (prompt_root={self.prompt_root!r}); add the files "
                              "or leave the tasks out of datasets and eval_tasks")

    def check_inputs(self, produced: tuple[str, ...] = ()) -> None:
        """Refuse, before any compute, inputs that are not on disk: prompt files and adapter folders
        (`produced`: fields whose folders the command makes before training)."""
        self.check_prompt_files()
        for field, directory in self.input_adapters().items():
            if field.split("[")[0] not in produced:
                adapters.check_folder(directory, f"{type(self).__name__}.{field}")

    @property
    def trained_steps(self) -> int:
        return int(round(self.sde_steps * self.train_fraction))


def update_tasks(cfg: OnPolicyConfig, update: int) -> list[str]:
    """The task of each of the update's prompts: by ratio within the update ('mixed', rounded with
    the remainder drawn at random), or one task per update cycling by ratio ('alternate')."""
    tasks, ratios = list(cfg.datasets), np.array(list(cfg.datasets.values()), dtype=float)
    n = cfg.prompts_per_update
    if cfg.dataset_mode == "alternate":
        cycle = [t for t, r in zip(tasks, ratios) for _ in range(max(1, round(r)))]
        return [cycle[update % len(cycle)]] * n
    counts = np.floor(ratios / ratios.sum() * n).astype(int)
    rng = np.random.default_rng([cfg.seed, update, 7])
    for i in rng.choice(len(tasks), size=n - counts.sum(), p=ratios / ratios.sum()):
        counts[i] += 1
    return [t for t, c in zip(tasks, counts) for _ in range(c)]


def check_world(num_processes: int) -> None:
    """Refuse ranks that do not see each other: torch.distributed.run on a CPU-only torch without
    ACCELERATE_USE_CPU gives every rank an Accelerator of one process, and each would train alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != num_processes:
        raise RuntimeError(f"launched as WORLD_SIZE={world} ranks but accelerate sees {num_processes} process(es): "
                           "on CPU set ACCELERATE_USE_CPU=true (flowopd_lib.train.launch does), on GPUs use "
                           "accelerate launch")


LABEL_SOURCES = {  # where each trainer's labels come from, for NonFiniteError messages
    "advantage": "group advantages of the rewards", "weight": "the keep weights of prompt groups",
    "v_ref": "the base model's velocities, the KL reference", "v_target": "the routed teachers' velocities",
    "v_anchor": "the MAR anchor's velocities", "v_old": "the sampling policy's velocities",
    "sigma": "the training noise levels", "noise": "the training noise"}


def describe_sample(prompt) -> str:
    """'prompt '...' (task t)' of a sample, for error messages."""
    task = getattr(prompt, "task", None)
    return f"prompt {rollout.text_of(prompt)!r}" + (f" (task {task!r})" if task else "")


def nonfinite_term(terms: list) -> str | None:
    """The first non-finite loss term among (prompts, term index, loss [b], metrics) of a minibatch,
    described (the metrics that are non-finite name the term: e.g. 'kl_ref'); None if all are finite.
    One check for the whole list: a GPU synchronises once per minibatch, not per term."""
    if not terms or torch.isfinite(torch.cat([loss.flatten() for _, _, loss, _ in terms])).all():
        return None
    for prompts, j, loss, metrics in terms:
        bad = ~torch.isfinite(loss)
        if bad.any():
            i = int(bad.nonzero()[0])
            names = [n for n, v in metrics.items() if v.ndim and not torch.isfinite(v[i]).all()] or ["loss"]
            return f"loss term {j} ({', '.join(names)}) is {loss[i].item()} for {describe_sample(prompts[i])}"
    return None


# Metrics also reported for the first minibatch alone (`<name>_first_minibatch`): there the policy has
# not moved since the rollout, so the PPO ratio must be 1 up to numerics. On GPUs, bf16 kernels that
# round differently at the rollout's and the training's batch sizes make it deviate; if that deviation
# is near the clip range (1e-4), clipping acts on noise (docs/gpu.md).
FIRST_MINIBATCH_METRICS = ("ratio_dev", "clip_fraction")


def sample_seed(seed: int, update: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, update, index]).generate_state(1)[0])


class OnPolicyTrainer:
    """Subclasses implement `label` and `step_loss`; `train()` runs the loop."""

    decode_rollouts = True  # whether `label` needs the decoded images (rewards do; teachers do not)

    def __init__(self, model: FlowModel, cfg: OnPolicyConfig, accelerator=None,
                 eval_fn: Callable[[FlowModel], dict] | None = None, prompt_source: PromptSource | None = None):
        from accelerate import Accelerator
        from diffusers.training_utils import EMAModel

        if prompt_source is None:
            cfg.check_prompt_files()  # before the first rollout asks for them
        self.cfg, self.eval_fn = cfg, eval_fn
        conflict.use(cfg.conflict)  # the run's world: rewards and evaluations read the dial from here on
        self.prompt_source = prompt_source or (lambda task, n, seed: data.prompts(task, n, "train", seed, cfg.prompt_root))
        self.acc = accelerator or Accelerator()
        self.dist = Collectives(self.acc)
        check_world(self.acc.num_processes)
        precision.configure_backends(self.acc.device)
        if cfg.prompts_per_update % self.acc.num_processes:
            raise ConfigError(f"prompts_per_update={cfg.prompts_per_update} must be divisible by the "
                              f"{self.acc.num_processes} processes (prompt groups stay whole on one process)")
        self.model = model if model.device == self.acc.device else model.to(self.acc.device)
        self.model.requires_grad_(False)
        if cfg.text_encoders_on_cpu:
            self.model.text_encoders_to("cpu")
        if cfg.gradient_checkpointing:
            self.model.transformer.enable_gradient_checkpointing()
        if cfg.init_adapter:
            adapters.load(self.model, cfg.init_adapter, cfg.adapter)
        else:
            # seeded from (cfg.seed, name): every run of this config and every rank starts alike
            adapters.add(self.model, cfg.adapter, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
        # float32 whatever the base's dtype (precision.py), before the optimizer and EMA copy them
        self.params = precision.float32_trainables(adapters.parameters(self.model, cfg.adapter, trainable=True))
        self.param_names = [n for n, _ in adapters.named_parameters(self.model, cfg.adapter)]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMAModel(self.params, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.update = 0
        self.running_update: int | None = None  # the update `run_update` is in (error messages)
        self.train_seconds = 0.0  # wall time spent in updates, carried across resumes (the budget)

    # ------------------------------------------------------------------ hooks
    def label(self, traj: rollout.Trajectories, update: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per-sample labels of the local samples (tensors with a leading [B] dim; must include
        "weight", 1 for samples that enter the loss, 0 otherwise) and update-level metrics."""
        raise NotImplementedError

    def step_loss(self, traj: rollout.Trajectories, labels: dict[str, torch.Tensor], k: int,
                  v: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss [b] of step k for a minibatch given the policy velocity v at its states (with grad),
        and per-sample metrics [b] to average."""
        raise NotImplementedError

    @property
    def loss_steps(self) -> list[int]:
        """The trained steps that get a loss term (all of them; OPD's `supervised_steps` picks a subset).
        The update's loss and metrics are means over them."""
        return list(range(self.cfg.trained_steps))

    def loss_terms(self, part, labels: dict[str, torch.Tensor]):
        """The loss terms of a micro-batch, one per step of `loss_steps`, one at a time (each is
        backpropagated before the next is computed, so only one term's activations are alive): (loss [b],
        metrics). GRPO and OPD: terms at the stored states; the forward-process trainers
        (`forward_rl.py`) override this with `cfg.trained_steps` terms at fresh noise."""
        for k in self.loss_steps:
            yield self.step_loss(part, labels, k, self.policy_velocity(part, k))

    @property
    def sampling_adapter(self) -> str:
        """The adapter rollouts sample from: the trained one (on-policy); DiffusionNFT's `old` EMA."""
        return self.cfg.adapter

    def sample_chunk(self, prompts: list, seeds: list[int], initial_seeds: list[int] | None):
        """One rollout sub-batch under the sampling adapter: SDE trajectories with log-probs."""
        cfg = self.cfg
        return rollout.sample_trajectories(
            self.model, prompts, seeds, cfg.sde_steps, cfg.noise_level, cfg.cfg_scale, cfg.shift,
            self.decode_rollouts, initial_seeds, cfg.trained_steps if cfg.ode_after_trained else None)

    def after_update(self, update: int) -> dict[str, float]:
        """Called after each update's optimizer steps (DiffusionNFT moves its `old` policy here)."""
        return {}

    # ------------------------------------------------------------------ one update
    def prompts_for(self, update: int) -> list:
        """The update's global prompt list (identical on every process)."""
        tasks = update_tasks(self.cfg, update)
        out = []
        for task in dict.fromkeys(tasks):
            n = tasks.count(task)
            out += self.prompt_source(task, n, sample_seed(self.cfg.seed, update, zlib.crc32(task.encode())))
        return out

    def local_block(self, n: int) -> slice:
        per = n // self.acc.num_processes
        return slice(self.acc.process_index * per, (self.acc.process_index + 1) * per)

    def rollout(self, update: int) -> rollout.Trajectories:
        cfg, g = self.cfg, self.cfg.group_size
        prompts = self.prompts_for(update)
        samples = [p for p in prompts for _ in range(g)]  # sample k = prompt k // G
        seeds = [sample_seed(cfg.seed, update, 10_000 + k) for k in range(len(samples))]
        initial = [seeds[k - k % g] for k in range(len(samples))] if cfg.shared_initial_noise else None
        block = range(len(samples))[self.local_block(len(samples))]
        parts = []
        with adapters.active(self.model, self.sampling_adapter):
            for chunk in np.array_split(np.asarray(block), min(cfg.rollout_chunks, len(block))):
                chunk = chunk.tolist()
                parts.append(self.sample_chunk([samples[i] for i in chunk], [seeds[i] for i in chunk],
                                               [initial[i] for i in chunk] if initial else None))
                self.sampled(parts[-1])
        return rollout.concat(parts)

    def sampled(self, part: rollout.Trajectories) -> None:
        """Called after each rollout sub-batch is sampled, before the next one starts (GRPO
        submits its rewards here, so they overlap the sampling of the next sub-batch)."""

    def policy_velocity(self, traj: rollout.Trajectories, k: int) -> torch.Tensor:
        s = traj.sigmas[k].expand(len(traj))
        return rollout.guided_velocity(self.model, traj.latents[:, k], s, traj.cond, traj.uncond, self.cfg.cfg_scale)

    def in_chunks(self, n: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """fn(index) over sub-batches of at most `micro_batch` of n samples, concatenated: the no-grad
        labelling forwards (reference, teachers, anchor, old policy) then peak at the same batch as
        training does, not at every local sample at once (144 x CFG 2 per GPU on SD3.5-M)."""
        index = torch.arange(n)
        if not self.cfg.micro_batch or n <= self.cfg.micro_batch:
            return fn(index)
        return torch.cat([fn(chunk) for chunk in index.split(self.cfg.micro_batch)])

    def minibatch_of(self, update: int, epoch: int, n_global: int) -> torch.Tensor:
        """Minibatch id of every global sample: a seeded permutation dealt round-robin."""
        perm = np.random.default_rng([self.cfg.seed, update, epoch, 3]).permutation(n_global)
        ids = np.empty(n_global, dtype=np.int64)
        ids[perm] = np.arange(n_global) % self.cfg.minibatches
        return torch.from_numpy(ids)

    def optimize(self, traj: rollout.Trajectories, labels: dict[str, torch.Tensor], update: int) -> dict[str, float]:
        cfg = self.cfg
        n_global = len(traj) * self.acc.num_processes
        block = self.local_block(n_global)
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=self.acc.device)
        first_count = torch.zeros((), device=self.acc.device)
        grad_norms = []
        with adapters.active(self.model, cfg.adapter):
            self.model.transformer.train()
            for epoch in range(cfg.inner_epochs):
                mb_ids = self.minibatch_of(update, epoch, n_global)[block]
                for mb in range(cfg.minibatches):
                    index = torch.nonzero(mb_ids == mb).flatten()
                    index = index[labels["weight"][index].cpu() > 0]  # samples without signal cost no forward
                    weight = labels["weight"][index]
                    # Normalise by the global number of (sample, step) terms of this minibatch.
                    norm = self.dist.sum(weight.sum().to(self.acc.device)) * len(self.loss_steps)
                    self.opt.zero_grad(set_to_none=False)
                    terms = []  # (prompts, term index, loss, metrics) of each term, checked once below
                    if norm > 0:
                        # (no local samples with signal: no forward, but this process still joins the
                        # all-reduce and the step below; `split` of an empty index would yield one empty batch)
                        micro_batches = index.split(cfg.micro_batch or len(index)) if len(index) else ()
                        for sub in micro_batches:  # gradient accumulation
                            part, w = traj.select(sub), labels["weight"][sub]
                            lab = {k: v[sub] for k, v in labels.items()}
                            for j, (loss, metrics) in enumerate(self.loss_terms(part, lab)):
                                (loss * w).sum().div(norm).backward()
                                terms.append((part.prompts, j, loss.detach(),
                                              {n: v.detach() for n, v in metrics.items()}))
                                for name, value in {"loss": loss, **metrics}.items():
                                    sums[name] = sums.get(name, 0) + (value.detach() * w).sum()
                                    if epoch == 0 and mb == 0 and name in FIRST_MINIBATCH_METRICS:
                                        key = f"{name}_first_minibatch"
                                        sums[key] = sums.get(key, 0) + (value.detach() * w).sum()
                        count += weight.sum() * len(self.loss_steps)
                        if epoch == 0 and mb == 0:
                            first_count += weight.sum() * len(self.loss_steps)
                    self.stop_if_nonfinite(nonfinite_term(terms), update)
                    self.all_reduce_grads()
                    grad_norms.append(self.clip_gradients(update))
                    if norm > 0:
                        self.opt.step()
                        if self.ema is not None:
                            self.ema.step(self.params)
            self.model.transformer.eval()
        # One reduction over the metric names of ANY rank: a rank that ran no micro-batch (all its
        # groups without signal) has no names of its own but must still join it.
        names = self.dist.union(sums)
        totals = self.dist.sum_named({**sums, "_count": count, "_first_count": first_count},
                                     [*names, "_count", "_first_count"])
        total, first_total = totals.pop("_count").clamp_min(1), totals.pop("_first_count").clamp_min(1)
        out = {name: (v / (first_total if name.endswith("_first_minibatch") else total)).item()
               for name, v in totals.items()}
        return {**out, "grad_norm": float(np.mean(grad_norms))}

    def clip_gradients(self, update: int) -> float:
        """Clip the (all-reduced, so identical on every process) gradients to cfg.grad_clip and
        return their norm; a non-finite gradient raises NonFiniteError naming its parameters."""
        grads = [p.grad for p in self.params]
        total = torch.nn.utils.get_total_norm(grads)
        if not torch.isfinite(total):
            bad = [n for n, g in zip(self.param_names, grads) if not torch.isfinite(g).all()]
            raise NonFiniteError(f"the gradient of {len(bad)} adapter parameter(s) is non-finite, e.g. {bad[:3]}, "
                                 f"although every loss term was finite (an overflow in the backward pass: "
                                 f"try a lower lr), at {self.where(update)}")
        torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.grad_clip, total)
        return total.item()

    # ------------------------------------------------------------------ non-finite values
    def where(self, update: int | None = None) -> str:
        """'update u/N' and what a stop there leaves behind (for NonFiniteError messages)."""
        update = update if update is not None else (
            self.running_update if self.running_update is not None else self.update)
        last = checkpoint.latest(self.ckpt_dir)
        kept = (f"the latest checkpoint, {last}, stays the one to resume from" if last is not None
                else "no checkpoint was written yet")
        return f"update {update + 1}/{self.cfg.updates}, stopped before the optimizer took it; {kept}"

    def stop_if_nonfinite(self, problem: str | None, update: int | None = None) -> None:
        """Raise NonFiniteError on every process if any process found a `problem` (so that none is
        left waiting in a collective for one that stopped)."""
        flags = torch.zeros(self.acc.num_processes, device=self.acc.device)
        flags[self.acc.process_index] = float(problem is not None)
        flags = self.dist.sum(flags)
        if not flags.any():
            return
        if problem is None:
            problem = f"a non-finite value on process(es) {flags.nonzero().flatten().tolist()} (their error names it)"
        raise NonFiniteError(f"{problem}, at {self.where(update)}")

    def check_labels(self, traj, labels: dict[str, torch.Tensor], update: int) -> None:
        """Every sample's labels are finite (a NaN teacher velocity or advantage stops here)."""
        problem = None
        for key, value in labels.items():
            if not value.is_floating_point():
                continue
            bad = ~torch.isfinite(value.reshape(len(value), -1)).all(dim=1)
            if bad.any():
                i = int(bad.nonzero()[0])
                source = LABEL_SOURCES.get(key, "computed by the trainer's label()")
                problem = f"label {key!r} ({source}) is non-finite for {describe_sample(traj.prompts[i])}"
                break
        self.stop_if_nonfinite(problem, update)

    def all_reduce_grads(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.acc.num_processes > 1:
            flat = self.dist.sum(torch.cat([p.grad.flatten() for p in self.params]))
            offset = 0
            for p in self.params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def run_update(self, update: int) -> dict[str, float]:
        self.running_update = update
        t0 = time.time()
        traj = self.rollout(update)
        t1 = time.time()
        labels, label_metrics = self.label(traj, update)
        self.check_labels(traj, labels, update)
        t2 = time.time()
        train_metrics = self.optimize(traj, labels, update)
        train_metrics.update(self.after_update(update))
        t3 = time.time()
        return {**label_metrics, **train_metrics, "time/rollout": t1 - t0, "time/label": t2 - t1,
                "time/train": t3 - t2}

    # ------------------------------------------------------------------ loop, checkpoints, evaluation
    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.out_dir) / "checkpoints"

    def state(self) -> dict:
        return {"adapter": adapters.state_dict(self.model, self.cfg.adapter), "optimizer": self.opt.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "update": self.update,
                "train_seconds": self.train_seconds}

    def load_state(self, state: dict) -> None:
        adapters.load_state_dict(self.model, self.cfg.adapter, state["adapter"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.acc.device)
        self.update = state["update"]
        self.train_seconds = state.get("train_seconds", 0.0)

    def save_checkpoint(self) -> None:
        if self.acc.is_main_process:
            checkpoint.save(self.ckpt_dir, self.update, self.state())
        self.acc.wait_for_everyone()

    @contextmanager
    def ema_weights(self):
        """The adapter holds its EMA weights inside the block (training weights restored after)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def keep_ema_weights(self) -> None:
        """Make the EMA weights the adapter's weights for good (the trained model to use)."""
        if self.ema is not None:
            self.ema.copy_to(self.params)

    def evaluate(self) -> dict[str, float]:
        """`eval_fn` of the EMA adapter, on EVERY process: an evaluator of a distributed run shards
        its images over the processes and gathers them (distributed_eval.evaluator), so all of them
        must call it; with one process it is an ordinary function."""
        if self.eval_fn is None:
            return {}
        with self.ema_weights(), adapters.active(self.model, self.cfg.adapter), torch.no_grad():
            return {f"eval/{k}": v for k, v in self.eval_fn(self.model).items()}

    def save_adapter(self, directory: str | Path | None = None, metadata: dict | None = None) -> Path:
        """Write the EMA adapter in diffusers' LoRA format (main process)."""
        directory = Path(directory or Path(self.cfg.out_dir) / "adapter")
        if self.acc.is_main_process:
            with self.ema_weights():
                adapters.save(self.model, self.cfg.adapter, directory,
                              {"config": self.cfg.to_dict(), "updates": self.update,
                               "train_minutes": round(self.train_seconds / 60, 2), **(metadata or {})})
        self.acc.wait_for_everyone()
        return directory

    label_forwards_per_sample = 0  # transformer forwards `label` makes per sample (subclasses)

    def print_estimate(self) -> None:
        """Memory and time this run will need (estimate.py), printed and saved as estimate.json."""
        from dataclasses import asdict

        from .estimate import estimate

        with adapters.active(self.model, self.cfg.adapter):
            result = estimate(self.model, self.cfg, self.acc.num_processes, self.params, self.label_forwards_per_sample)
        print(result)
        out = Path(self.cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "estimate.json").write_text(json.dumps(asdict(result), indent=1))

    def resume(self) -> None:
        """Continue from the newest complete checkpoint, if any (a corrupt newest one is skipped
        with a warning naming it; checkpoints that all fail to load are a CheckpointError). A run
        directory it would replace rather than continue is refused first (`check_run_dir`)."""
        check_run_dir(self.cfg)
        found = checkpoint.load_latest(self.ckpt_dir, restore_rng=False, required=("adapter", "optimizer", "update"),
                                       map_location=self.acc.device)  # this process's device, not the saver's
        self.acc.wait_for_everyone()  # every process has read config.yaml before the main one rewrites it
        if found is None:
            return
        last, state = found
        self.load_state(state)
        if self.acc.is_main_process:
            print(f"resumed from {last} (update {self.update})")

    def train(self, resume: bool = True) -> dict[str, float]:
        """Run updates until `cfg.updates` or the time budget; returns the last metrics (with eval)."""
        cfg = self.cfg
        if resume:
            self.resume()
        metrics: dict[str, float] = {}
        if self.acc.is_main_process:
            self.print_estimate()
        budget_seconds = 60 * (cfg.time_budget_minutes or math.inf)
        already_spent = self.train_seconds >= budget_seconds  # a resumed run whose budget ran out
        if already_spent:
            print(f"time budget of {cfg.time_budget_minutes} min already spent at update {self.update}")
        first = cfg.updates if already_spent else self.update
        with Run(cfg.out_dir, cfg, resume=resume, resumed_step=self.update,
                 is_main_process=self.acc.is_main_process) as run:
            bar = tqdm(range(first, cfg.updates), initial=self.update, total=cfg.updates,
                       desc=type(self).__name__, disable=not self.acc.is_main_process, mininterval=2)
            for update in bar:
                t_update = time.time()
                metrics = self.run_update(update)
                self.update = update + 1
                self.train_seconds += time.time() - t_update
                # the budget counts update time carried across resumes (not evaluation or checkpoints)
                over_budget = self.dist.any(self.train_seconds >= budget_seconds)
                last = self.update == cfg.updates or over_budget
                if self.update % cfg.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if (cfg.eval_every and self.update % cfg.eval_every == 0) or last:
                    metrics.update(self.evaluate())
                run.log(metrics, step=self.update)
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k.startswith(("reward", "kl"))})
                if over_budget:
                    print(f"time budget of {cfg.time_budget_minutes} min reached after update {self.update}")
                    break
        self.save_adapter()
        return metrics
