"""`npr bench train`: peak memory and time of one real training step at a given length.

The step is the trainers' own (`sft.sft_step` for Stage 2, `rl.train_step` with the PAPO loss
for Stage 3) on one parallel trajectory of exactly `length` tokens, through a random model of a
real shape, with the trainers' optimiser (fp32 masters for bf16), gradient checkpointing and
attention choice. Peak memory: `torch.cuda.max_memory_allocated` on a GPU; on a CPU the process's
peak RSS, so each length runs in a fresh process (a peak cannot be reset).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from npr.bench import random_model, resolve_dtype, word_tokenizer, workload

STEPS = ("sft", "papo")


def trajectory(tok, length: int, plans: int = 4, prompt_tokens: int = 64) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) with len(prompt + completion) == length: blocks of `plans` steps
    (one block per 2k tokens), the tail filled or cut to the exact length."""
    trajectory_check(length, prompt_tokens)
    blocks = max(1, length // 2048)
    overhead = 2 + plans * 10 + 2 + plans * 3 + 10  # tags, labels, plans and takeaway of one block
    step = max(1, ((length - prompt_tokens - 6) // blocks - overhead) // plans)
    prompt, completion = workload(tok, 1, plans, step, blocks, prompt_tokens)[0]
    filler = completion[-1]
    completion = (completion + [filler] * length)[: length - len(prompt)]
    return prompt, completion


def trajectory_check(length: int, prompt_tokens: int = 64) -> None:
    if length < prompt_tokens + 128:
        raise ValueError(f"--length must be at least {prompt_tokens + 128}, got {length}")


def train_step(shape: str, length: int, step: str, dtype: torch.dtype, attention: str, checkpointing: bool,
               repeat: int = 2) -> dict:  # fmt: skip
    """Run `repeat` steps (the first warms up compiled kernels); the last one's time, the peak of all."""
    from npr.modeling import use_trainer_attention
    from npr.tags import tag_ids
    from npr.train.config import Config
    from npr.train.loop import make_optimizer
    from npr.train.policy import Policy, enable_checkpointing
    from npr.train.rl import Rollout
    from npr.train.rl import train_step as rl_step
    from npr.train.sft import sft_step

    cuda = torch.cuda.is_available()
    model = random_model(shape, dtype, "cuda" if cuda else "cpu")
    tok = word_tokenizer(model.config.vocab_size)
    kernel = use_trainer_attention(model, attention)
    if checkpointing:
        enable_checkpointing(model)
    cfg = Config()
    cfg.optim.lr, cfg.algo.loss = 1e-6, "papo"
    policy = Policy(model, tok, dtype=dtype)
    opt, sched = make_optimizer(policy, cfg.optim, repeat)
    tags, pad = tag_ids(tok), tok.pad_token_id
    prompt, completion = trajectory(tok, length)
    m = len(completion)
    if cuda:  # the peak of the steps, not of building the random model
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if step == "sft":
            sft_step(policy, opt, sched, cfg, [[(prompt + completion, len(prompt))]], m, tags, pad)
        else:
            out = SimpleNamespace(prompt_ids=prompt, token_ids=completion, layout=len(prompt), forced=[False] * m,
                                  logprobs=[-1.0] * m)  # fmt: skip
            roll = Rollout({}, 0, 0, out, 1.0, True, True)
            rl_step(policy, opt, sched, cfg, [roll], torch.tensor([1.0]), tags, pad, m)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"config": shape, "step": step, "length": length, "dtype": str(dtype).removeprefix("torch."),
            "device": "cuda" if cuda else "cpu", "attention": kernel, "checkpointing": checkpointing,
            "peak_gib": round(peak, 3), "step_s": round(times[-1], 3)}  # fmt: skip


def measure(shape: str, length: int, step: str, dtype: str, attention: str, checkpointing: bool) -> dict:
    """One length; on a CPU in a fresh process so its peak RSS is this step's alone."""
    check(shape, length, step, dtype, attention)
    if torch.cuda.is_available():
        return train_step(shape, length, step, resolve_dtype(dtype), attention, checkpointing)
    cmd = [sys.executable, "-c", "import sys; from npr.bench.train import one; one(sys.argv[1:])",
           shape, str(length), step, dtype, attention, str(int(checkpointing))]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"the {step} step at {length} tokens failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.splitlines()[-1])


def check(shape: str, length: int, step: str, dtype: str, attention: str) -> None:
    """Refuse bad settings here, before any (child) process starts."""
    from npr.bench import SHAPES
    from npr.modeling import ATTENTION

    if shape not in SHAPES:
        raise ValueError(f"--config must be one of {', '.join(SHAPES)}, got {shape!r}")
    if step not in STEPS:
        raise ValueError(f"--step must be one of {', '.join(STEPS)}, got {step!r}")
    resolve_dtype(dtype)
    if attention not in ATTENTION:
        raise ValueError(f"--attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    trajectory_check(length)


def one(argv: list[str]) -> None:
    """Entry point of the per-length child process: prints one JSON row."""
    shape, length, step, dtype, attention, ckpt = argv
    torch.set_num_threads(2)
    print(json.dumps(train_step(shape, int(length), step, resolve_dtype(dtype), attention, ckpt == "1")))


def table(rows: list[dict]) -> str:
    lines = ["| config | step | tokens | dtype | device | attention | checkpointing | peak GiB | step s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['config']} | {r['step']} | {r['length']:,} | {r['dtype']} | {r['device']} | "
                     f"{r['attention']} | {'on' if r['checkpointing'] else 'off'} | {r['peak_gib']:.2f} | "
                     f"{r['step_s']:.2f} |")  # fmt: skip
    return "\n".join(lines)
