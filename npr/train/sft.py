"""Stage 2: supervised fine-tuning on distilled examples (NPR-Beta).

Parallel SFT trains each example under its topology (steps blind to their siblings, positions
restarting at each fork); `sft.sequential` trains the same tokens with a plain causal mask and
positions 0..L-1 (the paper's sequential-SFT baseline). Loss: negative log-likelihood of the
response tokens, token-mean over the optimiser batch (all ranks). Shares the policy, the run
folder, checkpoints and torchrun/FSDP mechanics with the RL loop (npr/train/loop.py).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from npr import grammar
from npr.grammar import LAYOUTS
from npr.modeling import topology_token_stats
from npr.tags import GUIDELINE, STEP, TAKEAWAY, tag_ids
from npr.tasks import prompt_ids
from npr.tokens import encode_pieces
from npr.topology import Layout, collate
from npr.train import distributed
from npr.train.config import Config
from npr.train.distill import EXAMPLES, STATS
from npr.train.loop import Run, Stream, backward, check_losses, make_optimizer, micro_batches, optimizer_step

Example = tuple[list[int], int]  # (prompt + response ids, prompt length)
Forced = Callable[[list[int], int], list[int]]  # (ids, prompt length) -> positions not to train on


def load_examples(source: str | Path, tokenizer, limit: int | None = None, layout: str = "canonical") -> list[Example]:
    """Read a distilled folder (or its examples.jsonl). The stored ids are used as they are when
    they were made with this tokenizer's tags in `layout`; otherwise prompt and response are
    encoded again from the problem record and the canonical text (e.g. after the tags were added
    for SFT, for another layout, or for examples written by hand with only `record` and `response`)."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    file = path / EXAMPLES if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"SFT data not found: {file} (make it with `npr distill`)")
    stats = folder / STATS
    made = json.loads(stats.read_text()).get("tag_ids") if stats.is_file() else None
    tags = tag_ids(tokenizer)
    reuse = made == tags
    vocab = len(tokenizer)  # once: some tokenizers build their whole vocabulary to count it
    out = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            if reuse and "response_ids" in e and e.get("layout", "canonical") == layout:
                prompt, response = list(e["prompt_ids"]), list(e["response_ids"])
            else:
                prompt = prompt_ids(tokenizer, e["record"])
                response = encode_pieces(tokenizer, grammar.canonical_pieces(grammar.parse(e["response"]), layout))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{file}:{n}: bad example ({type(err).__name__}: {err})") from None
        if not response:
            raise ValueError(f"{file}:{n}: empty response")
        bad = [i for i in prompt + response if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{file}:{n}: token id {bad[0]} outside the vocabulary ({vocab})")
        out.append((prompt + response, len(prompt)))
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{file}: no examples (no sampled answer was correct and well-formed: "
                         "sample more problems or tries with npr distill)")  # fmt: skip
    return out


def causal(n: int) -> Layout:
    """The layout of a plain sequence: positions 0..n-1, no blocks (the sequential baseline)."""
    return Layout(list(range(n)), [-1] * n, [-1] * n, True)


def pack(examples: list[Example], packing: bool, max_length: int) -> list[list[Example]]:
    """Rows of examples: one per row, or packed greedily end to end up to `max_length` tokens."""
    if not packing:
        return [[e] for e in examples]
    rows, width = [], 0
    for e in examples:
        if rows and width + len(e[0]) <= max_length:
            rows[-1].append(e)
            width += len(e[0])
        else:
            rows.append([e])
            width = len(e[0])
    return rows


def engine_forced(tokenizer, tags: dict, layout: str = "canonical") -> Forced:
    """The response positions the engine writes itself when it decodes in parallel in `layout`:
    each step's `<step>` and label, each `<takeaway>` and join text. RL does not train on them
    (rollouts record them as forced): their contexts are the siblings' shared one (steps 1..k
    predict their labels from the same tokens) or cross a step's boundary, and at decoding time
    nothing samples them. Parallel SFT trains on them unless `sft.mask_forced` (measured no
    different on the default world: docs/training.md)."""
    fork, join = LAYOUTS[layout]
    join_ids = tokenizer.encode(join, add_special_tokens=False) if join else []
    labels: dict[int, list[int]] = {}
    guideline, step, takeaway = tags[GUIDELINE], tags[STEP], tags[TAKEAWAY]

    def label(k: int) -> list[int]:
        if k not in labels:
            labels[k] = tokenizer.encode(fork.replace("{i}", str(k)), add_special_tokens=False)
        return labels[k]

    def positions(ids: list[int], start: int) -> list[int]:
        out, k = [], 0
        for t in range(start, len(ids)):
            if ids[t] == guideline:
                k = 0
                continue
            if ids[t] == step:
                k += 1
                text = label(k)
            elif ids[t] == takeaway:
                text = join_ids
            else:
                continue
            out.append(t)
            if ids[t + 1 : t + 1 + len(text)] == text:
                out += range(t + 1, t + 1 + len(text))
        return out

    return positions


def trained_tokens(example: Example, forced: Forced | None) -> int:
    ids, n = example
    return len(ids) - n - (len(forced(ids, n)) if forced else 0)


def scanned_once(forced: Forced | None, batch: list[Example]) -> Forced | None:
    """`forced` with its positions read once per example of `batch` (the token count of the
    whole batch and this rank's loss mask both need them; a scan is a Python pass over
    every response token)."""
    if forced is None:
        return None
    positions = {id(ids): forced(ids, n) for ids, n in batch}
    return lambda ids, n: positions[id(ids)]


def response_mask(rows: list[list[Example]], width: int, forced: Forced | None = None) -> torch.Tensor:
    """Loss mask [B, width-1] over packed rows: 1 where the next token is a response token (and
    not one of `forced`'s)."""
    mask = torch.zeros(len(rows), width - 1)
    for b, row in enumerate(rows):
        at = 0
        for seq, n in row:
            mask[b, at + n - 1 : at + len(seq) - 1] = 1.0
            if forced:
                for t in forced(seq, n):
                    mask[b, at + t - 1] = 0.0
            at += len(seq)
    return mask


def sft_batch(rows: list[list[Example]], tags: dict, pad_id: int, sequential: bool, forced: Forced | None = None):
    """(input ids [B, L], topology, loss mask [B, L-1]): the mask marks predictions of response tokens."""
    traj = [[(ids, causal(len(ids)) if sequential else n) for ids, n in row] for row in rows]
    ids, topo = collate(traj, tags, pad_id=pad_id)
    return ids, topo, response_mask(rows, ids.shape[1], forced)


def sft_loss(model, ids, topo, mask) -> torch.Tensor:
    """Summed NLL of the masked next tokens (divide by the batch's token count for the mean)."""
    nll = -topology_token_stats(model, ids, topo)[..., 0]  # chunked through the head: no [L, V] tensor
    return (nll * mask).sum()


def sft_step(
    policy, opt, sched, cfg: Config, rows, total: int, tags: dict, pad: int, forced: Forced | None = None
) -> tuple[float, float]:
    """One optimiser step over this rank's rows; (summed NLL over all ranks, gradient norm)."""
    model = policy.model
    device = next(model.parameters()).device
    loss_sum = nonfinite = 0.0
    model.train()
    opt.zero_grad(set_to_none=True)

    def run_chunk(chunk) -> None:
        nonlocal loss_sum, nonfinite
        ids, topo, mask = sft_batch(chunk, tags, pad, cfg.sft.sequential, forced)
        loss = sft_loss(model, ids.to(device), topo, mask.to(device))
        (loss / total).backward()
        value = float(loss.detach())
        loss_sum, nonfinite = loss_sum + value, nonfinite + (not math.isfinite(value))

    lengths = [sum(len(ids) for ids, _ in row) for row in rows]
    backward(policy, [[rows[i] for i in part] for part in micro_batches(lengths, cfg.optim)], run_chunk, pad)
    sums = distributed.sum_floats({"loss": loss_sum, "nonfinite": nonfinite})
    check_losses(sums["nonfinite"], opt)
    loss_sum = sums["loss"]
    norm = optimizer_step(policy, opt, sched, cfg.optim.grad_clip)
    model.eval()
    return loss_sum, norm


def train_sft(cfg: Config, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    s = cfg.sft
    run = Run(cfg, resume, progress, "SFT", add_tags=True, overwrite=overwrite)
    policy, rank, world = run.policy, run.rank, run.world
    tok = policy.tokenizer
    examples = load_examples(cfg.data.source, tok, cfg.data.size or None, cfg.rollout.layout)
    total_steps = s.steps or math.ceil(len(examples) * s.epochs / s.batch_size)
    opt, sched = make_optimizer(policy, cfg.optim, total_steps)
    stream = Stream(examples, cfg.run.seed)
    start = run.restore(opt, sched, stream)
    tags, pad = tag_ids(tok), (tok.pad_token_id if tok.pad_token_id is not None else 0)
    forced = engine_forced(tok, tags, cfg.rollout.layout) if s.mask_forced and not s.sequential else None
    summary = {}
    with run.bar() as bar:
        task = bar.add_task("sft", total=total_steps, completed=start, info="")
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            batch = stream.take(s.batch_size)  # the same on every rank; each trains its share
            skip = scanned_once(forced, batch)
            total = sum(trained_tokens(e, skip) for e in batch)  # trained tokens of the whole batch
            rows = pack(batch[rank::world], s.packing, s.max_length)
            loss_sum, norm = sft_step(policy, opt, sched, cfg, rows, total, tags, pad, skip)
            m = {
                "step": step + 1,
                "loss": loss_sum / total,
                "lr": sched.get_last_lr()[0],
                "grad_norm": norm,
                "tokens": total,
                "epoch": stream.position / len(examples),
                "step_time": time.perf_counter() - t0,
            }
            run.log(m)
            summary = m
            bar.update(task, advance=1, info=f"loss {m['loss']:.3f}")
            run.maybe_save(step + 1, total_steps, opt, sched, stream)
    run.close()
    return summary
