"""Countdown in order: reach a target from three numbers, used once each in the given order, with
two of + - * / and one pair of brackets: `( a ? b ) ? c` or `a ? ( b ? c )`.

The default world's task family. Problems are generated from a random route (a grouping and
two operations, every intermediate value a whole number in [0, 100]), so each has a solution;
difficulty is the range of the numbers. Answers are checked exactly: the expression is parsed
by a small recursive-descent parser over fractions (never `eval`), with limits on length,
nesting and magnitude so no input can hang or blow up the checker.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from fractions import Fraction

OPS = "+-*/"
MAX_CHARS = 256
MAX_DEPTH = 16
MAX_ABS = 10**9
MAX_VALUE = 100  # generated problems and written solutions keep every intermediate value in [0, 100]


@dataclass(frozen=True)
class Level:
    numbers: int  # how many numbers
    low: int
    high: int  # numbers drawn from [low, high]
    max_target: int


LEVELS = {  # three numbers in a fixed order: a solution combines one pair first, then the third number
    1: Level(3, 1, 6, 40),
    2: Level(3, 1, 10, 60),
    3: Level(3, 2, 12, 80),
    4: Level(3, 2, 15, 100),
}


class ExpressionError(ValueError):
    pass


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction:
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    elif op == "*":
        r = a * b
    else:
        if b == 0:
            raise ExpressionError("division by zero")
        r = a / b
    if abs(r) > MAX_ABS or r.denominator > MAX_ABS:
        raise ExpressionError("value too large")
    return r


_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """Value of an arithmetic expression and the integers it uses, or ExpressionError."""
    if len(expr) > MAX_CHARS:
        raise ExpressionError(f"expression longer than {MAX_CHARS} characters")
    tokens, pos, text = [], 0, expr.replace("×", "*").replace("÷", "/")
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise ExpressionError(f"unexpected character {text[pos:].strip()[:1]!r} at {pos}")
        if m.group(1) is not None:
            if len(m.group(1)) > 9:
                raise ExpressionError("number too large")
            tokens.append(int(m.group(1)))
        else:
            tokens.append(m.group(2))
        pos = m.end()
    used: list[int] = []
    at = 0

    def peek():
        return tokens[at] if at < len(tokens) else None

    def binary(sub, ops):  # one precedence level: sub (op sub)*
        def parse(depth):
            nonlocal at
            value = sub(depth)
            while peek() in ops:
                op = tokens[at]
                at += 1
                value = _apply(value, op, sub(depth))
            return value

        return parse

    def factor(depth):
        nonlocal at
        if depth > MAX_DEPTH:
            raise ExpressionError(f"nesting deeper than {MAX_DEPTH}")
        t = peek()
        if t == "(":
            at += 1
            value = expr_(depth + 1)
            if peek() != ")":
                raise ExpressionError("missing )")
            at += 1
            return value
        if isinstance(t, int):
            at += 1
            used.append(t)
            return Fraction(t)
        raise ExpressionError("expected a number or (" if t is None else f"unexpected {t!r}")

    term = binary(factor, ("*", "/"))
    expr_ = binary(term, ("+", "-"))
    if not tokens:
        raise ExpressionError("empty expression")
    value = expr_(0)
    if at != len(tokens):
        raise ExpressionError(f"unexpected {tokens[at]!r}")
    return value, used


def check(expr: str | None, numbers: list[int], target: int) -> bool:
    """True when `expr` uses the numbers exactly once each, in the given order, and equals `target`."""
    if not expr:
        return False
    try:
        value, used = evaluate(expr)
    except ExpressionError:
        return False
    return value == target and used == list(numbers)


# ---- generation ------------------------------------------------------------------------------


def whole_step(a: int, op: str, b: int) -> int | None:
    """a op b when it is a whole number in [0, MAX_VALUE] (the moves generated problems and written
    solutions are made of); None otherwise."""
    if op == "/":
        return a // b if b and a % b == 0 and a // b <= MAX_VALUE else None
    r = a + b if op == "+" else a - b if op == "-" else a * b
    return r if 0 <= r <= MAX_VALUE else None


GROUPINGS = ("first", "last")  # which pair of the ordered numbers is combined first: (a b) c or a (b c)


def inner_pair(numbers: list[int], grouping: str) -> tuple[int, int]:
    """The pair a route combines first."""
    a, b, c = numbers
    return (a, b) if grouping == "first" else (b, c)


def outer_pair(numbers: list[int], grouping: str, v: int) -> tuple[int, int]:
    """The operands of a route's last move, given the value `v` of its inner pair."""
    a, _, c = numbers
    return (v, c) if grouping == "first" else (a, v)


def route_value(numbers: list[int], grouping: str, inner: str, outer: str) -> int | None:
    """Value of `( a inner b ) outer c` (grouping "first") or `a outer ( b inner c )` ("last"), or
    None when a move leaves the whole numbers in [0, MAX_VALUE]."""
    x, y = inner_pair(numbers, grouping)
    v = whole_step(x, inner, y)
    if v is None:
        return None
    p, q = outer_pair(numbers, grouping, v)
    return whole_step(p, outer, q)


def route_expression(numbers: list[int], grouping: str, inner: str, outer: str) -> str:
    a, b, c = numbers
    return f"( {a} {inner} {b} ) {outer} {c}" if grouping == "first" else f"{a} {outer} ( {b} {inner} {c} )"


def make_problem(level: int, rng: random.Random) -> dict:
    """Three numbers in a fixed order and a target that one route (a grouping and two operations)
    reaches with whole intermediate values."""
    lv = LEVELS[level]
    while True:
        numbers = [rng.randint(lv.low, lv.high) for _ in range(lv.numbers)]
        grouping, inner, outer = rng.choice(GROUPINGS), rng.choice(OPS), rng.choice(OPS)
        target = route_value(numbers, grouping, inner, outer)
        if target is not None and 1 <= target <= lv.max_target:
            break
    nums = " ".join(map(str, numbers))
    return {
        "problem": f"use {nums} in order to make {target}",
        "answer": route_expression(numbers, grouping, inner, outer),
        "numbers": numbers,
        "target": target,
        "level": level,
        "task": "countdown",
    }


SPLITS = {"train": range(2, 10), "validation": range(1, 2), "test": range(0, 1)}


def bucket(problem: str) -> int:
    """Which tenth of the problem space a problem falls in: 0 test, 1 validation, 2-9 train."""
    return int(hashlib.sha256(problem.encode()).hexdigest(), 16) % 10


def split(name: str, n: int, levels=(1, 2, 3), seed: int = 0) -> list[dict]:
    """A fixed split: the same seed gives the same problems. Splits are disjoint by construction
    (a problem's split is a hash of its text); validation and test hold no duplicates, train may
    repeat a problem (it samples the task distribution)."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")
    rng = random.Random(f"countdown-{seed}-{name}")
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        p = make_problem(levels[len(out) % len(levels)], rng)
        if bucket(p["problem"]) not in SPLITS[name] or (name != "train" and p["problem"] in seen):
            continue
        seen.add(p["problem"])
        p["id"] = f"{name}-{len(out)}"
        out.append(p)
    else:
        raise ValueError(f"levels {levels} have too few distinct problems for {n} {name} problems")
    return out
