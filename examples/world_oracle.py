"""What breadth is worth on the default world: the share of held-out problems a *perfect* model
solves within a latency budget (tokens on the critical path), written sequentially (the
step-by-step corpus answer: plans one after another in a random order) or in parallel (the NPR
corpus answer: a block's steps concurrent, so a block costs its guideline, its longest step and
its takeaway). No model is run: the answers are the corpus's own, measured in the world's tokens.

    python examples/world_oracle.py [--problems 200] [--orders 8]
"""

from __future__ import annotations

import argparse
import random
import statistics

from npr.world import corpus, countdown
from npr.world.tokenizer import build_tokenizer

BUDGETS = (96, 112, 128, 144, 160, 176, 192)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=200, help="held-out test problems")
    ap.add_argument("--orders", type=int, default=8, help="random plan orders per problem (sequential)")
    args = ap.parse_args()
    tok = build_tokenizer()

    def n(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    parallel, sequential = [], []
    for i, p in enumerate(countdown.split("test", args.problems)):
        blocks = corpus.parallel_blocks(p)
        path = 1 + n(f"\\boxed{{ {blocks[-1][3]} }}")  # the answer and end-of-turn
        for plans, steps, takeaway, _ in blocks:
            guide = " ".join(f"<plan> {k + 1} : {x} </plan>" for k, x in enumerate(plans))
            path += n(f"<guideline> {guide} </guideline>") + n(f"<takeaway> {takeaway} </takeaway>")
            path += max(n(f"<step> {k + 1} : {s} </step>") for k, s in enumerate(steps))
        parallel.append(path)
        rng = random.Random(i)
        sequential += [1 + n(corpus.sequential_solution(p, rng)) for _ in range(args.orders)]
    print(f"{len(parallel)} test problems; critical path of a perfect answer: parallel mean "
          f"{statistics.mean(parallel):.1f} (max {max(parallel)}), sequential mean "
          f"{statistics.mean(sequential):.1f} (max {max(sequential)})\n")  # fmt: skip
    print("| latency budget | solved in parallel | solved in sequence |")
    print("|---|---|---|")
    for b in BUDGETS:
        par = sum(x <= b for x in parallel) / len(parallel)
        seq = sum(x <= b for x in sequential) / len(sequential)
        print(f"| {b} | {par:.0%} | {seq:.0%} |")


if __name__ == "__main__":
    main()
