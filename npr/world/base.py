"""`npr base`: pretrain the default world's tiny Qwen3 so it behaves like an instruct model.

It answers Countdown problems with sequential attempts when asked step by step, and tries
(often imperfectly) the parallel format when given the NPR instruction. The result is
saved with `save_pretrained` (safetensors) next to its tokenizer and is used downstream
exactly like a downloaded checkpoint. A finished build is reused unless `rebuild`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from npr.prompts import chat_ids
from npr.tags import TAKEAWAY, tag_ids
from npr.topology import collate
from npr.train.sft import causal, response_mask, sft_loss
from npr.world import corpus, countdown
from npr.world.tokenizer import build_tokenizer

VERSION = 3
DONE = "npr_base.json"


@dataclass
class Recipe:
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    examples: int = 8000
    steps: int = 700
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.01
    clean_rate: float = 0.6  # share of NPR-prompted examples written without a format mistake
    npr_share: float = 0.6  # share of examples prompted with the NPR instruction
    # share of well-formed parallel answers read in their parallel topology (steps blind to their
    # siblings), as a capable instruct model reads its own plan; the rest are read as plain text
    topology_share: float = 0.5
    # loss weight of the takeaway's verdict (the route code it copies, or "none"): one token in
    # ~300, yet the whole answer hinges on it, and a tiny model learns such a copy late
    takeaway_weight: float = 20.0
    levels: tuple[int, ...] = (1, 2, 3)
    seed: int = 0
    threads: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))

    def key(self) -> str:
        d = asdict(self)
        d.pop("threads")
        return hashlib.sha256(json.dumps([VERSION, d], sort_keys=True).encode()).hexdigest()[:16]


def encode_examples(tok, recipe: Recipe) -> list[tuple[list[int], int, bool]]:
    """(ids, prompt length, in parallel topology) per example: chat prompt, response, end-of-turn."""
    rng = random.Random(recipe.seed)
    problems = countdown.split("train", recipe.examples, recipe.levels, recipe.seed)
    out = []
    for p in problems:
        ex = corpus.example(p, rng, recipe.clean_rate, recipe.npr_share)
        if ex is None:  # no solution within the tokenizer's numbers
            continue
        user, response, clean = ex
        prompt = chat_ids(tok, user)
        ids = prompt + tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
        out.append((ids, len(prompt), clean and rng.random() < recipe.topology_share))
    return out


def make_model(tok, recipe: Recipe):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(recipe.seed)
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.head_dim,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(cfg)


def _batches(data, recipe: Recipe, tags: dict, pad: int):
    """(input ids, topology, loss mask) batches of similar lengths, forever."""
    rng = random.Random(recipe.seed + 1)
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        # group similar lengths so padding stays small
        for i in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size * 8):
            chunk = sorted(order[i : i + recipe.batch_size * 8], key=lambda j: len(data[j][0]))
            groups = [chunk[k : k + recipe.batch_size] for k in range(0, len(chunk), recipe.batch_size)]
            rng.shuffle(groups)
            for g in groups:
                rows = [data[j] for j in g]
                ids, topo = collate([(x, n if par else causal(len(x))) for x, n, par in rows], tags, pad_id=pad)
                mask = response_mask([[(x, n)] for x, n, _ in rows], ids.shape[1])
                mask[ids[:, :-1] == tags[TAKEAWAY]] *= recipe.takeaway_weight
                yield ids, topo, mask


def train(out: Path, recipe: Recipe, progress: bool = True) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    torch.set_num_threads(recipe.threads)
    tok = build_tokenizer()
    data = encode_examples(tok, recipe)
    model = make_model(tok, recipe).train()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step):
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    losses, t0 = [], time.perf_counter()
    batches = _batches(data, recipe, tag_ids(tok), tok.pad_token_id)
    cols = [TextColumn("pretraining base model"), BarColumn(), TextColumn("{task.fields[loss]}"), TimeRemainingColumn()]
    with Progress(*cols, disable=not progress, transient=True) as bar:
        task = bar.add_task("train", total=recipe.steps, loss="")
        for step in range(recipe.steps):
            ids, topo, mask = next(batches)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = sft_loss(model, ids, topo, mask) / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            bar.update(task, advance=1, loss=f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    report = {
        "version": VERSION,
        "key": recipe.key(),
        "recipe": asdict(recipe),
        "seconds": time.perf_counter() - t0,
        "examples": len(data),
        "loss_first": sum(losses[:10]) / min(10, len(losses)),
        "loss_last": sum(losses[-10:]) / min(10, len(losses)),
        "losses": losses[:: max(1, len(losses) // 100)],
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / DONE).write_text(json.dumps(report, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the finished checkpoint appears at once or not at all
    return report


def build_base(out: str | Path, recipe: Recipe | None = None, rebuild: bool = False, progress: bool = True):
    """Train (or reuse) the base model in `out`; returns (path, report, reused)."""
    recipe = recipe or Recipe()
    out = Path(out)
    done = out / DONE
    if done.exists() and not rebuild:
        report = json.loads(done.read_text())
        if report.get("key") == recipe.key():
            return out, report, True
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, train(out, recipe, progress), False


def measure_base(path: str | Path, problems: int = 100, k: int = 4) -> dict:
    """The issue's targets on the held-out test split (cached next to the checkpoint)."""
    from npr.engine import LLM, load
    from npr.world.report import measure

    path = Path(path)
    cache = path / f"npr_report_{problems}_{k}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, tok = load(path, device="cpu")
    llm = LLM(model, tok, kv_cache_gb=0.5)
    test = countdown.split("test", problems)
    plain = dict(enforce_structure=False, repetition_penalty=1.0)
    res = {
        "NPR prompt, sequential": measure(llm, test, True, k, **plain),
        "step-by-step prompt": measure(llm, test, False, k, **plain),
    }
    for level in sorted(countdown.LEVELS):
        rng = random.Random(f"report-{level}")
        ps = [countdown.make_problem(level, rng) for _ in range(max(10, problems // 4))]
        res[f"level {level}, step-by-step"] = measure(llm, ps, False, 8, **plain)
    cache.write_text(json.dumps(res, indent=1))
    return res
