"""Token choice: penalties, masks, temperature, top-k, top-p and counter-seeded Gumbel noise.

Noise for a token is drawn from a generator seeded by (request seed, branch, index), so a
request decodes the same tokens whatever it is batched with, and after a preemption.
"""

from __future__ import annotations

import torch

_MASK = float("-inf")


def noise_seed(seed: int, branch: tuple[int, int], index: int) -> int:
    block, step = branch
    return (seed * 1_000_003 + (block + 1) * 65_537 + (step + 1) * 8_191 + index * 131) % (2**63 - 1)


def penalize(logits: torch.Tensor, tokens: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style repetition penalty on the given tokens (positive logits divided, negative multiplied)."""
    if penalty == 1.0 or not tokens:
        return logits
    idx = torch.tensor(sorted(set(tokens)), device=logits.device)
    vals = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def choose(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    disallowed: torch.Tensor | None = None,
) -> int:
    """Pick one token from 1-D float logits."""
    if disallowed is not None:
        logits = logits.masked_fill(disallowed, _MASK)
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, _MASK)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.clone()
        logits[order[drop]] = _MASK
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    u = torch.rand(logits.shape, generator=gen, device=logits.device).clamp_(1e-20, 1.0)
    return int(torch.argmax(logits - torch.log(-torch.log(u))))
