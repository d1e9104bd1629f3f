"""Prompts and written solutions of the default world: what the tiny base model is pretrained on.

A problem gives three numbers in order and a target. A route is a grouping (combine the first
pair or the last pair first) and two operations. A plan fixes the grouping and the *outer*
operation; its step is a self-contained piece of work that checks itself: it tries the four inner
operations in a fixed order, computes the route, compares the value with the target (low, high)
and stops at the first that reaches it:

    need 23 : 5 + 4 = 9 , 9 + 3 = 12 low ; 5 - 4 = 1 , 1 + 3 = 4 low ; 5 * 4 = 20 , 20 + 3 = 23 yes *+
    need 50 : 5 + 4 = 9 , 9 * 3 = 27 low ; 5 - 4 = 1 , 1 * 3 = 3 low ; 5 * 4 = 20 , 20 * 3 = 60 high ; 5 / 4 no . no

A step that works ends with "yes" and its code: the two operations as they stand in the answer
("*+" for `( 5 * 4 ) + 3`), one token, so that whoever reads the step later copies one token
from behind the one "yes", never a whole expression. The answer is then rebuilt from the code
and the prompt's numbers.

- A sequential solution (step-by-step prompt) tries the eight plans one after another, in a
  random order, until one works, then boxes the expression.
- A parallel solution (NPR instruction) runs a block of four plans, one per outer operation on
  the first pair (`<plan> 3 : * first </plan>`), each in its own step, blind to the others; the
  takeaway names the code of the first step that worked. When none did, a second block tries
  the four outer operations with the last pair grouped.

Nothing is looked up: the search is written out, and the answer is whatever it finds. Like a
real instruct model following a format prompt, the base model sees the parallel format
imperfectly: many NPR-prompted examples carry one typical mistake (no takeaway, a step too few
or too many, missing labels, the sequential form).
"""

from __future__ import annotations

import random

from npr.world.countdown import GROUPINGS, OPS, inner_pair, outer_pair, route_expression, whole_step

NPR_INSTRUCTION = (
    "solve in parallel : write a guideline of plans , one step per plan , compare them in a takeaway , "
    "then box the answer ."
)
SEQ_INSTRUCTION = "solve step by step , then box the answer ."
CODES = [x + y for x in OPS for y in OPS]  # a working route's two operations, as one token


def user_prompt(problem: dict, parallel: bool) -> str:
    return f"{NPR_INSTRUCTION if parallel else SEQ_INSTRUCTION} {problem['problem']}"


def code_of(grouping: str, inner: str, outer: str) -> str:
    """The operations in the order they stand in the answer: `( a inner b ) outer c` or `a outer ( b inner c )`."""
    return inner + outer if grouping == "first" else outer + inner


def decode(code: str, grouping: str) -> tuple[str, str]:
    """(inner, outer) of a code."""
    return (code[0], code[1]) if grouping == "first" else (code[1], code[0])


def work(numbers: list[int], grouping: str, outer: str, target: int) -> tuple[str, str | None]:
    """A route family's step text (the outer operation fixed, the four inner ones tried in order)
    and, when one reaches the target, its code."""
    x, y = inner_pair(numbers, grouping)
    tried = []
    for inner in OPS:
        v = whole_step(x, inner, y)
        if v is None:
            tried.append(f"{x} {inner} {y} no")
            continue
        p, q = outer_pair(numbers, grouping, v)
        w = whole_step(p, outer, q)
        if w is None:
            tried.append(f"{x} {inner} {y} = {v} , {p} {outer} {q} no")
            continue
        if w == target:
            code = code_of(grouping, inner, outer)
            tried.append(f"{x} {inner} {y} = {v} , {p} {outer} {q} = {w} yes {code}")
            return f"need {target} : {' ; '.join(tried)}", code
        tried.append(f"{x} {inner} {y} = {v} , {p} {outer} {q} = {w} {'low' if w < target else 'high'}")
    return f"need {target} : {' ; '.join(tried)} . no", None


def answer(problem: dict, grouping: str, code: str) -> str:
    return route_expression(problem["numbers"], grouping, *decode(code, grouping))


def sequential_solution(problem: dict, rng: random.Random) -> str | None:
    """Routes in random order until one works; None if none does (never, for a generated problem)."""
    routes = [(g, op) for g in GROUPINGS for op in OPS]
    rng.shuffle(routes)
    parts = []
    for grouping, outer in routes:
        text, code = work(problem["numbers"], grouping, outer, problem["target"])
        parts.append(f"try {outer} {grouping} : {text} .")
        if code:
            return " ".join(parts) + f" \\boxed{{ {answer(problem, grouping, code)} }}"
    return None


def _labelled(tag: str, i: int | None, body: str) -> str:
    label = f"{i} : " if i is not None else ""
    return f"<{tag}> {label}{body} </{tag}>"


def parallel_blocks(problem: dict) -> list[tuple[list, list, str, str | None]] | None:
    """Blocks of (plans, steps, takeaway, answer): the first pair, then the last pair if needed."""
    target, blocks = problem["target"], []
    for grouping in GROUPINGS:
        done = [work(problem["numbers"], grouping, op, target) for op in OPS]
        plans = [f"{op} {grouping}" for op in OPS]
        steps = [text for text, _ in done]
        code = next((code for _, code in done if code), None)
        if code:
            blocks.append((plans, steps, f"{code} reaches {target}", answer(problem, grouping, code)))
            return blocks
        blocks.append((plans, steps, f"none reaches {target}", None))
    return None


def parallel_solution(problem: dict, rng: random.Random, mistake: str | None = None) -> str | None:
    """An NPR-format solution, optionally with one typical format mistake (in its last block)."""
    if mistake == "sequential":
        return sequential_solution(problem, rng)
    blocks = parallel_blocks(problem)
    if blocks is None:
        return None
    text = []
    for bi, (plans, steps, takeaway, _) in enumerate(blocks):
        bad = mistake if bi == len(blocks) - 1 else None
        step_list = [_labelled("step", None if bad == "no_labels" else i + 1, s) for i, s in enumerate(steps)]
        if bad == "missing_step" and len(step_list) > 1:
            step_list.pop(rng.randrange(len(step_list)))
        if bad == "extra_step":
            step_list.append(_labelled("step", len(step_list) + 1, steps[rng.randrange(len(steps))]))
        guide = " ".join(_labelled("plan", i + 1, p) for i, p in enumerate(plans))
        close = "" if bad == "unclosed" else " </guideline>"
        text.append(f"<guideline> {guide}{close} " + " ".join(step_list))
        if bad != "no_takeaway":
            text.append(f"<takeaway> {takeaway} </takeaway>")
    text.append(f"\\boxed{{ {blocks[-1][3]} }}")
    return " ".join(text)


MISTAKES = ("sequential", "no_takeaway", "missing_step", "extra_step", "no_labels", "unclosed")


def example(
    problem: dict, rng: random.Random, clean_rate: float = 0.3, npr_share: float = 0.6
) -> tuple[str, str, bool] | None:
    """One pretraining example (user prompt, response, clean parallel answer), NPR-prompted with
    probability `npr_share`."""
    if rng.random() >= npr_share:
        response = sequential_solution(problem, rng)
        return None if response is None else (user_prompt(problem, False), response, False)
    mistake = None if rng.random() < clean_rate else rng.choice(MISTAKES)
    response = parallel_solution(problem, rng, mistake)
    return None if response is None else (user_prompt(problem, True), response, mistake is None)
