"""Benchmarks that print figures. This file: the random models of real shapes the benchmarks use,
and `npr bench engine` (parallel vs sequential decoding vs HF `generate` on one structured
workload); `decode.py`: `npr bench decode` (a decode step against the memory-bandwidth bound);
`train.py`: `npr bench train` (memory and time of one training step).

Both engine modes replay the same trajectories (tokens are forced from a target instead of
sampled; the model still runs every forward), so they decode identical token ids and the
wall-clock ratio is the speedup that parallel branches buy. Random-weight models of real
shapes stand in for checkpoints that cannot be downloaded here.
"""

from __future__ import annotations

import copy
import random
import time

import torch

from npr.tags import TAGS

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False),
    "qwen3-0.6b-shape": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    # Qwen3's real vocabulary behind a narrow body: nearly all memory is the trainer's own (logits, masks)
    "narrow-152k": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=151936, tie_word_embeddings=False),
    "qwen3-4b-shape": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
}  # fmt: skip


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose vocabulary fills `vocab_size`: tags, labels "i:", filler words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from npr.tokens import add_tag_tokens

    words = ["<eos>", *TAGS, *(f"{i}:" for i in range(1, 33))]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    add_tag_tokens(fast)  # the tags are in the word vocabulary too; this makes them split out of text
    return fast


def resolve_dtype(name: str) -> torch.dtype:
    """--dtype of the benchmarks: float32, bfloat16, or auto (bf16 on a GPU, fp32 on a CPU)."""
    from npr.train.policy import DTYPES

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def random_model(shape: str, dtype=torch.float32, device="cpu", seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown --config {shape!r}; choose from {', '.join(SHAPES)}")
    torch.manual_seed(seed)
    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    return model.eval()


def bias_tags(model, tokenizer, bias: float | dict = 4.0):
    """Give a random model's output head a bias towards the tag tokens (one value, or one per tag),
    so it writes blocks often: what engine tests and stress runs need of a model that knows no
    schema. The tied head is replaced by an untied copy with a bias."""
    from npr.tags import tag_ids

    ids = tag_ids(tokenizer)
    head = model.get_output_embeddings()
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype,
                          device=head.weight.device)  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.bias.zero_()
        for t in TAGS:
            new.bias[ids[t]] = bias[t] if isinstance(bias, dict) else bias
    model.set_output_embeddings(new)
    return model


def staggered(llm, prompts: list, params: list, arrive: list[int], victim: int = -1, kill: int = -1) -> list:
    """Drive `llm` step by step, request i coming in at step `arrive[i]` and request `victim`
    aborted at step `kill` (if it is in by then and still running); the completions, None for
    the aborted one. What engine tests and stress runs need to vary when requests come and go."""
    ids, step = [None] * len(prompts), 0
    while None in ids or llm.has_work():
        for i, at in enumerate(arrive):
            if ids[i] is None and at <= step:
                ids[i] = llm.add_request(prompts[i], params[i])
        if step == kill and ids[victim] is not None and llm.abort(ids[victim]):
            ids[victim] = -1
        llm.step()
        step += 1
    return [None if rid == -1 else llm.completion(rid) for rid in ids]


def filler_ids(tok) -> list[int]:
    """Ids of the word tokenizer's filler words ("w0", "w1", ...), the text of every workload. Sorted:
    the tokenizer's vocabulary comes in a different order in every process, and so did the workload."""
    return sorted(i for w, i in tok.get_vocab().items() if w.startswith("w")) or list(range(100, 200))


def workload(tok, n: int, plans: int, step_tokens: int, blocks: int, prompt_tokens: int, seed: int = 0):
    """(prompt ids, canonical completion ids) pairs: `blocks` blocks of `plans` steps, then an answer."""
    rng = random.Random(seed)
    vocab = tok.get_vocab()
    words = filler_ids(tok)
    t = {x: vocab[x] for x in TAGS}

    def text(m):
        return [rng.choice(words) for _ in range(m)]

    def label(i):
        return tok.encode(f"{i}:", add_special_tokens=False)

    out = []
    for _ in range(n):
        ids = text(8)
        for _ in range(blocks):
            ids += [t["<guideline>"]]
            for i in range(plans):
                ids += [t["<plan>"], *label(i + 1), *text(6), t["</plan>"]]
            ids += [t["</guideline>"]]
            for i in range(plans):
                ids += [t["<step>"], *label(i + 1), *text(step_tokens), t["</step>"]]
            ids += [t["<takeaway>"], *text(8), t["</takeaway>"]]
        out.append((text(prompt_tokens), ids + text(6)))
    return out


SWEEP = [  # (branches, prompt tokens, step tokens): growing branch counts, long prompts, long steps
    (16, 32, 32), (64, 32, 32), (256, 32, 32), (64, 1024, 32), (16, 4096, 32), (64, 32, 256),
]  # fmt: skip


