"""Random engine configurations against a large-pool reference, for as long as you give it.

Each round draws requests (parallel and sequential, greedy or sampled with top-k / top-p,
repetition penalty, stop strings, token and latency budgets) and an engine with random limits
(pages, page size, live branches, tokens per step: forks preempt, prompts prefill in chunks),
feeds the requests in at random steps and aborts one now and then. Every request that is not
aborted must decode what a large-pool engine decodes for it alone with the reference kernel
(sdpa): the same tokens, finish reason and log-probs (within --atol); and the pool and the
context table must end empty. A random tiny Qwen3 with a bias towards the tag tokens writes
blocks often. On a GPU, `--attention flex` puts the compiled paged kernel under that load.

    python examples/engine_stress.py [--minutes 5] [--attention sdpa|flex] [--dtype float32]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter

import torch

from npr.bench import bias_tags, random_model, resolve_dtype, staggered, word_tokenizer
from npr.engine import LLM, SamplingParams
from npr.tags import TAGS

PROMPTS = ["w1 w2 w3", "w7 w7 w9 w4 w5", "w10 " * 40, "1: 2: 3:"]


def requests(rs: random.Random) -> tuple[list[str], list[SamplingParams]]:
    n = rs.randint(1, 8)
    prompts = [rs.choice(PROMPTS) for _ in range(n)]
    params = [
        SamplingParams(
            mode=rs.choice(["parallel", "parallel", "sequential"]),
            temperature=rs.choice([0.0, 0.7, 1.0]),
            top_p=rs.choice([1.0, 0.7]),
            top_k=rs.choice([0, 0, 5]),
            repetition_penalty=rs.choice([1.0, 1.1]),
            max_tokens=rs.randint(10, 160),
            max_path_tokens=rs.choice([None, None, 40, 80]),
            enforce_structure=rs.random() < 0.8,
            max_plans=rs.randint(1, 4),
            seed=rs.randrange(10**6),
            repetition_limit=rs.choice([8, 1000]),
            stop=rs.choice([[], [], ["w3"]]),
        )  # fmt: skip
        for _ in range(n)
    ]
    return prompts, params


def engine_config(rs: random.Random, attention: str) -> dict:
    page_size = 16 if attention == "flex" else rs.choice([1, 2, 4, 8, 16])  # flex: a power of two >= 16
    seqs = rs.randint(2, 24)
    pages = rs.randint(4, 30) if page_size == 16 else rs.randint(6, 120)
    extra = rs.choice([0, 0, 1, 2, rs.randint(3, 72)])  # tokens per step past max_num_seqs: often tight
    return dict(num_pages=pages, page_size=page_size, max_num_seqs=seqs, max_batch_tokens=seqs + extra,
                attention=attention)  # fmt: skip


def drive(llm: LLM, prompts, params, rs: random.Random) -> list:
    """Requests in at random steps, at most one aborted; their completions (None if aborted)."""
    arrive = [rs.randrange(40) for _ in prompts]
    victim, kill = rs.randrange(len(prompts)), rs.randrange(60) if rs.random() < 0.5 else -1
    return staggered(llm, prompts, params, arrive, victim, kill)


def check(ref, got, llm: LLM, atol: float, seen: dict) -> None:
    for i, (a, b) in enumerate(zip(ref, got)):
        if b is None:
            continue
        if b.finish_reason == "aborted":  # the pool or max_num_seqs cannot hold it alone: said so
            if "KV pool" not in b.error and "max_num_seqs" not in b.error:
                raise AssertionError(f"request {i}: aborted with {b.error!r}")
            continue
        if (a.token_ids, a.finish_reason) != (b.token_ids, b.finish_reason):
            raise AssertionError(f"request {i}: {b.finish_reason} after {len(b.token_ids)} tokens, the reference "
                                 f"{a.finish_reason} after {len(a.token_ids)}")  # fmt: skip
        seen["requests"] += 1
        seen["parallel blocks"] += b.stats["parallel_blocks"]
        seen["preemptions"] += b.stats["preemptions"]
        worst = max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0)
        if worst > atol:
            raise AssertionError(f"request {i}: log-probs differ by {worst:.2e}")
    llm.pool.check()
    if llm.pool.free_pages != llm.pool.num_pages or len(llm.table.free) != llm.table.rows:
        raise AssertionError("pages or context rows still held after every request ended")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="how long to keep drawing rounds")
    ap.add_argument("--attention", choices=["sdpa", "flex"], default="sdpa", help="the kernel under test")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto")
    ap.add_argument("--atol", type=float, default=None, help="log-prob tolerance (default 1e-4; 5e-2 in bf16)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    dtype = resolve_dtype(args.dtype)
    atol = args.atol if args.atol is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = word_tokenizer(512)
    models = []  # three random models, each with its own tag biases (how often it forks, ends, ...)
    for s in range(3):
        bias = {t: 2.0 + s + i % 3 for i, t in enumerate(TAGS)}
        models.append(bias_tags(random_model("tiny", dtype, device, seed=s), tok, bias))
    t0, rounds, failures = time.perf_counter(), 0, 0
    seen = Counter()  # what the checked requests went through
    while time.perf_counter() - t0 < 60 * args.minutes:
        rs = random.Random(args.seed * 1_000_003 + rounds)
        rounds += 1
        model = rs.choice(models)
        prompts, params = requests(rs)
        cfg = engine_config(rs, args.attention)
        try:
            ref = LLM(model, tok, num_pages=4096, page_size=4, attention="sdpa").generate(prompts, params)
            llm = LLM(model, tok, **cfg)
            check(ref, drive(llm, prompts, params, rs), llm, atol, seen)
        except Exception as e:  # noqa: BLE001 (report every kind of failure with the round that made it)
            failures += 1
            print(f"round {rounds - 1} (--seed {args.seed}) failed: {type(e).__name__}: {e}\n  engine {cfg}\n  "
                  f"prompts {prompts}\n  params {params}", flush=True)  # fmt: skip
    took = time.perf_counter() - t0
    print(f"{rounds} rounds in {took:.0f} s, {failures} failed ({args.attention}, {dtype}, {device}); checked: "
          + ", ".join(f"{n} {what}" for what, n in seen.items()))  # fmt: skip
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
