"""Advantages and policy losses of the RL loop (docs/design.md §5): plain tensor functions."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); 0 for a group whose rewards are all equal."""
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    for g in groups.unique():
        m = groups == g
        r = rewards[m].float()
        std = r.std(unbiased=False) if r.numel() > 1 else torch.tensor(0.0)
        adv[m] = 0.0 if std < eps else (r - r.mean()) / (std + eps)
    return adv


def batch_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PAPO: (r - mean of its group) / std of all the batch's rewards (the paper's batch-level
    normalisation after Lite PPO; unbiased std, as the authors' code takes it, but from the raw
    rewards throughout: their loop normalises in place, so later rows see a drifting std)."""
    r = rewards.float()
    centred = r.clone()
    for g in groups.unique():
        m = groups == g
        centred[m] -= r[m].mean()
    std = r.std() if r.numel() > 1 else torch.tensor(0.0)
    return centred / (std + eps) if std > eps else torch.zeros_like(centred)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to max_len - buffer, then linear down to -factor at max_len."""
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -factor * (over / max(buffer, 1)).clamp(max=1.0)


def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate with asymmetric clipping, averaged over all response tokens of the batch.

    logp, old_logp, mask: [B, T]; advantages: [B] (one per sequence, broadcast to its tokens).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1)
    loss = (per_token * m).sum() / n
    with torch.no_grad():  # share of tokens whose gradient the clip removed
        clip_frac = ((clipped < unclipped - 1e-9).to(logp.dtype) * m).sum() / n
        ratio_mean = (ratio * m).sum() / n
    return loss, {"clip_fraction": float(clip_frac), "ratio_mean": float(ratio_mean)}


def papo_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Strict on-policy objective pi / sg(pi) * A (its gradient is A * grad log pi), token-mean."""
    ratio = torch.exp(logp - logp.detach())
    m = mask.to(logp.dtype)
    return -(ratio * advantages[:, None].to(logp.dtype) * m).sum() / m.sum().clamp(min=1)
