"""The engine's own host work per token: the replayed workload of `npr bench engine`, with the
model's body replaced by a stub that returns zeros, so what is timed is scheduling, metadata,
the output head, log-probs and the schema bookkeeping, without the model's forward (whose
run-to-run noise on a shared CPU is larger than the differences this is for). Best of `--repeats`
runs, 2 torch threads, µs per generated token.

To compare two commits, run it from each checkout in turn, a few times each, and keep the best:

    git worktree add /tmp/old <commit>
    (cd /tmp/old && PYTHONPATH=. python examples/engine_host_cost.py)
    python examples/engine_host_cost.py [--requests 4 16 64 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from npr.bench import random_model, replay_settings, word_tokenizer, workload
from npr.engine import LLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, nargs="+", default=[4, 16, 64, 256], help="requests decoded together")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each, the fastest kept")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = random_model("tiny"), word_tokenizer(512)
    hidden = model.config.hidden_size
    print("| requests | sequential µs / token | parallel µs / token |")
    print("|---|---|---|")
    for n in args.requests:
        work = workload(tok, n, plans=4, step_tokens=32, blocks=1, prompt_tokens=32)
        llm = LLM(model, tok, max_num_seqs=max(256, 4 * n))
        llm.runner.body = lambda input_ids, **_: SimpleNamespace(
            last_hidden_state=torch.zeros(1, input_ids.shape[1], hidden)
        )
        cells = []
        for mode in ("sequential", "parallel"):
            sp, replay = replay_settings(mode, work, llm.tags)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                llm.generate([p for p, _ in work], sp, replay=replay)
                best = min(best, time.perf_counter() - t0)
            cells.append(f"{best / sum(len(c) for _, c in work) * 1e6:.1f}")
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
