"""Prompts and written solutions of the default world: what the tiny base model is pretrained on.

Text is written as space-separated words so the word-level tokenizer round-trips it. A
sequential solution is a list of attempts ("try a op b = c , ... . need t , no .") ending
with the one that reaches the target t. A parallel (NPR-format) solution maps first moves to plans,
runs each chain in its own step, compares them in the takeaway, and repeats the block
if none reached the target. Like a real instruct model following a format prompt, the
base model sees the parallel format imperfectly: most NPR-prompted examples carry one
typical mistake (no takeaway, a step too few or too many, missing labels, no block).
"""

from __future__ import annotations

import random

from npr.world.countdown import Move, chain_expression, chain_value

NPR_INSTRUCTION = (
    "solve in parallel : write a guideline of plans , one step per plan , compare them in a takeaway , "
    "then box the answer ."
)
SEQ_INSTRUCTION = "solve step by step , then box the answer ."


def user_prompt(problem: dict, parallel: bool) -> str:
    return f"{NPR_INSTRUCTION if parallel else SEQ_INSTRUCTION} {problem['problem']}"


def _chain_text(moves: list[Move]) -> str:
    return " , ".join(f"{m.a} {m.op} {m.b} = {m.result}" for m in moves)


def _attempts(problem: dict, rng: random.Random, first: tuple[int, str, int] | None = None, tries: int = 200):
    """Random valid chains over the problem's numbers (optionally with a fixed first move)."""
    nums = problem["numbers"]
    for _ in range(tries):
        order = nums[:]
        rng.shuffle(order)
        ops = [rng.choice("+-*/") for _ in order[1:]]
        if first is not None:
            a, op, b = first
            rest = order[:]
            rest.remove(a)
            rest.remove(b)
            order, ops = [a, b, *rest], [op, *ops[: len(rest)]]
        moves = chain_value(order[0], list(zip(ops, order[1:])))
        if moves:
            yield moves


def _solution_chain(problem: dict, rng: random.Random) -> list[Move]:
    for moves in _attempts(problem, rng, tries=400):
        if moves[-1].result == problem["target"]:
            return moves
    return _parse_chain(problem["answer"])  # the reference answer is always a left chain


def _parse_chain(expr: str) -> list[Move]:
    toks = expr.replace("(", " ").replace(")", " ").split()
    cur, moves = int(toks[0]), []
    for op, b in zip(toks[1::2], toks[2::2]):
        moves += chain_value(cur, [(op, int(b))]) or []
        cur = moves[-1].result
    return moves


def sequential_solution(problem: dict, rng: random.Random) -> str:
    target = problem["target"]
    parts = []
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        moves = next(_attempts(problem, rng), None)
        if moves and moves[-1].result != target:
            parts.append(f"try {_chain_text(moves)} . need {target} , no .")
    good = _solution_chain(problem, rng)
    parts.append(f"try {_chain_text(good)} . need {target} , yes .")
    return " ".join(parts) + f" \\boxed{{ {chain_expression(good)} }}"


def _block(problem: dict, rng: random.Random, k: int, must_succeed: bool) -> tuple[list, list, str, list | None]:
    """k plans (distinct first moves), their chains, and the takeaway."""
    target, nums = problem["target"], problem["numbers"]
    good = _solution_chain(problem, rng) if must_succeed else None
    firsts, chains = [], []
    if good:
        firsts.append((good[0].a, good[0].op, good[0].b))
        chains.append(good)
    for _ in range(40):
        if len(chains) == k:
            break
        i, j = rng.sample(range(len(nums)), 2)
        first = (nums[i], rng.choice("+-*/"), nums[j])
        if first in firsts:
            continue
        moves = next(_attempts(problem, rng, first=first, tries=20), None)
        if moves and (moves[-1].result != target or must_succeed):
            firsts.append(first)
            chains.append(moves)
    order = list(range(len(chains)))
    rng.shuffle(order)
    chains = [chains[i] for i in order]
    plans = [f"{m[0].a} {m[0].op} {m[0].b} first" for m in chains]
    steps = [f"{_chain_text(m)} . need {target} , {'yes' if m[-1].result == target else 'no'}" for m in chains]
    hits = [i + 1 for i, m in enumerate(chains) if m[-1].result == target]
    takeaway = f"{hits[0]} reaches {target}" if hits else f"none reaches {target}"
    return plans, steps, takeaway, (chains[hits[0] - 1] if hits else None)


def _labelled(tag: str, i: int | None, body: str) -> str:
    label = f"{i} : " if i is not None else ""
    return f"<{tag}> {label}{body} </{tag}>"


def parallel_solution(problem: dict, rng: random.Random, mistake: str | None = None) -> str:
    """An NPR-format solution, optionally with one typical format mistake."""
    if mistake == "sequential":
        return sequential_solution(problem, rng)
    blocks = []
    if rng.random() < 0.25:  # a first block where nothing works
        blocks.append(_block(problem, rng, rng.choice([2, 3]), must_succeed=False))
    blocks.append(_block(problem, rng, rng.choice([2, 2, 3]), must_succeed=True))
    text = []
    for bi, (plans, steps, takeaway, _) in enumerate(blocks):
        last = bi == len(blocks) - 1
        bad = mistake if last else None
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
    answer = blocks[-1][3]
    text.append(f"\\boxed{{ {chain_expression(answer)} }}")
    return " ".join(text)


MISTAKES = ("sequential", "no_takeaway", "missing_step", "extra_step", "no_labels", "unclosed")


def example(problem: dict, rng: random.Random, clean_rate: float = 0.3, npr_share: float = 0.6) -> tuple[str, str]:
    """One pretraining pair (user prompt, response), NPR-prompted with probability `npr_share`."""
    if rng.random() >= npr_share:
        return user_prompt(problem, False), sequential_solution(problem, rng)
    mistake = None if rng.random() < clean_rate else rng.choice(MISTAKES)
    return user_prompt(problem, True), parallel_solution(problem, rng, mistake)
