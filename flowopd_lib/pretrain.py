"""Pretraining the toy base model (what SD3.5-Medium is in the paper): autoencoder, then flow.

Phase 1 fits the tiny autoencoder to renders (with latent noise, so the decoder forgives the
imperfect latents a generator produces) and measures per-channel latent statistics.
Phase 2 trains the MMDiT and the text encoders jointly with the rectified-flow loss on latents of
renders paired with web-like noisy captions (`toy.pretraining_batch`), caption dropout for CFG,
an EMA of the weights, the loss logged per noise bin, and checkpoints for resuming.
Data and noise of step k depend only on (seed, k), so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import checkpoint, flow, toy
from .config import Config, param
from .models.toy import SIZES, ToyFlowModel
from .tracking import Run, seed_everything


@dataclasses.dataclass
class PretrainConfig(Config):
    size: str = param("small", "model size (models.toy.SIZES)", choices=tuple(SIZES))
    image_size: int = param(32, "image side in pixels (multiple of 4)", range=(8, 256))
    ae_steps: int = param(2000, "autoencoder training steps", range=(0, None))
    ae_batch: int = param(128, "autoencoder batch size", range=(1, None))
    ae_lr: float = param(2e-3, "autoencoder AdamW learning rate", range=(0, 1))
    ae_latent_noise: float = param(0.1, "std of noise added to latents (relative) while training the decoder", range=(0, 1))
    steps: int = param(8000, "flow training steps", range=(0, None))
    batch: int = param(64, "flow batch size", range=(1, None))
    lr: float = param(1e-3, "flow AdamW peak learning rate", range=(0, 1))
    warmup: int = param(200, "linear warm-up steps", range=(0, None))
    weight_decay: float = param(0.01, "AdamW weight decay", range=(0, 1))
    grad_clip: float = param(1.0, "gradient-norm clip", range=(0, None))
    caption_noise: float = param(toy.captions.CAPTION_NOISE, "probability a caption is left vague or wrong (toy.pretraining_batch)", range=(0, 1))
    ocr_caption_noise: float | None = param(None, "the same for sign captions' quoted text (None: caption_noise); with "
                                            "glyph places the base binds text fast, and web captions rarely "
                                            "transcribe signs", range=(0, 1))
    caption_dropout: float = param(0.1, "probability of the empty caption (trains the unconditional branch for CFG)", range=(0, 1))
    ema_decay: float = param(0.999, "EMA decay of the flow weights (the EMA is what is saved)", range=(0, 1))
    time_budget_minutes: float | None = param(None, "stop the flow phase after this many minutes", range=(0, None))
    log_every: int = param(50, "log metrics every N steps", range=(1, None))
    eval_every: int = param(2000, "run eval_fn on the EMA weights every N steps (0 = only at the end)", range=(0, None))
    checkpoint_every: int = param(1000, "save a resumable checkpoint every N steps", range=(1, None))
    init_from: str | None = param(None, "continue pretraining a saved model (a directory saved by ToyFlowModel.save, "
                                  "or 'toy' for the shipped base): its autoencoder is kept (no autoencoder phase) "
                                  "and the flow phase starts from its weights; give another seed than its run's so "
                                  "the batches are new")
    glyph_places: bool = param(True, "add a learned embedding of each quoted glyph's place to the context tokens "
                               "(models.toy.GlyphPlaces; added freshly initialised to an init_from model without one)")
    seed: int = param(0, "seed of data, noise and initial weights")
    out_dir: str = param("runs/base_toy", "run directory (model/, checkpoints/, metrics.csv)")


def _batch_seed(seed: int, step: int, phase: int) -> int:
    """The seed of one step's data and noise: a function of (run seed, step, phase) only."""
    return (seed * 1_000_003 + phase * 10_000_019 + step) % 2 ** 31


