"""Measure a default-world model: accuracy, best@k and format validity on a Countdown split."""

from __future__ import annotations

from npr import grammar
from npr.grading import grade
from npr.prompts import chat_ids
from npr.world import corpus


def measure(llm, problems: list[dict], parallel_prompt: bool, k: int = 4, mode: str = "sequential", **sampling):
    """avg@k, best@k and format-valid rate of `k` samples per problem (engine `mode`)."""
    from npr.engine import SamplingParams

    tok = llm.tokenizer
    prompts, params = [], []
    for i, p in enumerate(problems):
        ids = chat_ids(tok, corpus.user_prompt(p, parallel_prompt))
        for j in range(k):
            prompts.append(ids)
            params.append(SamplingParams(mode=mode, seed=i * k + j, **({"max_tokens": 256} | sampling)))
    outs = llm.generate(prompts, params)
    hits = [grade(dict(problems[i // k], grader="countdown"), o.text) for i, o in enumerate(outs)]
    valid = [grammar.parse(o.text).valid for o in outs]
    best = [any(hits[i * k : (i + 1) * k]) for i in range(len(problems))]
    return {
        "avg@k": sum(hits) / len(hits),
        "best@k": sum(best) / len(best),
        "k": k,
        "format_valid": sum(valid) / len(valid),
        "tokens": sum(o.stats["total_tokens"] for o in outs) / len(outs),
        "problems": len(problems),
    }