def bench_sweep(
    model, tok, plans: int = 4, points=SWEEP, attention: str = "auto", hf_generate: bool = True, repeats: int = 5,
    page_size: int = 16,
):  # fmt: skip
    """`bench_engine` at every point of `points`; one block of `plans` steps per request."""
    rows = []
    for branches, prompt, step in points:
        r = bench_engine(model, tok, requests=max(1, branches // plans), plans=plans, step_tokens=step, blocks=1,
                         prompt_tokens=prompt, hf_generate=hf_generate, attention=attention,
                         repeats=repeats, page_size=page_size)  # fmt: skip
        rows.append({"branches": branches, "prompt": prompt, "step_tokens": step, **r})
    return rows


def sweep_table(rows: list[dict]) -> str:
    head = ["branches", "prompt", "step tokens", "parallel tok/s", "sequential tok/s", "HF generate tok/s",
            "sequential / HF", "speedup / ideal", "decode speedup / ideal",
            "HF forward, same schedule: speedup / ideal", "parity"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        hf = r["hf_generate_tps"]
        cells = [r["branches"], r["prompt"], r["step_tokens"], f"{r['parallel_tps']:,.0f}",
                 f"{r['sequential_tps']:,.0f}", f"{hf:,.0f}" if hf else "-",
                 f"{r['sequential_tps'] / hf:.2f}" if hf else "-",
                 f"{r['speedup'] / r['ideal_speedup']:.2f}", f"{r['decode_speedup'] / r['ideal_speedup']:.2f}",
                 f"{r['hf_schedule_speedup'] / r['ideal_speedup']:.2f}" if hf else "-",
                 f"{r['parity_max_abs_logprob_diff']:.1e}"]  # fmt: skip
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def runs_of(prompt: list[int], completion: list[int], tag_ids: dict) -> list[list[int]]:
    """Split a canonical completion into the engine's runs (main line, each step, ...), in order."""
    from npr.topology import layout

    lay = layout(prompt + completion, tag_ids, len(prompt))
    runs, key = [], None
    for i, tok in enumerate(completion):
        k = (lay.block[len(prompt) + i], lay.branch[len(prompt) + i])
        if k != key:
            runs.append([])
            key = k
        runs[-1].append(tok)
    return runs


def replay_settings(mode: str, work: list, tags: dict):
    """(SamplingParams, replay targets) that make the engine write `work`'s completions exactly, in
    `mode`: no budget, mask or repetition stop cuts a trajectory short."""
    from npr.engine import SamplingParams

    sp = SamplingParams(mode=mode, max_tokens=10**6, enforce_structure=False, repetition_limit=10**6)
    return sp, [runs_of(p, c, tags) if mode == "parallel" else [c] for p, c in work]


def bench_engine(
    model,
    tok,
    requests: int = 8,
    plans: int = 4,
    step_tokens: int = 48,
    blocks: int = 2,
    prompt_tokens: int = 32,
    kv_cache_gb: float | None = None,
    hf_generate: bool = True,
    attention: str = "auto",
    repeats: int = 3,
    page_size: int = 16,
) -> dict:
    """Tokens/s of parallel and sequential decoding of the same trajectories (replayed), HF
    `generate` on the flat sequences, and log-prob parity. Each time is the best of `repeats`
    interleaved runs: a busy machine only ever slows a run down, so the best is the steadiest ratio."""
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    from npr.engine import LLM, SamplingParams
    from npr.modeling import token_logprobs, topology_forward
    from npr.tags import tag_ids
    from npr.topology import collate

    tags = tag_ids(tok)
    work = workload(tok, requests, plans, step_tokens, blocks, prompt_tokens)
    llm = LLM(model, tok, kv_cache_gb=kv_cache_gb, max_num_seqs=max(256, requests * plans), attention=attention,
              page_size=page_size)  # fmt: skip
    dev = llm.device

    def run(mode):
        sp, replay = replay_settings(mode, work, tags)
        _sync(dev)
        t0 = time.perf_counter()
        outs = llm.generate([p for p, _ in work], sp, replay=replay)
        _sync(dev)
        return outs, time.perf_counter() - t0

    def prefill():  # every prompt and each request's first token: work both modes share
        sp = SamplingParams(mode="sequential", max_tokens=10**6, enforce_structure=False)
        _sync(dev)
        t0 = time.perf_counter()
        llm.generate([p for p, _ in work], sp, replay=[[c[:1]] for _, c in work])
        _sync(dev)
        return time.perf_counter() - t0

    run("parallel")  # warm-up (allocator, kernels)
    n_new = max(len(c) for _, c in work)  # HF writes as many tokens for every sequence
    hf = hf_timer(model, [p for p, _ in work]) if hf_generate else None
    flat = hf_schedule_timer(model, [p for p, _ in work], runs_of(*work[0], tags), plans) if hf_generate else None
    t_par = t_seq = t_pre = t_hf = t_flat_seq = t_flat_par = float("inf")
    for _ in range(repeats):  # interleaved, so a slow spell of the machine hits every column alike
        par, t = run("parallel")
        t_par = min(t_par, t)
        seq, t = run("sequential")
        t_seq = min(t_seq, t)
        t_pre = min(t_pre, prefill())
        if hf:
            t_hf = min(t_hf, hf(n_new))
            a, b = flat()
            t_flat_seq, t_flat_par = min(t_flat_seq, a), min(t_flat_par, b)
    for (_, c), a, b in zip(work, par, seq):
        if a.token_ids != c or b.token_ids != c:
            raise RuntimeError("replay diverged: the two modes did not decode the target token ids")
    total = sum(len(c) for _, c in work)
    path = sum(o.stats["critical_path_tokens"] for o in par)
    result = {
        "requests": requests,
        "tokens": total,
        "parallel_s": t_par,
        "sequential_s": t_seq,
        "parallel_tps": total / t_par,
        "sequential_tps": total / t_seq,
        "ideal_speedup": total / path,
        "speedup": t_seq / t_par,
        "prefill_s": t_pre,
        # the ideal counts generated tokens only, so this is the speedup to hold it against
        "decode_speedup": (t_seq - t_pre) / max(t_par - t_pre, 1e-9),
    }
    # log-prob parity of the parallel trajectories with the trainer-side topology forward
    worst = 0.0
    for o in par[:2]:
        full = o.prompt_ids + o.token_ids
        ids, topo = collate([(full, o.layout)], tags)
        with torch.no_grad():
            lp = token_logprobs(topology_forward(model, ids.to(dev), topo).logits, ids.to(dev))[
                0, len(o.prompt_ids) - 1 :
            ]
        sampled = ~torch.tensor(o.forced)
        worst = max(worst, (lp.float().cpu() - torch.tensor(o.logprobs))[sampled].abs().max().item())
    result["parity_max_abs_logprob_diff"] = worst
    result["hf_generate_tps"] = len(work) * n_new / t_hf if hf else None
    result["hf_schedule_speedup"] = t_flat_seq / t_flat_par if hf else None
    return result


def _sync(dev: torch.device) -> None:
    """Wait for queued GPU work, so a timer stops when the work does (a no-op on CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize()


def hf_schedule_timer(model, prompts: list[list[int]], runs: list[list[int]], plans: int):
    """A timer of the model's own forward (HF's DynamicCache, no engine) decoding one request's
    schedule for every prompt, sequentially and in parallel: `timed()` is (sequential seconds,
    parallel seconds). Sequential decodes every run's tokens one after another; parallel decodes
    the main runs one row per prompt, each block's steps `plans` rows per prompt (the cache
    repeated at the fork; joined at the end of the block as prefix + every step's tokens). The
    prompts' prefill is not timed. Its speedup is what decoding the same rows in parallel buys
    the model alone, with no engine work and no shared prefix (each step's row holds its own
    copy): on a device where a step's cost grows with its rows (a CPU) it falls short of the
    ideal by as much as the model's forward does; where the cost does not grow, it nears it."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("hf_schedule_timer needs prompts of one length (no padding)")
    phases, i = [], 0  # (rows per prompt, tokens): main runs alternate with blocks of `plans` steps
    while i < len(runs):
        phases.append((1, len(runs[i])))
        if i + 1 + plans <= len(runs):
            phases.append((plans, max(len(r) for r in runs[i + 1 : i + 1 + plans])))
        i += 1 + plans
    dev = next(model.parameters()).device
    ids = torch.tensor(prompts, device=dev)
    rows = len(prompts)
    with torch.inference_mode():
        prefilled = model(ids, use_cache=True).past_key_values

    def decode(cache, n_rows: int, n: int) -> None:
        tok = ids[:1, -1:].expand(n_rows, 1)
        for _ in range(n):
            model(input_ids=tok, past_key_values=cache, use_cache=True)

    def parallel(cache) -> None:
        for k, n in phases:
            if k == 1:
                decode(cache, rows, n)
                continue
            prefix = cache.get_seq_length()
            cache.batch_repeat_interleave(k)
            decode(cache, rows * k, n)
            for layer in cache.layers:  # the join: each prompt's prefix once, then its k steps' tokens
                for name in ("keys", "values"):
                    x = getattr(layer, name)
                    own = x[:, :, prefix:].unflatten(0, (rows, k)).transpose(1, 2).flatten(2, 3)
                    setattr(layer, name, torch.cat([x[::k, :, :prefix], own], 2))

    total = sum(len(r) for r in runs)

    def timed() -> tuple[float, float]:
        out = []
        for f in (lambda c: decode(c, rows, total), parallel):
            cache = copy.deepcopy(prefilled)
            with torch.inference_mode():
                _sync(dev)
                t0 = time.perf_counter()
                f(cache)
                _sync(dev)
            out.append(time.perf_counter() - t0)
        return out[0], out[1]

    timed()  # warm-up
    return timed


def hf_timer(model, prompts: list[list[int]], sample: bool = False):
    """A timer of Hugging Face `generate` on `prompts` (left-padded; greedy, or with `sample` the
    evaluation default: T = 1, top-p 0.7): `timed(n)` is the seconds to write exactly n new tokens
    per prompt. Warmed up once."""
    dev = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    how = dict(do_sample=True, temperature=1.0, top_p=0.7, top_k=0) if sample else dict(do_sample=False)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, **how)

    def timed(n: int) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                       eos_token_id=None, **how)  # fmt: skip
        _sync(dev)
        return time.perf_counter() - t0

    return timed