def _step_generator(seed: int, step: int, phase: int) -> torch.Generator:
    return torch.Generator().manual_seed(_batch_seed(seed, step, phase))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_autoencoder(model: ToyFlowModel, cfg: PretrainConfig, run: Run | None = None) -> float:
    """Fit the autoencoder, then set the latent statistics. Returns the final reconstruction MSE."""
    ae = model.autoencoder.train().requires_grad_(True)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.ae_lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(cfg.ae_steps), desc="autoencoder", mininterval=5):
        images, _ = toy.pretraining_batch(cfg.ae_batch, seed=_batch_seed(cfg.seed, step, 1), size=cfg.image_size)
        g = _step_generator(cfg.seed, step, 1)
        z = ae.encode(images)
        z = z + cfg.ae_latent_noise * z.detach().std() * torch.randn(z.shape, generator=g)
        loss = torch.nn.functional.mse_loss(ae.decode(z), images)
        for group in opt.param_groups:
            group["lr"] = cfg.ae_lr * lr_factor(step, 100, cfg.ae_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if run is not None and (step % cfg.log_every == 0 or step == cfg.ae_steps - 1):
            run.log({"ae/mse": loss.item()}, step=step)
    ae.eval().requires_grad_(False)
    set_latent_statistics(model, cfg)
    return loss.item()


@torch.no_grad()
def set_latent_statistics(model: ToyFlowModel, cfg: PretrainConfig, n: int = 2048) -> None:
    images, _ = toy.pretraining_batch(n, seed=_batch_seed(cfg.seed, 0, 3), size=cfg.image_size)
    z = model.autoencoder.encode(images)
    model.latent_mean.copy_(z.mean(dim=(0, 2, 3)))
    model.latent_std.copy_(z.std(dim=(0, 2, 3)))


def _flow_parameters(model: ToyFlowModel) -> list[torch.nn.Parameter]:
    return [p for module in (model.transformer, *model.text_encoders) for p in module.parameters()]


def train_flow(model: ToyFlowModel, cfg: PretrainConfig, run: Run | None = None,
               eval_fn: Callable[[ToyFlowModel], dict] | None = None, resume: bool = True) -> dict:
    """The flow phase (see the module docstring). Returns the last logged metrics."""
    from diffusers.training_utils import EMAModel

    params = _flow_parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
    ckpt_dir = Path(cfg.out_dir) / "checkpoints"
    start, spent = 0, 0.0
    if resume and (last := checkpoint.latest(ckpt_dir)) is not None:
        state = checkpoint.load(last)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start, spent = state["step"], state.get("elapsed_s", 0.0)
        print(f"resumed from {last} (step {start}, {spent / 60:.1f} min of the budget spent)")
    t0, metrics = time.time() - spent, {}  # the time budget counts the minutes before a resume too

    def over_budget() -> bool:
        return cfg.time_budget_minutes is not None and time.time() - t0 > 60 * cfg.time_budget_minutes

    end = start if over_budget() else cfg.steps
    bar = tqdm(range(start, end), desc="flow pretraining", initial=start, total=cfg.steps, mininterval=5)
    for step in bar:
        for module in (model.transformer, *model.text_encoders):
            module.train()
        g = _step_generator(cfg.seed, step, 2)
        images, captions = toy.pretraining_batch(cfg.batch, seed=_batch_seed(cfg.seed, step, 2),
                                                 caption_noise=cfg.caption_noise, size=cfg.image_size,
                                                 ocr_caption_noise=cfg.ocr_caption_noise)
        drop = torch.rand(len(captions), generator=g) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            x0 = model.encode_images(images)
        embeds = model.text_embeddings(captions)
        out = flow.fm_loss(lambda x, s: model.velocity(x, s, embeds), x0, generator=g)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.warmup, cfg.steps)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.step(params)
        done = step + 1
        if step % cfg.log_every == 0 or done == cfg.steps:
            metrics = {"loss": out.loss.item(), "grad_norm": grad_norm.item(), "lr": opt.param_groups[0]["lr"],
                       "elapsed_s": time.time() - t0, **flow.loss_per_noise_bin(out.sigma, out.per_sample)}
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        stop = over_budget()
        last = done == cfg.steps or stop
        if run is not None and (step % cfg.log_every == 0 or last):
            run.log(metrics, step=done)
        if done % cfg.checkpoint_every == 0 or last:
            checkpoint.save(ckpt_dir, done, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                             "ema": ema.state_dict(), "elapsed_s": time.time() - t0})
        if eval_fn is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or last):
            evaluation = _evaluate_with_ema(model, params, ema, eval_fn)
            metrics.update(evaluation)
            if run is not None:
                run.log(evaluation, step=done)
        if stop:
            print(f"time budget of {cfg.time_budget_minutes} min reached at step {done}")
            break
    ema.copy_to(params)  # the EMA weights are the model
    model.eval().requires_grad_(False)
    model.clear_prompt_cache()
    return metrics


