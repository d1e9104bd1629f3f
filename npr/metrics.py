"""Evaluation metrics, as defined in docs/design.md §6."""

from __future__ import annotations

from collections import defaultdict
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(samples: list[dict], wall_time: float | None = None) -> dict:
    """Aggregate per-sample records of one benchmark and mode.

    Each sample has: problem_id, correct, format_valid, parallel_blocks (blocks the engine ran
    as >= 2 concurrent branches), wellformed_blocks, forked_wellformed_blocks (of those, the
    ones the engine executed as branches), total_tokens, critical_path_tokens, and
    optionally error.
    """
    ok = [s for s in samples if not s.get("error")]
    by_problem: dict[str, list[bool]] = defaultdict(list)
    for s in ok:
        by_problem[s["problem_id"]].append(bool(s["correct"]))
    n = min((len(v) for v in by_problem.values()), default=0)
    out = {
        "problems": len(by_problem),
        "samples": len(ok),
        "errors": len(samples) - len(ok),
        "k": n,
        "avg@k": _mean([s["correct"] for s in ok]),
        "best@k": _mean([any(v) for v in by_problem.values()]),
        "format_valid_rate": _mean([s["format_valid"] for s in ok]),
        "parallel_trigger_rate": _mean([s["parallel_blocks"] > 0 for s in ok]),
        "genuine_parallel_rate": _ratio(
            sum(s["forked_wellformed_blocks"] for s in ok), sum(s["wellformed_blocks"] for s in ok)
        ),
        "mean_total_tokens": _mean([s["total_tokens"] for s in ok]),
        "mean_critical_path_tokens": _mean([s["critical_path_tokens"] for s in ok]),
        "token_parallelism": _ratio(sum(s["total_tokens"] for s in ok), sum(s["critical_path_tokens"] for s in ok)),
    }
    k = 1
    while k <= n:
        out[f"pass@{k}"] = _mean([pass_at_k(len(v), sum(v), k) for v in by_problem.values()])
        k *= 2
    if wall_time:
        out["wall_time_s"] = wall_time
        out["tokens_per_s"] = sum(s["total_tokens"] for s in ok) / wall_time
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(float(x) for x in xs) / len(xs) if xs else 0.0


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0
