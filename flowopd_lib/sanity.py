"""Flow-matching sanity run: fit a velocity field to a 2-D mixture, sample it with the ODE and
the Flow-GRPO SDE, and write a run directory (config, provenance, metrics.csv with the loss per
noise bin, a figure). The quickest end-to-end check of the core: `python -m flowopd_lib.sanity`.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from tqdm.auto import trange

from . import flow
from .config import Config, param
from .tracking import Run, seed_everything


@dataclasses.dataclass
class SanityConfig(Config):
    steps: int = param(5000, "training steps", range=(1, None))
    batch: int = param(512, "batch size", range=(1, None))
    lr: float = param(2e-3, "Adam learning rate", range=(0, 1))
    hidden: int = param(256, "MLP width", range=(8, 4096))
    sample_steps: int = param(40, "sampling steps", range=(1, 1000))
    noise_level: float = param(flow.NOISE_LEVEL, "SDE noise level a", range=(0, 2))
    seed: int = param(0, "the run's seed")
    out_dir: str = param("runs/sanity", "run directory")


def mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    """Eight Gaussians on a circle of radius 2 (std 0.15): multi-modal, so a wrong sampler shows."""
    angles = torch.randint(0, 8, (n,), generator=generator) * (torch.pi / 4)
    centres = 2 * torch.stack([angles.cos(), angles.sin()], 1)
    return centres + 0.15 * torch.randn(n, 2, generator=generator)


class VelocityMLP(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.SiLU(), torch.nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, sigma[:, None]], 1))


def nearest_mode_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean distance of samples to the nearest mixture centre (0.19 for exact samples)."""
    angles = torch.arange(8) * (torch.pi / 4)
    centres = 2 * torch.stack([angles.cos(), angles.sin()], 1)
    return torch.cdist(x, centres).min(1).values.mean()


def main(cfg: SanityConfig) -> dict[str, float]:
    g = seed_everything(cfg.seed)
    model = VelocityMLP(cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    with Run(cfg.out_dir, cfg, use_wandb=True) as run:
        t0 = time.time()
        for step in trange(1, cfg.steps + 1, desc="fm training", mininterval=2):
            out = flow.fm_loss(model, mixture(cfg.batch, g), generator=g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            if step % 100 == 0 or step == cfg.steps:
                run.log({"loss": out.loss.item(), **flow.loss_per_noise_bin(out.sigma, out.per_sample)}, step)
        sigmas = flow.sigma_schedule(cfg.sample_steps)
        noise = torch.randn(4000, 2, generator=g)
        samples = {"ode": flow.sample(model, noise, sigmas),
                   "sde": flow.sample(model, noise, sigmas, cfg.noise_level, generator=g)}
        result = {f"mode_distance/{k}": nearest_mode_distance(v).item() for k, v in samples.items()}
        result["mode_distance/data"] = nearest_mode_distance(mixture(4000, g)).item()
        result["train_seconds"] = time.time() - t0
        run.log(result, cfg.steps)
        _plot(samples, mixture(4000, g), run.dir / "samples.png")
        print(f"run directory: {run.dir}\n" + "\n".join(f"  {k}: {v:.3f}" for k, v in result.items()))
    return result


def _plot(samples: dict[str, torch.Tensor], data: torch.Tensor, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9, 3), sharex=True, sharey=True)
    for ax, (name, x) in zip(axes, {"data": data, **samples}.items()):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        ax.set_title(name)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML file with SanityConfig fields")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--out-dir")
    args = parser.parse_args()
    cfg = SanityConfig.from_yaml(args.config) if args.config else SanityConfig()
    overrides = {k: v for k, v in {"steps": args.steps, "out_dir": args.out_dir}.items() if v is not None}
    main(cfg.replace(**overrides) if overrides else cfg)
