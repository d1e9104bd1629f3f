"""Rewards: plain functions of (prompt, response, reference, metadata) -> float.

A training config names one, either registered here ("stage1", "accuracy") or as
`module:function` of the user's own. `metadata` is the problem record (it carries the
grader and, for Countdown, the numbers and target).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from npr import grammar
from npr.tasks import grade

Reward = Callable[[str, str, str, dict], float]


def _correct(response: str, reference: str, metadata: dict) -> bool:
    return grade(dict(metadata, answer=metadata.get("answer", reference)), response)


def stage1(prompt: str, response: str, reference: str, metadata: dict) -> float:
    """Stage 1 (default): format term + accuracy term, both always counted.

    format: 0 well-formed, a penalty in (-2, 0) otherwise; accuracy: +1 correct, -1 wrong. At equal
    correctness a well-formed answer always scores higher, and at equal format a correct one
    does, so the reward cannot be raised by giving up accuracy for format or format for accuracy.
    """
    score = grammar.parse(response).format_score
    return score + (1.0 if _correct(response, reference, metadata) else -1.0)


def stage1_gated(prompt: str, response: str, reference: str, metadata: dict) -> float:
    """Stage 1, the paper's literal reading: the format penalty *replaces* the accuracy term when the
    format check fails ("accuracy ... conditional on passing format checks"). A well-formed wrong
    answer (-1) then scores at least as much as any malformed one, and the mildest penalties
    (> -1) beat it: the ablation switch `algo.reward=stage1_gated`."""
    score = grammar.parse(response).format_score
    if score < 0:
        return score
    return 1.0 if _correct(response, reference, metadata) else -1.0


def accuracy(prompt: str, response: str, reference: str, metadata: dict) -> float:
    """Paper, Stage 3: +1 correct, -1 wrong (schema filtering happens before)."""
    return 1.0 if _correct(response, reference, metadata) else -1.0


REWARDS: dict[str, Reward] = {"stage1": stage1, "stage1_gated": stage1_gated, "accuracy": accuracy}


def get_reward(name: str) -> Reward:
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: use one of {', '.join(REWARDS)} or module:function")
    module, fn = name.split(":", 1)
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load reward {name!r}: {e}") from None
