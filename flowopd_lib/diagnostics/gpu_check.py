"""A prepared GPU check: SD3.5-Medium at its real shape, random weights, through the real trainer.

Why: `papermill_runs/sd35m.yaml` has never run on a GPU. This one command, with no downloads and in a
few minutes on one GPU, builds what a training process holds and measures what decides whether the
8-GPU run works: dtypes of the trained state, peak memory of each phase against `estimate.py`, the
speed of a sample-forward, a CPU-saved checkpoint resumed on the GPU, and whether bf16 batch-size
nondeterminism leaves Flow-GRPO's PPO clip of 1e-4 any room.

    python -m flowopd_lib.diagnostics.gpu_check --out runs/gpu_check        # the real shape (a GPU)
    python -m flowopd_lib.diagnostics.gpu_check --tiny --out /tmp/gpu_check  # CPU variant (tests)
    python -m flowopd_lib.diagnostics.gpu_check --costs                      # docs/gpu_costs.md's table
    python -m flowopd_lib.diagnostics.gpu_check --costs --fewer-gpus         # docs/gpu.md's table

What it builds (`--tiny`: a 2-layer narrow MMDiT, a narrow 4-block VAE, 32 px, 32 T5 tokens, small
batches; the same classes, trainer and code path):
    transformer  diffusers SD3Transformer2DModel at SD35M_TRANSFORMER, bf16, random weights (all-zero
                 weight matrices redrawn; the output layer scaled so velocities have unit std, as a
                 trained model's v = noise - x0 has)
    VAE          AutoencoderKL at SD3_VAE (full size), float32 as Flow-GRPO keeps it
    text         CLIP-L / CLIP-G / T5 encoders of 1-2 layers with SD3's output widths (768 + 1280
                 pooled = 2048; T5 4096), bf16; 77 + 128 tokens per prompt (load_base's T5 budget)
    model        models.sd3.SD3FlowModel on a StableDiffusion3Pipeline of these parts
    trainer      grpo.GRPOTrainer at a teacher stage's settings (LoRA rank 32 / alpha 64 through
                 adapters.add, CFG 4.5, shift 3, micro_batch 4, KL 0.04): its own sample_chunk,
                 reference_velocities, optimize, state and resume run, not copies of them

What it measures, each a row of the table (table.md and results.json under --out):
    trained dtypes     parameters, gradients after a backward, AdamW state, EMA shadow: float32
    rollout chunk      trainer.sample_chunk of one rollout chunk (12 samples, decode included): peak
    VAE decode         of that chunk alone: peak vs estimate.py's decode term
    training step      trainer.optimize on one micro-batch (4 samples, a batch of 8 with CFG, every
                       trained step's PPO + KL loss backpropagated): peak vs estimate.py's activations
    labelling          no-grad velocities of the whole local batch (144 samples; the trainer runs them
                       micro_batch at a time): the reference (adapters off, GRPO's KL) and a LoRA
                       adapter (OPD's teacher path)
    forward time       seconds per sample-forward at batch 8 and 24 (estimate.time_forward)
    checkpoint         trainer.state() moved to the CPU, checkpoint.save, trainer.resume(): every
                       tensor on this device, float32, values equal, and the EMA still steps
    generate           rollout.generate at the evaluation batch (decode included): peak and time
    PPO ratio          the rollout's stored log-probs (batch 24) recomputed in the training forward
                       (batch 8): ratio_dev = |exp(logp_new - logp_old) - 1| and the fraction of
                       (sample, step) pairs beyond the clip range 1e-4

On CUDA, memory is torch.cuda.max_memory_allocated after reset_peak_memory_stats (and empty_cache
between phases); on the CPU it is reported as "n/a (CPU)". Any failure (a wrong dtype, a tensor on
the wrong device, an out-of-memory, an exception) is a FAIL row; the command exits 1 if there is one.
A phase that raises does not stop the others (a GPU run must report as much as it can at once).

The shape was written from diffusers' SD3.5-Medium transformer config as recalled (the hub is not
reachable from here), see SD35M_TRANSFORMER; with weights at hand, compare it with
`SD3Transformer2DModel.load_config(<sd3.5-medium>/transformer)` before trusting the memory numbers.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from .. import adapters, checkpoint, cli, estimate as estimate_module, precision, rollout
from ..grpo import GRPOConfig, GRPOTrainer
from ..models import SD3_MAX_SEQUENCE_LENGTH
from ..models.sd3 import SD35_MEDIUM_SHIFT, SD3FlowModel, _tiny_clip, _tiny_clip_tokenizer, _tiny_t5_tokenizer

# ----------------------------------------------------------------------------- shapes
# diffusers' transformer/config.json of stabilityai/stable-diffusion-3.5-medium (assumed from memory:
# 24 MMDiT-X blocks of 24 heads x 64 = 1536, dual attention in blocks 0-12, RMS qk-norm, T5 width
# 4096 in, pooled CLIP-L + CLIP-G = 2048, position embeddings cropped from a 384 x 384 grid).
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# SD3's VAE (vae/config.json, shared by SD3 and SD3.5): 16 latent channels, downscale 8.
SD3_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
    shift_factor=0.0609, scaling_factor=1.5305, force_upcast=True)
# The CPU variant: the same classes and blocks (joint + dual attention, qk-norm, 4096 / 2048 inputs;
# a 4-block VAE, downscale 8), narrow and 2 layers deep, so the whole check runs in well under a minute.
TINY_VAE = {**SD3_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8}
TINY_TRANSFORMER = {**SD35M_TRANSFORMER, "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                    "caption_projection_dim": 64, "pos_embed_max_size": 16, "sample_size": 4,
                    "dual_attention_layers": (0,)}
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 768, 1280, 4096  # SD3's text encoders' output widths
T5_TOKENS = SD3_MAX_SEQUENCE_LENGTH  # what load_base gives SD3 (Flow-GRPO's 128): 77 + 128 tokens a prompt
CLIP_RANGE = 1e-4  # Flow-GRPO's PPO clip (GRPOConfig.clip_range)
RATIO_WARN_FRACTION = 0.01  # beyond the clip in more than 1% of (sample, step) pairs: clipping is noise-driven


@dataclasses.dataclass
class Spec:
    """The sizes of one check. `full()`: papermill_runs/sd35m.yaml per GPU; `tiny()`: the CPU variant."""
    transformer: dict
    vae: dict = dataclasses.field(default_factory=lambda: dict(SD3_VAE))
    t5_tokens: int = T5_TOKENS        # prompt tokens: 77 (CLIP) + these (T5)
    resolution: int = 512
    prompts_per_update: int = 48
    group_size: int = 24
    num_processes: int = 8            # 48 x 24 / 8 = 144 samples per GPU
    rollout_chunks: int = 12          # 12 samples per chunk: a batch of 24 with CFG
    micro_batch: int = 4              # a batch of 8 with CFG
    sde_steps: int = 10
    updates: int = 1000
    cfg_scale: float = 4.5
    eval_batch: int | None = None     # None: rollout.generate's default, what evaluation uses
    generate_steps: int = 4           # timed; the peak does not depend on the steps (40 in evaluation)
    time_batches: tuple = (8, 24)
    gradient_checkpointing: bool = False
    seed: int = 0

    @property
    def samples(self) -> int:
        return self.prompts_per_update * self.group_size // self.num_processes

    @property
    def chunk(self) -> int:
        return math.ceil(self.samples / self.rollout_chunks)

    @staticmethod
    def full(**overrides) -> "Spec":
        return Spec(transformer=dict(SD35M_TRANSFORMER), **overrides)

    @staticmethod
    def tiny(**overrides) -> "Spec":
        values = dict(vae=dict(TINY_VAE), t5_tokens=32, resolution=32, prompts_per_update=2, group_size=6,
                      num_processes=1, rollout_chunks=2, sde_steps=2, eval_batch=4, generate_steps=2, updates=10)
        return Spec(transformer=dict(TINY_TRANSFORMER), **{**values, **overrides})

    def with_layers(self, layers: int) -> "Spec":
        dual = tuple(i for i in self.transformer["dual_attention_layers"] if i < layers)
        return dataclasses.replace(self, transformer={**self.transformer, "num_layers": layers,
                                                      "dual_attention_layers": dual})

    def with_resolution(self, resolution: int) -> "Spec":
        side = resolution // 8  # SD3's VAE downscales 8x
        grid = max(self.transformer["pos_embed_max_size"], side // self.transformer["patch_size"])
        return dataclasses.replace(self, resolution=resolution,
                                   transformer={**self.transformer, "sample_size": side, "pos_embed_max_size": grid})


# ----------------------------------------------------------------------------- building the model

def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def redraw_zero_weights(module: torch.nn.Module, seed: int) -> None:
    """Random init leaves some weight matrices all zero (zero-init output layers): a model whose
    velocity is 0 whatever its input would hide every batch-size effect. Redraw them N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_transformer(shape: dict, device: torch.device, seed: int):
    """SD3Transformer2DModel at `shape`, initialised on `device` (fast on a GPU), then bf16."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**shape)
    transformer.to(torch.bfloat16)
    redraw_zero_weights(transformer, seed)
    return transformer.eval().requires_grad_(False)


def build_vae(config: dict, device: torch.device, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 1)
    with torch.device(device):
        vae = AutoencoderKL(**config)
    return vae.eval().requires_grad_(False)  # float32, as Flow-GRPO and SD3FlowModel.from_pretrained keep it


def build_text_encoders(device: torch.device, seed: int) -> dict:
    """Two-layer encoders with SD3's output widths on tokenizers built in code (bf16, as loaded on GPUs)."""
    from transformers import T5Config, T5EncoderModel

    tokenizers = {"tokenizer": _tiny_clip_tokenizer(), "tokenizer_2": _tiny_clip_tokenizer(),
                  "tokenizer_3": _tiny_t5_tokenizer()}
    torch.manual_seed(seed + 2)
    encoders = {"text_encoder": _tiny_clip(CLIP_L_WIDTH, len(tokenizers["tokenizer"])),
                "text_encoder_2": _tiny_clip(CLIP_G_WIDTH, len(tokenizers["tokenizer_2"])),
                "text_encoder_3": T5EncoderModel(T5Config(
                    vocab_size=len(tokenizers["tokenizer_3"]), d_model=T5_WIDTH, d_kv=16, d_ff=64, num_layers=1,
                    num_heads=2, relative_attention_num_buckets=8))}
    for encoder in encoders.values():
        encoder.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)
    return {**tokenizers, **encoders}


