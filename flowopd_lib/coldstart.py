"""Stage 1: the student's cold start, by merging the teacher adapters or by SFT on their samples.

docs/method.md section 4. Merges (`merge`), per LoRA layer, with teacher k's delta `s_k B_k A_k`:

    delta      exact weighted sum of the deltas (default; weights 1/K = the average): the merged
               LoRA concatenates the factors, rank = sum of the ranks, so nothing is approximated
    factor     the released code's factor-wise average: A = sum w_k A_k, B = sum w_k B_k
               (NOT the average of the deltas; needs equal ranks and scalings)
    svd        the weighted delta sum truncated to `rank` by SVD
    ties, dare_linear, dare_ties, magnitude_prune
               peft's task-vector merges (peft.utils.merge_utils) on the deltas, then SVD to `rank`

The merge touches every layer any teacher touches; a teacher that leaves a layer alone (e.g. an
attention-only LoRA beside one that also adapts the feed-forward layers) counts as a zero delta there.

peft's `add_weighted_adapter` implements the same combinations but only on a peft `LoraModel`;
our adapters are diffusers-native (attached with `transformer.add_adapter`, saved in the format
pipelines load), so the combinations are called on the deltas directly.

SFT (`train_sft`): sample each training prompt from its routed teacher (ODE, the teacher's best
guess), then fit a fresh adapter with the flow-matching loss on those samples.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import adapters, data, flow, rollout
from .evaluation import PROTOCOL
from .config import Config, ConfigError, param
from .models.base import FlowModel
from .tracking import Run, seed_everything

MERGES = ("delta", "factor", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def lora_layers(model, name: str):
    """(module, A weight [r, in], B weight [out, r], scaling) of every layer the adapter touches."""
    from peft.tuners.lora.layer import LoraLayer

    for module in model.transformer.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            yield module, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]


def delta(model, name: str) -> dict[str, torch.Tensor]:
    """The weight delta `scaling * B @ A` [out, in] of every layer of one adapter, by module name."""
    names = {m: n for n, m in model.transformer.named_modules()}
    return {names[m]: s * (b.float() @ a.float()) for m, a, b, s in lora_layers(model, name)}


def _low_rank(d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B [out, r], A [r, in] with B @ A the best rank-r approximation of d."""
    u, s, vh = torch.linalg.svd(d.float(), full_matrices=False)
    r = min(rank, s.numel())
    return u[:, :r] * s[:r], vh[:r]


def _combine(deltas: list[torch.Tensor], weights: torch.Tensor, method: str, density: float) -> torch.Tensor:
    from peft.utils import merge_utils

    if method == "svd":
        return merge_utils.task_arithmetic(deltas, weights)
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(deltas, weights, density)
    if method == "dare_linear":
        return merge_utils.dare_linear(deltas, weights, density)
    return getattr(merge_utils, method)(deltas, weights, density, "total")  # ties, dare_ties


def merge(model, teachers: dict[str, float], name: str = "merge", method: str = "delta", rank: int | None = None,
          density: float = 0.5, normalize: bool = True, seed: int = 0) -> str:
    """Add adapter `name` = the merge of the named adapters with their weights (see the docstring);
    `normalize` divides the weights by their sum (equal weights = the average)."""
    if method not in MERGES:
        raise ValueError(f"merge method {method!r} unknown; choose one of {MERGES}")
    if not teachers:
        raise ValueError("merge needs at least one adapter: teachers={name: weight}")
    sources = list(teachers)
    configs = [model.transformer.peft_config[s] for s in sources if s in adapters.names(model)]
    if len(configs) != len(sources):
        raise ValueError(f"unknown adapter(s) in {sources}; the model has {adapters.names(model)}")
    ranks = [c.r for c in configs]
    targets = sorted(set().union(*[set(c.target_modules) for c in configs]))
    weights = torch.tensor([float(teachers[s]) for s in sources])
    if normalize:
        weights = weights / weights.sum()
    if method == "delta":
        new_rank, alpha = sum(ranks), float(sum(ranks))  # scaling 1: the factors carry the scalings
    elif method == "factor":
        if len(set(ranks)) > 1 or len({c.lora_alpha for c in configs}) > 1:
            raise ValueError(f"'factor' merging averages A and B separately: it needs equal ranks and alphas, got "
                             f"ranks {ranks}")
        new_rank, alpha = ranks[0], float(configs[0].lora_alpha)
    else:
        new_rank = rank or max(ranks)
        alpha = float(new_rank)
    adapters.add(model, name, rank=new_rank, alpha=alpha, targets=targets)
    torch.manual_seed(seed)  # DARE drops entries at random
    # Adapters may touch different layers (e.g. a teacher with feed-forward LoRA beside attention-only
    # ones): where one does not, it contributes a zero delta (zero factors) to that layer.
    per_source = [{module: (a, b, s) for module, a, b, s in lora_layers(model, src)} for src in sources]
    with torch.no_grad():
        for module, a_new, b_new, _ in lora_layers(model, name):
            n_in, n_out = a_new.shape[1], b_new.shape[0]
            parts = [layers.get(module) or (a_new.new_zeros(r, n_in), b_new.new_zeros(n_out, r), 0.0)
                     for layers, r in zip(per_source, ranks)]
            if method == "delta":
                a_new.copy_(torch.cat([a for a, _, _ in parts]))
                b_new.copy_(torch.cat([w * s * b for w, (_, b, s) in zip(weights, parts)], dim=1))
            elif method == "factor":
                a_new.copy_(sum(w * a for w, (a, _, _) in zip(weights, parts)))
                b_new.copy_(sum(w * b for w, (_, b, _) in zip(weights, parts)))
            else:
                merged = _combine([s * (b.float() @ a.float()) for a, b, s in parts], weights, method, density)
                b, a = _low_rank(merged, new_rank)
                a_new.zero_()[: a.shape[0]].copy_(a)
                b_new.zero_()[:, : b.shape[1]].copy_(b)
    adapters.parameters(model, name, trainable=False)
    return name


