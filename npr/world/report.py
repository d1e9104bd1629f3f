"""Measure a default-world model: accuracy, best@k and format validity on a Countdown split."""

from __future__ import annotations

from npr import grammar, metrics
from npr.prompts import chat_ids
from npr.tasks import grade
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
    samples = [
        {
            "problem_id": i // k,  # the index: generated problems (make_problem) carry no id
            "correct": grade(dict(problems[i // k], grader="countdown"), o.text),
            "format_valid": grammar.parse(o.text).valid,
            "parallel_blocks": o.stats["parallel_blocks"],
            "wellformed_blocks": 0,
            "forked_wellformed_blocks": 0,
            "total_tokens": o.stats["total_tokens"],
            "critical_path_tokens": o.stats["critical_path_tokens"],
        }
        for i, o in enumerate(outs)
    ]
    m = metrics.summarize(samples)
    keys = {"avg@k": "avg@k", "best@k": "best@k", "k": "k", "format_valid": "format_valid_rate",
            "tokens": "mean_total_tokens", "problems": "problems"}  # fmt: skip
    return {name: m[key] for name, key in keys.items()}