def scale_to_unit_velocity(model: SD3FlowModel, seed: int) -> float:
    """Scale the output layer so velocities of random inputs have std 1 (a trained model's target
    v = noise - x0 has std ~1.4): PPO log-ratios then see bf16 rounding at a realistic scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *model.latent_shape, generator=g).to(model.device)
    with torch.no_grad():
        std = model.velocity(x, torch.full((2,), 0.5, device=model.device), model.encode_prompts(["", ""])).std()
        factor = float(1 / std) if torch.isfinite(std) and std > 0 else 1.0
        model.transformer.proj_out.weight.mul_(factor)
        model.transformer.proj_out.bias.mul_(factor)
    return factor


def build_model(spec: Spec, device: torch.device) -> SD3FlowModel:
    """SD3FlowModel on a StableDiffusion3Pipeline of random parts at the spec's shape."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..models.sd3 import sd3_pipeline_class

    StableDiffusion3Pipeline = sd3_pipeline_class()

    pipeline = StableDiffusion3Pipeline(
        transformer=build_transformer(spec.transformer, device, spec.seed), vae=build_vae(spec.vae, device, spec.seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SD35_MEDIUM_SHIFT), **build_text_encoders(device, spec.seed))
    model = SD3FlowModel.from_pipeline(pipeline, spec.resolution, max_sequence_length=spec.t5_tokens)
    scale_to_unit_velocity(model, spec.seed)
    return model


def trainer_config(spec: Spec, out_dir: Path) -> GRPOConfig:
    """A teacher stage of sd35m.yaml (teacher_geneval), one minibatch so the micro-batch is the spec's."""
    return GRPOConfig(
        adapter="checked", rewards={"geneval_server": 1.0}, datasets={"geneval": 1.0}, beta=0.04,
        prompts_per_update=spec.prompts_per_update, group_size=spec.group_size, sde_steps=spec.sde_steps,
        cfg_scale=spec.cfg_scale, shift=SD35_MEDIUM_SHIFT, lora_rank=32, lora_alpha=64.0, lr=3e-4,
        rollout_chunks=spec.rollout_chunks, micro_batch=spec.micro_batch, minibatches=1,
        gradient_checkpointing=spec.gradient_checkpointing, updates=spec.updates, seed=spec.seed,
        out_dir=str(out_dir))


# ----------------------------------------------------------------------------- measuring

class Memory:
    """Peak memory of a phase on CUDA devices (allocated by torch); nothing on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    @contextmanager
    def phase(self):
        """Yields a dict filled on exit: seconds, and on CUDA before / peak / increment (bytes)."""
        self.free()
        result: dict = {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            result["before"] = torch.cuda.memory_allocated(self.device)
        start = time.perf_counter()
        yield result
        if self.cuda:
            torch.cuda.synchronize(self.device)
            result["peak"] = torch.cuda.max_memory_allocated(self.device)
            result["increment"] = result["peak"] - result["before"]
        result["seconds"] = time.perf_counter() - start


def gib(n: float | None) -> str:
    """Bytes as GiB (MiB below a quarter GiB); None, a CPU's unmeasured memory, as 'n/a (CPU)'."""
    if n is None:
        return "n/a (CPU)"
    return f"{n / 2 ** 30:.2f} GiB" if abs(n) >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


def memory_text(m: dict) -> str:
    """'peak P (+I over the resident R)' on CUDA, 'n/a (CPU)' elsewhere."""
    if "peak" not in m:
        return gib(None)
    return f"peak {gib(m['peak'])} (+{gib(m['increment'])} over {gib(m['before'])} resident)"


def versus(m: dict, predicted: int) -> str:
    """The estimate, and measured increment / estimate where measured."""
    ratio = f", measured/estimate {m['increment'] / predicted:.2f}" if "increment" in m and predicted else ""
    return f"estimate.py {gib(predicted)}{ratio}"


@dataclasses.dataclass
class Row:
    check: str
    measured: str
    reference: str
    status: str  # PASS, FAIL, WARN or INFO


# ----------------------------------------------------------------------------- the checks

def trainable_dtype_problems(trainer) -> list[str]:
    """Every trained tensor that is not float32: parameters and gradients (precision.non_float32),
    AdamW state (its scalar `step` aside) and EMA shadow weights; and parameters without a gradient."""
    named = list(zip(trainer.param_names, trainer.params))
    problems = precision.non_float32(named)
    problems += [f"{n}.grad is missing" for n, p in named if p.grad is None]
    for name, p in named:
        for key, value in trainer.opt.state.get(p, {}).items():
            if torch.is_tensor(value) and key != "step" and value.dtype != torch.float32:
                problems.append(f"AdamW {key} of {name} ({value.dtype})")
    if trainer.ema is not None:
        problems += [f"EMA shadow of {n} ({s.dtype})" for n, s in zip(trainer.param_names, trainer.ema.shadow_params)
                     if s.dtype != torch.float32]
    return problems


def misplaced_tensors(trainer, device: torch.device) -> list[str]:
    """Trained state (adapter, AdamW state but `step`, EMA shadow) that is not on `device`."""
    def elsewhere(t):
        return t.device.type != device.type or (device.index is not None and t.device.index != device.index)

    named = list(zip(trainer.param_names, trainer.params))
    out = [f"{n} on {p.device}" for n, p in named if elsewhere(p)]
    out += [f"AdamW {k} of {n} on {v.device}" for n, p in named for k, v in trainer.opt.state.get(p, {}).items()
            if torch.is_tensor(v) and k != "step" and elsewhere(v)]
    if trainer.ema is not None:
        out += [f"EMA shadow of {n} on {s.device}" for n, s in zip(trainer.param_names, trainer.ema.shadow_params)
                if elsewhere(s)]
    return out


