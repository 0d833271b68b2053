"""The pure loss pieces several trainers share: group-normalised advantages and PPO's clipped surrogate.

They live apart from any stage so that a trainer can use them without importing another stage:
Flow-GRPO (`grpo.py`, stage 0) and AWM (`awm.py`) take both, Flow-OPD (`opd.py`, stage 2) takes
the clipped surrogate for its policy-gradient objectives, the trajectory explorer the advantages
it shows. Each is a function of tensors only, tested on hand-made cases (tests/test_grpo.py).
"""
from __future__ import annotations

import torch


def group_advantages(rewards_: torch.Tensor, group_size: int, std_mode: str = "global", clip: float = 5.0,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages [B] and a keep mask [B] for rewards [B] ordered in groups of `group_size`.

    A = (r - mean of its group) / std, std over the whole batch ('global', Flow-GRPO) or per group
    ('group'), clipped to +-clip. Groups whose rewards are all equal have no signal: keep = False."""
    if rewards_.ndim != 1 or rewards_.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards_.shape)} do not split into groups of {group_size}")
    r = rewards_.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if std_mode == "global":
        std = rewards_.float().std(unbiased=False).expand_as(r) if rewards_.numel() > 1 else torch.ones_like(r)
    elif std_mode == "group":
        std = r.std(dim=1, unbiased=False, keepdim=True).expand_as(r)
    else:
        raise ValueError(f"std_mode={std_mode!r}: use 'global' (Flow-GRPO) or 'group'")
    spread = (r.max(dim=1).values - r.min(dim=1).values) > 0
    adv = (centred / (std + eps)).clamp(-clip, clip)
    keep = spread[:, None].expand_as(r)
    return (adv * keep).flatten(), keep.flatten()


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per sample [B] (to minimise), the clipped indicator [B] and the
    approximate KL [B] = 0.5 (log ratio)^2, all from [B] inputs."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ((ratio - 1).abs() > clip_range).float(), 0.5 * log_ratio.detach() ** 2


__all__ = ["group_advantages", "ppo_clip_loss"]
