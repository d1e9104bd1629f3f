"""Prompts and written solutions of the default world: what the tiny base model is pretrained on.

Every Countdown problem here has three numbers, so every solution is a *first move* (two
numbers combined) followed by one move with the third number. Solving is a search over first
moves, and each first move is a self-contained piece of work that checks itself:

    3 + 5 = 8 , need 22 : 8 + 4 = 12 , 8 - 4 = 4 , 8 * 4 = 32 , 8 / 4 = 2 . no
    5 * 4 = 20 , need 22 : 20 + 3 = 23 , 20 - 3 = 17 , 3 - 20 ... . yes : ( 5 * 4 ) + 3  (when it works)

(the continuations in a fixed order, stopping at the first that reaches the target: "yes" and
the expression, written where its numbers are).
Nothing is looked up: the search is written out honestly, and the answer is whatever it finds.

- A sequential solution (step-by-step prompt) tries first moves one after another until one
  works, then boxes the expression.
- A parallel solution (NPR instruction) puts k different first moves in a guideline, runs each in
  its own step (blind to the others), names the step that worked and its expression in the
  takeaway, and opens a new block with first moves not tried yet when none did.

Like a real instruct model following a format prompt, the base model sees the parallel format
imperfectly: most NPR-prompted examples carry one typical mistake (no takeaway, a step too few
or too many, missing labels, the sequential form).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from npr.world.countdown import whole_step

NPR_INSTRUCTION = (
    "solve in parallel : write a guideline of plans , one step per plan , compare them in a takeaway , "
    "then box the answer ."
)
SEQ_INSTRUCTION = "solve step by step , then box the answer ."


def user_prompt(problem: dict, parallel: bool) -> str:
    return f"{NPR_INSTRUCTION if parallel else SEQ_INSTRUCTION} {problem['problem']}"


@dataclass(frozen=True)
class FirstMove:
    x: int
    op: str
    y: int
    value: int
    rest: int  # the third number


def first_moves(numbers: list[int]) -> list[FirstMove]:
    """The distinct useful first moves: a pair, an operation, larger number first for - and /."""
    out, seen = [], set()
    for i in range(len(numbers)):
        for j in range(i + 1, len(numbers)):
            a, b = max(numbers[i], numbers[j]), min(numbers[i], numbers[j])
            rest = next(n for k, n in enumerate(numbers) if k not in (i, j))
            for op in "+-*/":
                if op in "*/" and b == 1:
                    continue  # x * 1 and x / 1 change nothing: the last move covers them
                value = whole_step(a, op, b)
                if value is None or (op == "-" and value == 0) or (a, op, b) in seen:
                    continue
                seen.add((a, op, b))
                out.append(FirstMove(a, op, b, value, rest))
    return out


def continuations(v: int, z: int) -> list[tuple[str, int, str]]:
    """(text, value, expression shape) of the last moves with value v and the third number z, in
    the fixed order the steps write them: v + z, v - z, z - v, v * z, v / z, z / v."""
    out = []
    for a, op, b, shape in ((v, "+", z, "L"), (v, "-", z, "L"), (z, "-", v, "R"), (v, "*", z, "L"),
                            (v, "/", z, "L"), (z, "/", v, "R")):  # fmt: skip
        if shape == "R" and a <= b:
            continue  # z - v and z / v only when z is the larger (else covered by v - z, v / z)
        r = whole_step(a, op, b)
        if r is not None:
            out.append((f"{a} {op} {b} = {r}", r, f"{op}{shape}"))
    return out


def work(move: FirstMove, target: int) -> tuple[str, str | None]:
    """A first move's step text and, when it reaches the target, the answer expression."""
    head = f"{move.x} {move.op} {move.y} = {move.value} , need {target} :"
    tried = []
    for text, value, shape in continuations(move.value, move.rest):
        tried.append(text)
        if value == target:
            inner = f"( {move.x} {move.op} {move.y} )"
            op = shape[0]
            expr = f"{inner} {op} {move.rest}" if shape[1] == "L" else f"{move.rest} {op} {inner}"
            return f"{head} {' , '.join(tried)} . yes : {expr}", expr
    return f"{head} {' , '.join(tried)} . no", None


def sequential_solution(problem: dict, rng: random.Random) -> str | None:
    """First moves in random order until one works; None if none does (the search is complete, so
    only for a target that needs an intermediate beyond the tokenizer's numbers)."""
    moves = first_moves(problem["numbers"])
    rng.shuffle(moves)
    parts = []
    for m in moves:
        text, expr = work(m, problem["target"])
        parts.append(f"try {text} .")
        if expr:
            return " ".join(parts) + f" \\boxed{{ {expr} }}"
    return None


def _labelled(tag: str, i: int | None, body: str) -> str:
    label = f"{i} : " if i is not None else ""
    return f"<{tag}> {label}{body} </{tag}>"


def plans_per_block(rng: random.Random) -> int:
    return rng.choice([2, 3, 3, 4, 4, 5])


def parallel_blocks(problem: dict, rng: random.Random) -> list[tuple[list, list, str, str | None]] | None:
    """Blocks of (plans, steps, takeaway, answer) until a step reaches the target."""
    target = problem["target"]
    moves = first_moves(problem["numbers"])
    rng.shuffle(moves)
    blocks = []
    while moves:
        k = plans_per_block(rng)
        chosen, moves = moves[:k], moves[k:]
        done = [work(m, target) for m in chosen]
        hits = [i for i, (_, expr) in enumerate(done) if expr]
        plans = [f"{m.x} {m.op} {m.y} first" for m in chosen]
        steps = [text for text, _ in done]
        if hits:
            expr = done[hits[0]][1]
            blocks.append((plans, steps, f"{hits[0] + 1} reaches {target} : {expr}", expr))
            return blocks
        blocks.append((plans, steps, f"none reaches {target}", None))
    return None


def parallel_solution(problem: dict, rng: random.Random, mistake: str | None = None) -> str | None:
    """An NPR-format solution, optionally with one typical format mistake (in its last block)."""
    if mistake == "sequential":
        return sequential_solution(problem, rng)
    blocks = parallel_blocks(problem, rng)
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
) -> tuple[str, str] | None:
    """One pretraining pair (user prompt, response), NPR-prompted with probability `npr_share`."""
    if rng.random() >= npr_share:
        response = sequential_solution(problem, rng)
        return None if response is None else (user_prompt(problem, False), response)
    mistake = None if rng.random() < clean_rate else rng.choice(MISTAKES)
    response = parallel_solution(problem, rng, mistake)
    return None if response is None else (user_prompt(problem, True), response)
