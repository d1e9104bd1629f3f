"""Tasks: what a problem record is asked and how its answer is graded, behind one interface.

A task is three plain functions: `load` (records of a named problem set), `prompt` (the user
message for a record, NPR instruction included; `parallel=False` asks for a plain step-by-step
answer) and `grade` (is a response right). A record's "grader" field names its task. The math
benchmarks, multiple choice (GPQA) and the default world (Countdown, `npr/world/task.py`) are
the built-in ones; everything downstream (data, prompts, rewards, evaluation) goes through here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

from npr.grading import choice_correct, extract_answer, math_equal
from npr.prompts import CHOICE_SUFFIX, NPR_INSTRUCTION, STEP_INSTRUCTION, chat_ids
from npr.world import task as world


@dataclass(frozen=True)
class Task:
    name: str
    prompt: Callable[..., str]  # (record, parallel=True) -> user message
    grade: Callable[[dict, str], bool]  # (record, response) -> correct
    load: Callable[[list[str], int | None], list[dict]] | None = None  # (arguments after "NAME:", limit)


def _math_prompt(problem: dict, parallel: bool = True) -> str:
    return f"{NPR_INSTRUCTION if parallel else STEP_INSTRUCTION}\n\n{problem['problem']}"


def _choice_prompt(problem: dict, parallel: bool = True) -> str:
    return f"{_math_prompt(problem, parallel)}\n\n{CHOICE_SUFFIX}"


def _math_grade(problem: dict, response: str) -> bool:
    return math_equal(extract_answer(response), str(problem.get("answer", "")))


def _choice_grade(problem: dict, response: str) -> bool:
    return choice_correct(response, problem["answer"], list(problem.get("options") or ()))


TASKS = {
    "math": Task("math", _math_prompt, _math_grade),
    "choice": Task("choice", _choice_prompt, _choice_grade),
    "countdown": Task("countdown", world.prompt, world.grade, world.load),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task (grader) {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def user_message(problem: dict, parallel: bool = True) -> str:
    """The user turn for a problem record. A record carrying an "instruction" (from a prompt file:
    `with_instruction`) is asked with it instead of the task's own NPR instruction."""
    template = problem.get("instruction")
    if not (parallel and template):
        return get_task(problem.get("grader", "math")).prompt(problem, parallel)
    if "{problem}" in template:
        return template.replace("{problem}", problem["problem"])
    return f"{template}\n\n{problem['problem']}"


def read_prompt_file(path) -> str | None:
    """The instruction in a prompt file: UTF-8 text, "{problem}" where the problem goes (else after
    it); None without a path."""
    from pathlib import Path

    if not path:
        return None
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: prompt file is not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"{path}: prompt file is empty")
    return text


def with_instruction(problems: list[dict], instruction: str | None) -> list[dict]:
    """The records asked with a prompt file's instruction (`read_prompt_file`); unchanged without one."""
    return [dict(p, instruction=instruction) for p in problems] if instruction else problems


def prompt_ids(tokenizer, problem: dict, parallel: bool = True) -> list[int]:
    """Token ids of the prompt for a problem record (chat template applied)."""
    return chat_ids(tokenizer, user_message(problem, parallel))


def grade(problem: dict, response: str) -> bool:
    """Grade a response against a problem record (its "grader" field picks the task).

    Memoised, so a trainer that grades a rollout for its reward and again for its accuracy
    metric pays once.
    """
    task = get_task(problem.get("grader", "math"))
    return _grade(task.name, json.dumps(problem, sort_keys=True, default=str), response)


@functools.lru_cache(maxsize=8192)
def _grade(name: str, problem_json: str, response: str) -> bool:
    return bool(TASKS[name].grade(json.loads(problem_json), response))