def on_cpu(value):
    """A copy of a (nested) state with every tensor moved to the CPU: a checkpoint written by a CPU run."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def sample_chunk(trainer: GRPOTrainer, spec: Spec):
    """One rollout chunk through the trainer's own sampling (under its adapter, decode included)."""
    prompts = [f"a red cat number {i}" for i in range(spec.chunk)]
    seeds = [spec.seed * 100_003 + i for i in range(spec.chunk)]
    with adapters.active(trainer.model, trainer.cfg.adapter):
        return trainer.sample_chunk(prompts, seeds, None)


def train_labels(trainer: GRPOTrainer, part) -> dict[str, torch.Tensor]:
    """GRPO labels of a micro-batch: advantages +-1 (every sample has signal), weights 1, and the
    reference velocities of its KL from the trainer's own `reference_velocities`."""
    device = trainer.model.device
    advantage = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(part))], device=device)
    return {"advantage": advantage, "weight": torch.ones(len(part), device=device),
            "v_ref": trainer.reference_velocities(part)}


@contextmanager
def recorded_ratio_devs(trainer):
    """Collect the per-sample `ratio_dev` metric of every step_loss the trainer computes meanwhile."""
    recorded: list[torch.Tensor] = []
    original = trainer.step_loss

    def step_loss(traj, labels, k, v):
        loss, metrics = original(traj, labels, k, v)
        recorded.append(metrics["ratio_dev"].detach().float().cpu())
        return loss, metrics

    trainer.step_loss = step_loss
    try:
        yield recorded
    finally:
        del trainer.step_loss


def ratio_row(devs: list[torch.Tensor], spec: Spec) -> Row:
    values = torch.cat(devs) if devs else torch.empty(0)
    if not len(values) or not torch.isfinite(values).all():
        return Row("PPO ratio, rollout batch vs training batch", f"non-finite or none: {values.tolist()[:4]}",
                   f"clip range {CLIP_RANGE:g}", "FAIL")
    beyond = (values > CLIP_RANGE).float().mean().item()
    measured = (f"ratio_dev max {values.max().item():.2e}, mean {values.mean().item():.2e}; "
                f"{100 * beyond:.1f}% of {len(values)} (sample, step) pairs beyond {CLIP_RANGE:g}")
    batches = f"rollout batch {2 * spec.chunk}, training batch {2 * spec.micro_batch} (CFG x2), same weights"
    return Row("PPO ratio, rollout batch vs training batch", measured, batches,
               "WARN" if beyond > RATIO_WARN_FRACTION else "PASS")