def _evaluate_with_ema(model, params, ema, eval_fn) -> dict:
    ema.store(params)
    ema.copy_to(params)
    model.eval()
    model.clear_prompt_cache()  # the text encoder is training: cached embeddings are stale
    try:
        with torch.no_grad():
            return {f"eval/{k}": v for k, v in eval_fn(model).items()}
    finally:
        model.clear_prompt_cache()
        ema.restore(params)


def _initial_model(cfg: PretrainConfig) -> ToyFlowModel:
    if cfg.init_from is None:
        return ToyFlowModel(cfg.size, image_size=cfg.image_size, glyph_places=cfg.glyph_places)
    from .models import load_base

    model = load_base(cfg.init_from)
    if (model.size_name, model.image_size) != (cfg.size, cfg.image_size):
        raise ValueError(f"init_from={cfg.init_from!r} is a {model.size_name!r} model at {model.image_size} px, but the "
                         f"config asks for size={cfg.size!r}, image_size={cfg.image_size}: set them to match")
    if cfg.glyph_places:
        model.add_glyph_places()
    elif model.glyph_places is not None:
        raise ValueError(f"init_from={cfg.init_from!r} has glyph places but glyph_places=False: set glyph_places=True")
    return model


def load_autoencoder(model: ToyFlowModel, path: Path) -> None:
    """The autoencoder and latent statistics `pretrain` saved, weights only (a file asking to run code
    is refused, as checkpoint.py does); a damaged or foreign file is a CheckpointError naming it."""
    try:
        state = checkpoint.load(path, restore_rng=False, map_location="cpu")  # torch.load(weights_only=True)
        model.autoencoder.load_state_dict(state["autoencoder"])
        model.latent_mean.copy_(state["latent_mean"]); model.latent_std.copy_(state["latent_std"])  # noqa: E702
    except checkpoint.UnsafeCheckpointError:
        raise  # names the file and the code it asked for
    except Exception as error:  # torch.load raises UnpicklingError, RuntimeError, EOFError, ...; a foreign dict KeyError
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise checkpoint.CheckpointError(
            f"{path} is not a readable autoencoder checkpoint ({type(error).__name__}: {first_line}); it was not "
            f"loaded. Delete it to train the autoencoder again, or resume=False to start the run afresh") from None


def pretrain(cfg: PretrainConfig, eval_fn: Callable[[ToyFlowModel], dict] | None = None,
             resume: bool = True) -> ToyFlowModel:
    """Both phases into `cfg.out_dir`; the final (EMA) model is saved to `out_dir/model`."""
    seed_everything(cfg.seed)
    model = _initial_model(cfg)
    out = Path(cfg.out_dir)
    ae_path = out / "autoencoder.pt"
    resumed_ae = cfg.init_from is None and resume and ae_path.exists()
    if resumed_ae:  # before the run opens: a damaged file changes nothing
        load_autoencoder(model, ae_path)
    with Run(out, cfg, resume=resume) as run:
        if cfg.init_from is None and not resumed_ae:  # else: init_from's autoencoder, or the one loaded above
            train_autoencoder(model, cfg, run)
            torch.save({"autoencoder": model.autoencoder.state_dict(), "latent_mean": model.latent_mean,
                        "latent_std": model.latent_std}, ae_path)
        metrics = train_flow(model, cfg, run, eval_fn, resume=resume)
    model.save(out / "model", extra={"pretrain": cfg.to_dict(), "final_metrics": metrics})
    return model