def merge_directories(base: str, teachers: dict[str, str | Path], directory: str | Path, method: str = "delta") -> Path:
    """The `method` merge of saved teacher adapters (task -> directory) at equal weights, saved to
    `directory` (kept if already there: merging is deterministic). Returns the directory."""
    from .models import load_base

    directory = Path(directory)
    if (directory / adapters.WEIGHT_NAME).exists():
        return directory
    model = load_base(base)
    names = [adapters.load(model, d, f"teacher_{task}") for task, d in teachers.items()]
    merge(model, dict.fromkeys(names, 1.0), name="merge", method=method)
    return adapters.save(model, "merge", directory, {"method": method, "teachers": {t: str(d) for t, d in teachers.items()}})

# ----------------------------------------------------------------------------- SFT cold start

@dataclasses.dataclass
class SFTConfig(Config):
    teachers: dict[str, str] = param(None, "task -> directory of its teacher adapter", default_factory=dict)
    datasets: dict[str, int] = param(None, "task -> number of training prompts sampled from its teacher",
                                     default_factory=lambda: {"geneval": 256, "ocr": 256, "pickscore": 256})
    sample_steps: int = param(PROTOCOL["steps"], "ODE steps when sampling the teachers (default: the teachers' "
                              "protocol, evaluation.PROTOCOL)", range=(1, None))
    cfg_scale: float = param(PROTOCOL["cfg_scale"], "CFG when sampling the teachers (default: the teachers' "
                             "protocol, evaluation.PROTOCOL)", range=(1, None))
    shift: float = param(1.0, "timestep shift when sampling the teachers (SD3.5-M: 3)", range=(0, None))
    prompt_root: str | None = param(None, "a Flow-GRPO dataset/ folder (None = the toy world's prompts)")
    adapter: str = param("student", "name of the new adapter")
    lora_rank: int = param(8, "LoRA rank", range=(1, None))
    steps: int = param(300, "fine-tuning steps", range=(0, None))
    batch: int = param(32, "batch size", range=(1, None))
    lr: float = param(1e-3, "AdamW learning rate", range=(0, 1))
    seed: int = param(0, "seed of prompts, samples and noise")
    out_dir: str = param("runs/sft", "run directory (adapter/, metrics.csv)")

    def check(self) -> None:
        missing = [t for t in self.datasets if t not in self.teachers]
        if missing:
            raise ConfigError(f"no teacher for task(s) {missing}; teachers: {sorted(self.teachers)}")


def teacher_samples(model: FlowModel, cfg: SFTConfig) -> tuple[list[str], torch.Tensor]:
    """Each training prompt sampled (ODE) from its own task's teacher: (prompt texts, latents [N, ...])."""
    texts, latents = [], []
    for task, n in cfg.datasets.items():
        prompts = [p.text for p in data.prompts(task, n, "train", cfg.seed, cfg.prompt_root)]
        teacher = adapters.view(model, f"teacher_{task}")
        latents.append(rollout.generate(teacher, prompts, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                                        seed=cfg.seed, shift=cfg.shift, return_latents=True))
        texts += prompts
    return texts, torch.cat(latents)


def train_sft(cfg: SFTConfig, model: FlowModel) -> FlowModel:
    """Sample the teachers, then fit `cfg.adapter` with the flow-matching loss; saved to out_dir/adapter."""
    seed_everything(cfg.seed)
    for task, directory in cfg.teachers.items():
        if f"teacher_{task}" not in adapters.names(model):
            adapters.load(model, directory, f"teacher_{task}")
    t0 = time.time()
    texts, x0 = teacher_samples(model, cfg)
    sampling_s = time.time() - t0
    params = adapters.add(model, cfg.adapter, rank=cfg.lora_rank, alpha=float(cfg.lora_rank), seed=cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(cfg.seed)
    with Run(cfg.out_dir, cfg) as run, adapters.active(model, cfg.adapter):
        model.transformer.train()
        for step in tqdm(range(cfg.steps), desc="SFT", mininterval=2):
            index = torch.randint(len(texts), (cfg.batch,), generator=g)
            embeds = model.encode_prompts([texts[i] for i in index])
            out = flow.fm_loss(lambda x, s: model.velocity(x, s, embeds), x0[index], generator=g)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            if step % 20 == 0 or step == cfg.steps - 1:
                run.log({"loss": out.loss.item(), "sampling_s": sampling_s, "elapsed_s": time.time() - t0,
                         **flow.loss_per_noise_bin(out.sigma, out.per_sample)}, step=step + 1)
        model.transformer.eval()
    adapters.parameters(model, cfg.adapter, trainable=False)
    adapters.save(model, cfg.adapter, Path(cfg.out_dir) / "adapter",
                  {"config": cfg.to_dict(), "train_minutes": round((time.time() - t0) / 60, 2)})
    return model