class Check:
    """Runs the phases in order on one model and trainer, collecting rows and raw numbers."""

    def __init__(self, spec: Spec, out_dir: Path, device: torch.device | None = None):
        self.spec, self.out_dir = spec, Path(out_dir)
        self.device = device or pick_device()
        self.memory = Memory(self.device)
        self.rows: list[Row] = []
        self.numbers: dict = {}
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    # -- running phases without letting one failure hide the others
    def run_phase(self, name: str, phase: Callable[[], None]) -> bool:
        """Run a phase; an exception (out-of-memory included) becomes a FAIL row named after it."""
        try:
            phase()
            return True
        except Exception as error:  # noqa: BLE001 - every failure must reach the table
            kind = "out of memory" if isinstance(error, torch.OutOfMemoryError) else type(error).__name__
            first = (str(error).splitlines() or [""])[0][:300]
            self.rows.append(Row(name, f"{kind}: {first}", "must run", "FAIL"))
            traceback.print_exc(file=sys.stderr)
            self.memory.free()
            return False

    def skip(self, name: str, needs: str) -> None:
        self.rows.append(Row(name, f"not run: needs {needs}", "must run", "FAIL"))

    # -- the phases
    def build(self) -> None:
        with self.memory.phase() as m:
            self.model = build_model(self.spec, self.device)
            self.trainer = GRPOTrainer(self.model, trainer_config(self.spec, self.work / "run"))
        transformer = self.model.transformer
        base = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n)
        shape = self.spec.transformer
        self.numbers["build"] = {**m, "transformer_parameters": base, "lora_parameters": sum(p.numel() for p in self.trainer.params)}
        self.rows.append(Row(
            "model", f"MMDiT {base / 1e9:.3f}B parameters ({shape['num_layers']} layers x "
            f"{shape['num_attention_heads'] * shape['attention_head_dim']}, {self.model.compute_dtype}), "
            f"VAE {sum(p.numel() for p in self.model.vae.parameters()) / 1e6:.1f}M ({self.model.vae.dtype}), "
            f"LoRA {self.numbers['build']['lora_parameters'] / 1e6:.2f}M; {self.spec.resolution} px, "
            f"{self.model.encode_prompts(['']).tokens.shape[1]} text tokens; built in {m['seconds']:.0f} s",
            memory_text(m), "INFO"))
        self.adapter_add_row()

    def adapter_add_row(self) -> None:
        """What adapters.add alone gives on this bf16 base. The trainer casts its adapter to float32
        (precision.float32_trainables, checked by the dtype row); code that adds and trains or writes
        an adapter without that cast (coldstart's SFT and merges) would keep bf16 weights: a WARN."""
        probe = adapters.add(self.model, "dtype_probe", rank=4, seed=0)
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in probe})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Adapter dtype_probe was active")  # set back just below
            adapters.delete(self.model, "dtype_probe")
        self.model.transformer.set_adapter(self.trainer.cfg.adapter)
        self.rows.append(Row("adapters.add alone on the bf16 base", f"LoRA parameters {dtypes}",
                             "float32 (else only trainers that call precision.float32_trainables train float32)",
                             "PASS" if dtypes == ["float32"] else "WARN"))

    def rollout_chunk(self) -> None:
        with self.memory.phase() as m:
            self.chunk = sample_chunk(self.trainer, self.spec)
        finite = bool(torch.isfinite(self.chunk.latents).all() and torch.isfinite(self.chunk.log_probs).all())
        self.numbers["rollout_chunk"] = m
        self.rows.append(Row(f"rollout chunk: sample_chunk of {self.spec.chunk} (batch {2 * self.spec.chunk}), "
                             f"{self.spec.sde_steps} SDE steps + decode", f"{memory_text(m)}; {m['seconds']:.1f} s",
                             "finite latents and log-probs" + ("" if finite else ": NOT finite"),
                             "PASS" if finite else "FAIL"))

    def vae_decode(self) -> None:
        with torch.no_grad(), self.memory.phase() as m:
            images = self.model.decode(self.chunk.latents[:, -1])
        del images
        self.numbers["vae_decode"] = m
        self.rows.append(Row(f"VAE decode of one rollout chunk ({self.spec.chunk} images, float32)",
                             f"{memory_text(m)}; {m['seconds']:.2f} s", versus(m, self.estimate.decode_bytes), "INFO"))

    def training_step(self) -> None:
        """trainer.optimize on one micro-batch of the chunk: its peak, and the PPO ratios it computed."""
        index = torch.arange(min(self.spec.micro_batch, len(self.chunk)))
        part = self.chunk.select(index)
        labels = train_labels(self.trainer, part)
        with recorded_ratio_devs(self.trainer) as self.ratio_devs, self.memory.phase() as m:
            metrics = self.trainer.optimize(part, labels, update=0)
        self.numbers["training_step"] = {**m, "metrics": metrics}
        self.rows.append(Row(f"training micro-batch: optimize on {len(part)} samples (batch {2 * len(part)}), "
                             f"{self.trainer.cfg.trained_steps} PPO+KL terms backpropagated",
                             f"{memory_text(m)}; {m['seconds']:.1f} s", versus(m, self.estimate.activation_bytes), "INFO"))

    def trained_dtypes(self) -> None:
        problems = trainable_dtype_problems(self.trainer)
        self.numbers["dtype_problems"] = problems
        self.rows.append(Row("trained dtypes: parameters, gradients, AdamW state, EMA shadow",
                             "all float32" if not problems else f"{len(problems)} not float32, e.g. {problems[:3]}",
                             "float32 (precision.py)", "PASS" if not problems else "FAIL"))

    def ppo_ratio(self) -> None:
        devs = getattr(self, "ratio_devs", [])
        self.numbers["ratio_dev"] = torch.cat(devs).tolist() if devs else []
        self.rows.append(ratio_row(devs, self.spec))

    def labelling_batch(self):
        """The spec's whole local batch (copies of the chunk's samples): what one labelling forward sees."""
        index = torch.arange(self.spec.samples) % len(self.chunk)
        return self.chunk.select(index)

    def labelling(self) -> None:
        batch = self.labelling_batch()
        with self.memory.phase() as m:
            self.trainer.reference_velocities(batch)
        self.numbers["labelling_reference"] = m
        self.rows.append(Row(f"labelling, reference (adapters off): trainer.reference_velocities of the local batch "
                             f"({len(batch)} samples x {self.trainer.cfg.trained_steps} steps)",
                             f"{memory_text(m)}; {m['seconds']:.1f} s",
                             versus(m, self.estimate.labelling_bytes + self.estimate.stored_labels_bytes)
                             + f" (forwards of {self.estimate.labelling_batch} + labels kept)", "INFO"))
        self.teacher_labelling(batch)

    def teacher_labelling(self, batch) -> None:
        """OPD's teacher path (OPDTrainer.velocities_through: the adapter folded where it can be, run
        unfolded on a bf16 base), one step, with the trained adapter standing in for a teacher."""
        from ..opd import OPDTrainer

        with self.memory.phase() as m:
            OPDTrainer.velocities_through(self.trainer, batch, range(1), [self.trainer.cfg.adapter] * len(batch))
        self.numbers["labelling_teacher"] = m
        self.rows.append(Row(f"labelling, a teacher LoRA (OPD's velocities_through): the local batch "
                             f"({len(batch)} samples) x 1 step", f"{memory_text(m)}; {m['seconds']:.1f} s",
                             versus(m, self.estimate.labelling_bytes) + f" (forwards of {self.estimate.labelling_batch})",
                             "INFO"))

    def forward_times(self) -> None:
        times = {}
        with adapters.active(self.model, self.trainer.cfg.adapter):
            for batch in self.spec.time_batches:
                times[batch] = estimate_module.time_forward(self.model, batch, repeats=3)
        self.numbers["seconds_per_sample_forward"] = times
        for batch, seconds in times.items():
            self.rows.append(Row(f"time per sample-forward at batch {batch}", f"{1e3 * seconds:.2f} ms",
                                 f"estimate.py times batch {min(2 * self.spec.micro_batch, 64)}: "
                                 f"{1e3 * self.estimate.forward_seconds_per_sample:.2f} ms", "INFO"))

    def checkpoint_resume(self) -> None:
        """trainer.state() as a CPU run writes it, then the trainer's own resume onto this device."""
        saved = on_cpu(self.trainer.state())
        saved["update"] = self.trainer.update + 1
        checkpoint.save(self.trainer.ckpt_dir, saved["update"], saved)
        self.trainer.resume()
        problems = misplaced_tensors(self.trainer, self.device) + trainable_dtype_problems(self.trainer)
        if self.trainer.update != saved["update"]:
            problems.append(f"update {self.trainer.update} after resume, saved {saved['update']}")
        problems += [f"{n} differs from the checkpoint" for n, p in zip(self.trainer.param_names, self.trainer.params)
                     if not torch.equal(p.detach().cpu(), saved["adapter"][n])]
        if self.trainer.ema is not None and not problems:
            self.trainer.ema.step(self.trainer.params)  # the EMA must still work with the resumed weights
        self.numbers["resume_problems"] = problems
        self.rows.append(Row("checkpoint saved on the CPU, resumed here (trainer.resume)",
                             "all on " + str(self.device) if not problems else f"{len(problems)} problems, e.g. {problems[:3]}",
                             f"adapter, AdamW, EMA on {self.device}, float32, equal", "PASS" if not problems else "FAIL"))

    def generate(self) -> None:
        batch = self.spec.eval_batch or rollout.default_batch_size(self.model)
        prompts = [f"a red square number {i}" for i in range(batch)]
        with adapters.active(self.model, self.trainer.cfg.adapter), self.memory.phase() as m:
            images = rollout.generate(self.model, prompts, steps=self.spec.generate_steps, cfg_scale=self.spec.cfg_scale,
                                      shift=SD35_MEDIUM_SHIFT, batch_size=batch)
        finite = bool(torch.isfinite(images).all())
        per_step = m["seconds"] / self.spec.generate_steps
        self.numbers["generate"] = {**m, "batch": batch}
        self.rows.append(Row(f"rollout.generate at the evaluation batch {batch} (CFG: {2 * batch}), "
                             f"{self.spec.generate_steps} ODE steps + decode",
                             f"{memory_text(m)}; {m['seconds']:.1f} s (40 steps ~{40 * per_step:.0f} s a batch)",
                             versus(m, estimate_module.vae_decode_bytes(self.model.vae.config, self.spec.resolution,
                                                                        self.spec.resolution, batch, 4)) + " (decode)",
                             "PASS" if finite else "FAIL"))

    def run_estimate(self) -> None:
        with adapters.active(self.model, self.trainer.cfg.adapter):
            self.estimate = estimate_module.estimate(self.model, self.trainer.cfg, self.spec.num_processes,
                                                     self.trainer.params, self.trainer.label_forwards_per_sample)

    # -- all of it
    def run(self) -> list[Row]:
        if not self.run_phase("build model and trainer", self.build):
            return self.rows
        if not self.run_phase("estimate.py", self.run_estimate):
            return self.rows
        phases = [("rollout chunk", self.rollout_chunk), ("VAE decode", self.vae_decode),
                  ("training micro-batch", self.training_step), ("trained dtypes", self.trained_dtypes),
                  ("PPO ratio", self.ppo_ratio), ("labelling", self.labelling), ("forward time", self.forward_times),
                  ("checkpoint resume", self.checkpoint_resume), ("generate", self.generate)]
        needs_chunk = {"VAE decode", "training micro-batch", "PPO ratio", "labelling"}
        have_chunk = True
        for name, phase in phases:
            if name in needs_chunk and not have_chunk:
                self.skip(name, "the rollout chunk")
                continue
            ok = self.run_phase(name, phase)
            have_chunk = have_chunk and (ok or name != "rollout chunk")
        return self.rows


# ----------------------------------------------------------------------------- reporting

def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return commit + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device}, torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU ({torch.get_num_threads()} threads, torch {torch.__version__})"


def markdown(rows: list[Row], header: dict, estimate: estimate_module.Estimate | None) -> str:
    lines = ["# GPU check: SD3.5-M's shape with random weights, through the real trainer", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| check | measured | estimate / expected | status |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.measured} | {r.reference} | {r.status} |".replace("\n", " ") for r in rows]
    if estimate is not None:
        lines += ["", "estimate.py for the same config (per GPU):", "", "```", str(estimate), "```"]
    return "\n".join(lines) + "\n"


