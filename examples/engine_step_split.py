"""Where a sequential decode step's time goes, in the engine and in HF `generate`: the model's
forward (`base_model.forward`, timed inside both) and the rest (the engine's scheduling, metadata,
sampling and schema bookkeeping; `generate`'s logits processing and cache handling; the output
head in both). Same random tiny Qwen3 and replayed workload as `npr bench engine`, one process,
the two interleaved, best of `--repeats`, 2 torch threads. With `--sample` both sample with the
evaluation default (T = 1, top-p 0.7; the engine also under its structure mask) instead of
replaying or taking the argmax: the sampling cost a user pays.

    python examples/engine_step_split.py [--requests 16 64] [--repeats 6] [--sample]
"""

from __future__ import annotations

import argparse
import time

import torch

from npr.bench import hf_timer, random_model, replay_settings, word_tokenizer, workload
from npr.engine import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, nargs="+", default=[16, 64], help="rows decoded together")
    ap.add_argument("--repeats", type=int, default=6, help="interleaved runs, the fastest kept")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt (the prefill counts in both)")
    ap.add_argument("--sample", action="store_true", help="sample (T = 1, top-p 0.7) in both, not replay / argmax")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = random_model("tiny"), word_tokenizer(512)
    inside = [0.0]  # seconds spent in the model's forward since the last reset
    forward = model.base_model.forward

    def timed_forward(*a, **kw):
        t0 = time.perf_counter()
        out = forward(*a, **kw)
        inside[0] += time.perf_counter() - t0
        return out

    model.base_model.forward = timed_forward
    print("| rows | engine: model ms / step | engine: rest | generate: model | generate: rest |")
    print("|---|---|---|---|---|")
    for n in args.requests:
        cells = [f"{x * 1e3:.2f}" for x in split(model, tok, n, args.repeats, inside, args.sample, args.prompt_tokens)]
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


def split(model, tok, n: int, repeats: int, inside: list[float], sample: bool = False, prompt_tokens: int = 32):
    """Seconds per step of n rows: [engine model, engine rest, generate model, generate rest]."""
    work = workload(tok, n, plans=4, step_tokens=32, blocks=1, prompt_tokens=prompt_tokens)
    steps = max(len(c) for _, c in work)  # tokens per request: one forward each in both
    llm = LLM(model, tok, max_num_seqs=max(256, n))
    if sample:  # every request runs to `steps` tokens: no stop ids, no repetition stop
        sp = SamplingParams(mode="sequential", temperature=1.0, top_p=0.7, max_tokens=steps, stop_token_ids=[],
                            repetition_limit=10**6, seed=0)  # fmt: skip
        replay = None
    else:
        sp, replay = replay_settings("sequential", work, llm.tags)
    hf = hf_timer(model, [p for p, _ in work], sample=sample)

    def engine():
        llm.generate([p for p, _ in work], sp, replay=replay)

    best = {"engine": (float("inf"), 0.0), "hf": (float("inf"), 0.0)}
    for _ in range(repeats):
        for name, run in (("engine", engine), ("hf", lambda: hf(steps))):
            inside[0] = 0.0
            t0 = time.perf_counter()
            run()
            total = time.perf_counter() - t0
            if total < best[name][0]:
                best[name] = (total, inside[0])
    return [x / steps for total, model_s in best.values() for x in (model_s, total - model_s)]


if __name__ == "__main__":
    main()
