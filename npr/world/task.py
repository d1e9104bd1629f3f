"""The default world as a task: load Countdown problems, prompt for them, grade answers.

`npr.tasks` registers these three functions as the task "countdown"; nothing outside this
folder needs to know how the world works.
"""

from __future__ import annotations

from npr.grading import extract_answer
from npr.world import corpus, countdown


def load(args: list[str], limit: int | None) -> list[dict]:
    """`countdown[:SPLIT[:LEVELS]]`, e.g. `countdown:train:1,2` (default: the test split, levels 1-3)."""
    split = args[0] if args else "test"
    try:
        levels = tuple(int(x) for x in args[1].split(",")) if len(args) > 1 else (1, 2, 3)
    except ValueError:
        raise ValueError("levels must be numbers, e.g. countdown:train:1,2") from None
    if not set(levels) <= set(countdown.LEVELS):
        raise ValueError(f"levels must be among {sorted(countdown.LEVELS)}")
    return [dict(p, grader="countdown") for p in countdown.split(split, limit or 200, levels)]


def prompt(problem: dict, parallel: bool = True) -> str:
    return corpus.user_prompt(problem, parallel)


def grade(problem: dict, response: str) -> bool:
    return countdown.check(extract_answer(response), list(problem["numbers"]), problem["target"])