def write_report(check: Check, out_dir: Path) -> str:
    spec = check.spec
    header = {"device": device_name(check.device), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "commit": git_commit(),
              "sizes": f"{spec.resolution} px, {spec.samples} samples per GPU, rollout chunk {spec.chunk}, "
                       f"micro_batch {spec.micro_batch}, CFG {spec.cfg_scale}, {spec.sde_steps} SDE steps, "
                       f"gradient checkpointing {'on' if spec.gradient_checkpointing else 'off'}"}
    estimate = getattr(check, "estimate", None)
    table = markdown(check.rows, header, estimate)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(table)
    results = {**header, "spec": dataclasses.asdict(spec), "rows": [dataclasses.asdict(r) for r in check.rows],
               "numbers": check.numbers, "estimate": dataclasses.asdict(estimate) if estimate else None,
               "passed": not any(r.status == "FAIL" for r in check.rows)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return table


# ----------------------------------------------------------------------------- costs (docs/gpu.md, docs/gpu_costs.md)
# Every memory and time number of docs/gpu.md and docs/gpu_costs.md comes from here: estimate.py's
# formulas on SD3.5-M's real shape (built on the meta device: shapes without memory, real-size text
# encoders included) at sd35m.yaml's settings, merged with `-p` overrides as the runner merges them.
# Nothing is measured: the forward time is ASSUMED, from the FLOPs of one sample-forward.
#     --costs                 the stage table (docs/gpu_costs.md)
#     --costs --fewer-gpus    the table of fewer and smaller GPUs (docs/gpu.md)
#     --costs --update-docs   both, written into the docs between their `gpu_check` markers
#                             (tests/test_gpu_check.py fails when the docs differ from the output)
ROOT = Path(__file__).resolve().parents[2]
SD35M_YAML = ROOT / "papermill_runs" / "sd35m.yaml"
ASSUMED_TFLOPS = 400.0  # effective bf16 TFLOP/s of one H100 SXM on these forwards: 40% of its 989 dense peak
# The runner's evaluation job of notebooks 03 and 05 (their `job` dict): no trained tasks, so every task.
NOTEBOOK_JOB_KEYS = ("base", "seed", "shift", "prompt_root", "task_rewards", "eval_prompts", "eval_samples",
                     "eval_steps", "eval_cfg", "eval_batch_size")


def forward_flops(shape: dict, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one MMDiT sample-forward: the per-token projections of both streams (attention q/k/v/out
    and the 4x feed-forward), joint attention over all tokens, and the image-only second attention of
    the dual-attention blocks (AdaLN and embeddings are per sample or small and left out)."""
    width = shape["num_attention_heads"] * shape["attention_head_dim"]
    tokens = image_tokens + text_tokens
    projections = 4 * width * width + 2 * width * 4 * width
    joint = 2 * projections * tokens + 4 * tokens ** 2 * width
    dual = 2 * 4 * width * width * image_tokens + 4 * image_tokens ** 2 * width
    return shape["num_layers"] * joint + len(shape["dual_attention_layers"]) * dual


def real_text_encoders() -> dict:
    """SD3's CLIP-L, CLIP-G and T5-XXL at their real sizes on the meta device (bf16), tokenizers in code."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        encoders = {
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                projection_dim=768, hidden_act="quick_gelu", **clip)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                projection_dim=1280, hidden_act="gelu", **clip)),
            "text_encoder_3": T5EncoderModel(T5Config(
                vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu"))}
    for encoder in encoders.values():
        encoder.to(torch.bfloat16).eval().requires_grad_(False)
    return {"tokenizer": _tiny_clip_tokenizer(), "tokenizer_2": _tiny_clip_tokenizer(),
            "tokenizer_3": _tiny_t5_tokenizer(), **encoders}


def meta_model(spec: Spec) -> SD3FlowModel:
    """SD3.5-M as a training process holds it (bf16 MMDiT and text encoders, float32 VAE), no memory."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from ..models.sd3 import sd3_pipeline_class

    StableDiffusion3Pipeline = sd3_pipeline_class()

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**spec.transformer).to(torch.bfloat16).requires_grad_(False)
        vae = AutoencoderKL(**SD3_VAE).requires_grad_(False)
    pipeline = StableDiffusion3Pipeline(transformer=transformer, vae=vae, **real_text_encoders(),
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=SD35_MEDIUM_SHIFT))
    return SD3FlowModel.from_pipeline(pipeline, spec.resolution, max_sequence_length=T5_TOKENS)


@dataclasses.dataclass
class Evaluation:
    """`count` evaluations of one model each, every image of `job`'s tasks (a distributed_eval.EvalJob).
    where: "in training" (the EMA adapter every eval_every updates and at the end, in the training
    job; never cached) or "launched" (the notebook's jobs at the end of the stage: only the models
    the run's evaluation cache does not hold yet under this job)."""
    where: str
    count: int
    job: object

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.job.evaluated_tasks()

    @property
    def images(self) -> int:
        """Images of one evaluation: test prompts x samples per prompt, summed over the tasks."""
        return sum(self.job.prompts_for(t) * self.job.samples_for(t) for t in self.tasks)

    @property
    def sample_forwards(self) -> int:
        return self.count * self.images * self.job.eval_steps * (2 if self.job.eval_cfg != 1.0 else 1)


@dataclasses.dataclass
class Stage:
    """A stage of the spec: what it trains (trainer and parameter values, or None) and what it evaluates."""
    name: str
    trainer: str | None
    values: dict
    evaluations: list[Evaluation]

    @property
    def num_processes(self) -> int:
        return int(self.values.get("num_processes") or 1)


def sd35m_spec(path: Path = SD35M_YAML) -> dict:
    from ..safe_files import read_mapping

    return read_mapping(path, "a run spec")


def parse_overrides(overrides) -> dict:
    """`-p key=value` strings (or a dict) as the runner reads them: the value is YAML."""
    from ..runs import parse_override

    if isinstance(overrides, dict):
        return dict(overrides)
    return dict(parse_override(text) for text in overrides or ())


def stage_values(shared: dict, params: dict, overrides: dict) -> dict:
    """A stage's parameters as the runner gives them (the shared block, then the stage's own, then
    `-p`; `extra` merged key by key: runs.merge_parameters), with `extra`'s fields beside them (the
    notebooks hand them to the trainer's config)."""
    from ..runs import merge_parameters

    merged = merge_parameters(merge_parameters(shared, params), overrides)
    return {**merged, **(merged.get("extra") or {})}


def in_training_evaluations(values: dict) -> int:
    """The trainer's evaluations: every eval_every updates, and at the last update (trainer.train)."""
    updates, every = int(values["updates"]), int(values.get("eval_every") or 0)
    return updates // every + (updates % every > 0) if every else 1


def launched_models(notebook: str, name: str, values: dict) -> list[str | None]:
    """The models a notebook evaluates in launched jobs (num_processes > 1; None: the base), named as
    the spec names them ("{stage}/adapter"), so one name is one adapter's weights in every stage."""
    teachers = list((values.get("teachers") or {}).values())
    if notebook == "02_teacher_grpo":
        return [None, f"{{{name}}}/adapter"]
    if notebook == "04_flow_opd":
        return [None, *teachers, f"{{{name}}}/adapter"]
    if notebook == "03_cold_start":
        merges = [f"{{{name}}}/merge_{m}" for m in values.get("merge_methods") or ()]
        return [None, *teachers, *merges, *([f"{{{name}}}/sft/adapter"] if values.get("sft", True) else [])]
    if notebook == "05_ablations":
        tables = [values.get(t) or {} for t in ("main", "seesaw", "mar", "estimators", "merges")]
        return [None, *sorted({d for table in tables for d in table.values() if d})]
    return []


def eval_job(notebook: str, values: dict):
    """The evaluation job of a stage: a trainer's config's (its trained tasks unless eval_tasks says
    otherwise: distributed_eval.job_from), or the job dict of notebooks 03 and 05 (every task)."""
    from ..distributed_eval import job_from

    if notebook in ("03_cold_start", "05_ablations"):
        values = {k: values[k] for k in NOTEBOOK_JOB_KEYS if k in values}
    return job_from(values)


def spec_stages(spec: dict, overrides=None) -> list[Stage]:
    """The stages of a papermill_runs spec (with `-p` overrides) as cost rows, in the spec's order.
    Notebook 02 trains with the spec's `trainer` (this table models grpo), 04 is Flow-OPD; both
    evaluate in training (every eval_every updates and at the end, on the trained tasks) and then, in
    launched jobs, the base and the adapter (04: and its teachers). 03 evaluates the base, the teachers
    and its merges (and SFT), 05 every adapter of its tables, both on every task. A launched model
    already evaluated under the same job is read from the run's evaluation cache
    (distributed_eval.launched_scores), so it costs nothing again. This is the multi-GPU path
    (num_processes > 1); notebooks training in their kernel evaluate in it instead."""
    shared, overrides = spec["shared"], parse_overrides(overrides)
    stages, cached = [], set()
    for stage in spec["stages"]:
        notebook, name = Path(stage["notebook"]).stem, stage["name"]
        values = stage_values(shared, stage.get("parameters") or {}, overrides)
        trainer = {"02_teacher_grpo": values.get("trainer", "grpo"), "04_flow_opd": "opd"}.get(notebook)
        evaluations, models = [], launched_models(notebook, name, values)
        if models:
            job = eval_job(notebook, values)
            if trainer is not None:
                evaluations.append(Evaluation("in training", in_training_evaluations(values), job))
            key = job.to_yaml()
            new = [m for m in dict.fromkeys(models) if (m, key) not in cached]
            cached.update((m, key) for m in new)
            evaluations.append(Evaluation("launched", len(new), job))
        stages.append(Stage(name, trainer, values, evaluations))
    return stages


def stage_config(stage: Stage, **changes):
    """The config a stage trains with: the stage's values that are fields of its trainer's config."""
    from ..opd import OPDConfig

    config_cls = OPDConfig if stage.trainer == "opd" else GRPOConfig
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in stage.values.items() if k in fields}
    return config_cls(**{**values, "out_dir": str(Path(tempfile.gettempdir()) / "gpu_costs"), **changes})


def label_forwards(stage: Stage, cfg) -> int:
    """The trainer's own label_forwards_per_sample for `cfg`, read without building a trainer."""
    from ..opd import OPDTrainer

    trainer_cls = OPDTrainer if stage.trainer == "opd" else GRPOTrainer
    shell = trainer_cls.__new__(trainer_cls)
    shell.cfg = cfg
    return shell.label_forwards_per_sample


class CostModel:
    """estimate.py on the meta-device SD3.5-M with an assumed forward time, for a spec's stages."""

    def __init__(self, ms_per_sample_forward: float | None = None, spec_path: Path = SD35M_YAML):
        self.spec = Spec.full()
        self.run_spec = sd35m_spec(spec_path)
        self.shared, self.stages = self.run_spec["shared"], spec_stages(self.run_spec)
        self.model = meta_model(self.spec)
        self.params = adapters.add(self.model, "student", rank=self.shared["lora_rank"], alpha=self.shared["lora_alpha"])
        side = self.spec.resolution // 8 // self.spec.transformer["patch_size"]
        self.flops = forward_flops(self.spec.transformer, side * side, 77 + self.spec.t5_tokens)
        self.seconds = (ms_per_sample_forward / 1e3 if ms_per_sample_forward
                        else self.flops / (ASSUMED_TFLOPS * 1e12))
        self.time_source = ("given" if ms_per_sample_forward else f"assumed: {self.flops / 1e12:.2f} TFLOP per "
                            f"sample-forward at {ASSUMED_TFLOPS:.0f} TFLOP/s")
        encoders = {n: getattr(self.model, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")}
        self.encoder_params = {n: sum(p.numel() for p in m.parameters()) for n, m in encoders.items()}
        self.encoder_bytes = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in encoders.items()}
        self._estimates: dict = {}

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def stages_with(self, overrides) -> list[Stage]:
        return spec_stages(self.run_spec, overrides)

    def estimate(self, stage: Stage, **changes):
        cfg = stage_config(stage, **changes)
        key = (repr(cfg), stage.trainer, stage.num_processes)
        if key not in self._estimates:  # the tables ask for the same stage's estimate several times
            with adapters.active(self.model, "student"):
                self._estimates[key] = estimate_module.estimate(self.model, cfg, stage.num_processes, self.params,
                                                                label_forwards(stage, cfg), self.seconds)
        return self._estimates[key]

    def peak_bytes(self, stage: Stage) -> int:
        """estimate.py's peak (which leaves out the text encoders where `text_encoders_on_cpu` keeps
        them on the CPU)."""
        return self.estimate(stage).peak_bytes

    def update_seconds(self, stage: Stage) -> float:
        """estimate.py's time of one update, plus gradient checkpointing's recomputed forward of every
        trained step (estimate.py counts a backward as 2 forwards and no recompute)."""
        cfg, e = stage_config(stage), self.estimate(stage)
        recomputed = e.samples_per_process * (2 if cfg.cfg_scale != 1.0 else 1) * cfg.trained_steps * cfg.inner_epochs
        return (e.forwards_per_update + (recomputed if cfg.gradient_checkpointing else 0)) * self.seconds

    def training_gpu_hours(self, stage: Stage) -> float:
        return self.update_seconds(stage) * stage.values["updates"] * stage.num_processes / 3600

    def evaluation_gpu_hours(self, stage: Stage | None = None) -> float:
        """A stage's evaluations; without one, one adapter's evaluation on every task (the summary's job)."""
        evaluations = stage.evaluations if stage else [Evaluation("launched", 1, eval_job("05_ablations", self.shared))]
        return sum(e.sample_forwards for e in evaluations) * self.seconds / 3600

    def evaluation_peak_bytes(self, stage: Stage) -> dict[str, int]:
        """Peak per GPU while evaluating at the stage's eval batch (eval_batch_size, or rollout's default):
        resident weights plus the larger of the decode of one batch and its no-grad forward (CFG x2),
        plus that batch's images.
            launched: an evaluation job on every task (distributed_eval.launch_eval): the base (text
                      encoders where the stage keeps them: EvalJob shares text_encoders_on_cpu), one
                      adapter, PickScore, the prompt cache
            training: the stage's periodic evaluation inside its training process: the training
                      resident set without the update's rollout
            gpu0:     the larger of `launched` and the notebook kernel's own copy of the base (text
                      encoders included) and its adapters, which notebooks load on GPU 0 only after
                      their training and evaluation jobs, for the sample grid"""
        from ..evaluation import TASKS

        cfg, e = stage_config(stage), self.estimate(stage)
        batch = stage.values.get("eval_batch_size") or rollout.default_batch_size(self.model)
        side, config = self.spec.resolution, self.model.transformer.config
        width = config.num_attention_heads * config.attention_head_dim
        transient = max(estimate_module.vae_decode_bytes(self.model.vae.config, side, side, batch, 4),
                        estimate_module.no_grad_forward_bytes(2 * batch, e.tokens, width, 2))
        transient += batch * 3 * side * side * 4  # the batch's images, float32
        judges = self.shared["task_rewards"]
        launched = (e.base_bytes + e.adapter_bytes + e.prompt_cache_bytes
                    + estimate_module.reward_model_bytes([judges.get(t, t) for t in TASKS]))
        moved = sum(self.encoder_bytes.values()) if cfg.text_encoders_on_cpu else 0
        in_process = [*(getattr(cfg, "rewards", None) or {}),
                      *(judges.get(t, t) for ev in stage.evaluations for t in ev.tasks)]
        training = (e.base_bytes + e.adapter_bytes + e.optimizer_bytes + e.prompt_cache_bytes
                    + estimate_module.reward_model_bytes(in_process))
        teachers = len(stage.values.get("teachers") or {}) if stage.trainer == "opd" else 0
        kernel = e.base_bytes + moved + (1 + teachers) * e.adapter_bytes
        return {"launched": launched + transient, "training": training + transient,
                "gpu0": max(launched, kernel) + transient, "batch": batch}


# ----------------------------------------------------------------------------- the tables

def tasks_text(tasks) -> str:
    from ..evaluation import TASKS

    return "every task" if set(tasks) == set(TASKS) else ", ".join(tasks)


def evaluations_text(stage: Stage) -> str:
    """'in training + launched (tasks)', or 'launched (tasks)' for stages that train nothing."""
    if not stage.evaluations:
        return "-"
    counts = {e.where: e.count for e in stage.evaluations}
    tasks = tasks_text(stage.evaluations[-1].tasks)
    if "in training" in counts:
        return f"{counts['in training']} + {counts['launched']} ({tasks})"
    return f"{counts['launched']} ({tasks})"


def gib_text(n: float) -> str:
    return f"{n / 2 ** 30:.1f}"


def stage_row(costs: CostModel, stage: Stage) -> str:
    eval_hours = costs.evaluation_gpu_hours(stage)
    evaluations = evaluations_text(stage)
    if stage.trainer is None:
        return f"| {stage.name} | - | - | - | - | 0 | {evaluations} | {eval_hours:.1f} | {eval_hours:.1f} | - | - |"
    if stage.trainer not in ("grpo", "opd"):
        return f"| {stage.name} | {stage.trainer}: not modelled here | | | | | {evaluations} | {eval_hours:.1f} | | | |"
    cfg, e = stage_config(stage), costs.estimate(stage)
    train_hours = costs.training_gpu_hours(stage)
    return (f"| {stage.name} | {stage.trainer} | {label_forwards(stage, cfg)} | {e.forwards_per_update:,} | "
            f"{costs.update_seconds(stage):.0f} | {train_hours:.0f} | {evaluations} | {eval_hours:.1f} | "
            f"{train_hours + eval_hours:.0f} | {gib_text(costs.peak_bytes(stage))} | "
            f"{gib_text(e.reward_server_bytes)} |")


def cost_tables(ms_per_sample_forward: float | None = None, spec_path: Path = SD35M_YAML,
                costs: CostModel | None = None) -> str:
    """The stage table of docs/gpu_costs.md (markdown)."""
    costs = costs or CostModel(ms_per_sample_forward, spec_path)
    one = Evaluation("launched", 1, eval_job("05_ablations", costs.shared))
    transformer = costs.model.transformer
    mmdit = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n)
    grid = sum(b.numel() for b in transformer.buffers())
    vae = sum(p.numel() for p in costs.model.vae.parameters())
    clip_l, clip_g, t5 = (costs.encoder_params[n] / 1e6 for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    lora = sum(p.numel() for p in costs.params)
    lines = [f"- model, built on the meta device: MMDiT {mmdit / 1e9:.3f}B parameters + a {grid / 1e6:.0f}M-value "
             f"position grid (bf16), VAE {vae / 1e6:.1f}M (float32), text encoders CLIP-L {clip_l:.1f}M + CLIP-G "
             f"{clip_g:.1f}M + T5-XXL {t5:,.0f}M (bf16: {gib_text(sum(costs.encoder_bytes.values()))} GiB, T5 "
             f"{gib_text(costs.encoder_bytes['text_encoder_3'])} GiB); LoRA {lora / 1e6:.1f}M (float32)",
             f"- sample-forward at {costs.spec.resolution} px, 77 + {costs.spec.t5_tokens} text tokens: "
             f"{1e3 * costs.seconds:.2f} ms ({costs.time_source})",
             f"- training stages on {costs.shared['num_processes']} GPUs; one adapter evaluated on every task: "
             f"{one.images:,} images x {one.job.eval_steps} steps x CFG 2 = {costs.evaluation_gpu_hours():.2f} GPU-h",
             "", "| stage | trainer | label fwd / sample | sample-forwards / GPU / update | s / update | "
             "training GPU-h | evaluations: in training + launched (tasks) | evaluation GPU-h | total GPU-h | "
             "peak GiB / GPU | reward server GiB / GPU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [stage_row(costs, stage) for stage in costs.stages]
    modelled = [s for s in costs.stages if s.trainer in (None, "grpo", "opd")]
    train = sum(costs.training_gpu_hours(s) for s in modelled if s.trainer)
    evaluation = sum(costs.evaluation_gpu_hours(s) for s in modelled)
    lines.append(f"| **total** | | | | | {train:,.0f} | | {evaluation:.0f} | {train + evaluation:,.0f} | | |")
    return "\n".join(lines)


# Fewer or smaller GPUs than the spec's 8 x 80 GB: the same update (48 prompts x 24 images) by
# accumulation. Each row's `-p` overrides, as typed after `python -m flowopd_lib.runs papermill_runs/sd35m.yaml`.
FEWER_GPUS = (
    ("8", ()),
    ("4", ("num_processes=4", "extra={rollout_chunks: 24}")),
    ("2", ("num_processes=2", "extra={rollout_chunks: 48}")),
    ("1 x 80 GB", ("num_processes=1", "extra={rollout_chunks: 96}")),
    ("1 x 48 GB", ("num_processes=1", "extra={rollout_chunks: 192, micro_batch: 2, gradient_checkpointing: true}",
                   "eval_batch_size=8")),
    ("2 x 48 GB", ("num_processes=2", "extra={rollout_chunks: 96, micro_batch: 2, gradient_checkpointing: true}",
                   "eval_batch_size=8")),
    ("8 x 24 GB", ("extra={rollout_chunks: 24, micro_batch: 1, gradient_checkpointing: true}", "eval_batch_size=2")),
    ("4 x 24 GB", ("num_processes=4", "extra={rollout_chunks: 48, micro_batch: 1, gradient_checkpointing: true}",
                   "eval_batch_size=2")),
)


def shell_overrides(overrides) -> str:
    """`-p` arguments as typed in a shell (values with spaces or braces in single quotes)."""
    if not overrides:
        return "none"
    return " ".join(f"-p '{o}'" if any(c in o for c in " {}") else f"-p {o}" for o in overrides)


def encoder_tflops_per_prompt(costs: CostModel) -> float:
    """FLOPs of encoding one prompt: 2 x the non-embedding parameters x the tokens (77 CLIP, T5_TOKENS T5)."""
    total = 0
    for name, tokens in (("text_encoder", 77), ("text_encoder_2", 77), ("text_encoder_3", T5_TOKENS)):
        encoder = getattr(costs.model, name)
        embedding = sum(m.weight.numel() for m in encoder.modules() if isinstance(m, torch.nn.Embedding))
        total += 2 * (sum(p.numel() for p in encoder.parameters()) - embedding) * tokens
    return total / 1e12


def fewer_gpu_row(costs: CostModel, label: str, overrides) -> tuple[str, dict]:
    stages = costs.stages_with(overrides)
    parsed = parse_overrides(overrides)  # text_encoders_on_cpu joins the row's own `extra` (one -p extra= each run)
    on_cpu = costs.stages_with({**parsed, "extra": {**(parsed.get("extra") or {}), "text_encoders_on_cpu": True}})
    trained = {s.name: s for s in stages if s.trainer in ("grpo", "opd")}
    peak = {n: costs.peak_bytes(s) for n, s in trained.items()}
    peak_cpu = {s.name: costs.peak_bytes(s) for s in on_cpu if s.name in trained}
    grpo = [n for n, s in trained.items() if s.trainer == "grpo"]
    opd = [n for n, s in trained.items() if s.trainer == "opd"]
    evaluation = [costs.evaluation_peak_bytes(s) for s in trained.values()]
    job = max(max(e["launched"], e["training"]) for e in evaluation)
    # one process: the notebooks evaluate in their kernel, with no second copy of the base on GPU 0
    gpu0 = max(e["gpu0"] for e in evaluation) if stages[0].num_processes > 1 else job
    days = [max(costs.update_seconds(trained[n]) * trained[n].values["updates"] / 86400 for n in group)
            for group in (grpo, opd)]
    worst = {table: [gib_text(max(values[n] for n in group)) for group in (grpo, opd)]
             for table, values in (("gpu", peak), ("cpu", peak_cpu))}
    row = (f"| {label} | {shell_overrides(overrides)} | {worst['gpu'][0]} | {worst['gpu'][1]} | "
           f"{worst['cpu'][0]} / {worst['cpu'][1]} | {gib_text(job)} / {gib_text(gpu0)} | "
           f"{days[0]:.1f} / {days[1]:.1f} |")
    return row, {"grpo": max(grpo, key=peak.get), "stages": trained}


def fewer_gpu_table(ms_per_sample_forward: float | None = None, spec_path: Path = SD35M_YAML,
                    costs: CostModel | None = None) -> str:
    """docs/gpu.md's table: peak GiB per GPU (estimate) of the largest reward stage and of Flow-OPD, both
    again with `text_encoders_on_cpu`, the evaluation's peak, and days per training stage, for each
    row of FEWER_GPUS; then the facts the page quotes, from the same model."""
    costs = costs or CostModel(ms_per_sample_forward, spec_path)
    lines = ["| GPUs | `-p` overrides | DeQA teacher / GRPO-Mix | Flow-OPD | both, `text_encoders_on_cpu: true` | "
             "evaluation: job / GPU 0 | days per stage: teacher / Flow-OPD |", "|---|---|---|---|---|---|---|"]
    found = {}
    for label, overrides in FEWER_GPUS:
        row, found[label] = fewer_gpu_row(costs, label, overrides)
        lines.append(row)
    first = found[FEWER_GPUS[0][0]]
    teacher = first["stages"].get("teacher_deqa") or first["stages"][first["grpo"]]
    e, evaluation = costs.estimate(teacher), costs.evaluation_peak_bytes(teacher)
    encoders = sum(costs.encoder_bytes.values())
    host = sum(costs.encoder_params.values()) * 4
    single = next(s for s in costs.stages_with(["num_processes=1"]) if s.name == teacher.name)
    one = costs.estimate(single)
    others = e.resident_bytes - e.base_bytes - e.reward_model_bytes - e.rollout_bytes
    lines += [
        "",
        f"- {teacher.name} on 8 GPUs: resident {gib_text(e.resident_bytes)} GiB (base {gib_text(e.base_bytes)}, of "
        f"which text encoders {gib_text(encoders)}; PickScore {gib_text(e.reward_model_bytes)}; rollout "
        f"{gib_text(e.rollout_bytes)}; labels, images, adapter, AdamW, EMA, prompt cache {gib_text(others)}) + its "
        f"largest transient, training activations {gib_text(e.activation_bytes)} GiB (the VAE decode of "
        f"{e.decode_batch} images: {gib_text(e.decode_bytes)} GiB)",
        f"- 1 GPU with the spec's `rollout_chunks: 12`: {one.decode_batch} images decoded at once, a "
        f"{gib_text(one.decode_bytes)} GiB transient, {teacher.name} peak {gib_text(costs.peak_bytes(single))} GiB",
        f"- `text_encoders_on_cpu`: {gib_text(encoders)} GiB off each GPU; each process keeps CLIP-L/G and T5 in "
        f"float32 in host memory, {gib_text(host)} GiB ({gib_text(8 * host)} GiB for 8 processes on a node); "
        f"encoding one prompt there is {encoder_tflops_per_prompt(costs):.1f} TFLOP, not in the days",
        f"- evaluation: {evaluation['batch']} images at once unless `eval_batch_size` says otherwise; GPU 0 "
        f"then holds the notebook kernel's own base and adapters for its sample grid, after the jobs",
        f"- days: {teacher.values['updates']} updates at {1e3 * costs.seconds:.2f} ms per sample-forward "
        f"({costs.time_source.split(':')[0]}), gradient "
        f"checkpointing's recomputed forwards included; evaluation, VAE decodes and scoring not included",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the docs' copies

DOC_TABLES = {"docs/gpu_costs.md": ("--costs", cost_tables), "docs/gpu.md": ("--costs --fewer-gpus", fewer_gpu_table)}


def doc_markers(flags: str) -> tuple[str, str]:
    return (f"<!-- output of `python -m flowopd_lib.diagnostics.gpu_check {flags}`: do not edit; "
            f"refresh with --costs --update-docs -->", "<!-- end of output -->")


def doc_table(text: str, flags: str) -> str:
    """The generated block of a doc page (between its markers)."""
    begin, end = doc_markers(flags)
    if begin not in text or end not in text.split(begin, 1)[1]:
        raise ValueError(f"no block {begin!r} ... {end!r}")
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def update_docs(root: Path = ROOT, costs: CostModel | None = None) -> list[Path]:
    """Write each table into its doc page between the markers; returns the pages changed."""
    costs, changed = costs or CostModel(), []
    for page, (flags, make) in DOC_TABLES.items():
        path = root / page
        text = path.read_text()
        old = doc_table(text, flags)
        new = make(costs=costs)
        if old != new:
            begin, _ = doc_markers(flags)
            path.write_text(text.replace(begin + "\n" + old, begin + "\n" + new, 1))
            changed.append(path)
    return changed


# ----------------------------------------------------------------------------- command line

def spec_from_args(args) -> Spec:
    spec = Spec.tiny() if args.tiny else Spec.full()
    if args.layers:
        spec = spec.with_layers(args.layers)
    if args.resolution:
        spec = spec.with_resolution(args.resolution)
    return dataclasses.replace(spec, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)


@cli.entry
def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU variant: 2 narrow layers at 32 px, small batches")
    parser.add_argument("--layers", type=cli.count, help="MMDiT layers (default: 24, or 2 with --tiny)")
    parser.add_argument("--resolution", type=cli.count, help="image side in pixels, a multiple of 16 (default: 512, or 32)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="train with gradient checkpointing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/gpu_check", help="directory for table.md and results.json")
    parser.add_argument("--costs", action="store_true", help="print docs/gpu_costs.md's stage table instead "
                        "(estimate.py on the real shape, an assumed forward time; no forward runs)")
    parser.add_argument("--fewer-gpus", action="store_true", help="with --costs: docs/gpu.md's table of fewer and "
                        "smaller GPUs instead (each row's -p overrides)")
    parser.add_argument("--update-docs", action="store_true", help="with --costs: write both tables into docs/gpu.md "
                        "and docs/gpu_costs.md (at the assumed forward time, which the tests compare)")
    parser.add_argument("--ms-per-sample-forward", type=float, default=None,
                        help="with --costs: the time of one sample-forward at 512 px, e.g. the GPU check's "
                        "batch-24 row (default: its FLOPs at ASSUMED_TFLOPS)")
    args = parser.parse_args(argv)
    if args.resolution and args.resolution % 16:
        raise cli.UserError(f"--resolution {args.resolution} is not a multiple of 16 (the VAE's 8x times the 2x2 "
                            f"patches): e.g. {max(16, args.resolution // 16 * 16)}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise cli.UserError(f"--out {args.out} is a file: name a folder for table.md and results.json")
    if (args.fewer_gpus or args.update_docs) and not args.costs:
        parser.error("--fewer-gpus and --update-docs go with --costs")
    if args.update_docs:
        if args.ms_per_sample_forward:
            parser.error("--update-docs writes the assumed forward time; a measured one goes into ASSUMED_TFLOPS")
        changed = update_docs()
        print("updated: " + ", ".join(str(p.relative_to(ROOT)) for p in changed) if changed else "docs up to date")
        return 0
    if args.costs:
        make = fewer_gpu_table if args.fewer_gpus else cost_tables
        print(make(args.ms_per_sample_forward))
        return 0
    check = Check(spec_from_args(args), Path(args.out))
    try:
        check.run()
        print(write_report(check, Path(args.out)))
    finally:
        shutil.rmtree(check.work, ignore_errors=True)  # the trainer's run directory and checkpoint
    failed = [r.check for r in check.rows if r.status == "FAIL"]
    if failed:
        print(f"GPU CHECK FAILED: {len(failed)} row(s): " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
