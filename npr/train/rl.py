"""The RL loop shared by Stage 1 (DAPO, sequential rollouts) and Stage 3 (PAPO, parallel rollouts).

step: prompts -> engine rollouts on the live weights (n per prompt) -> rewards -> filters
(dynamic sampling, schema filter) -> advantages -> token-level policy loss with the topology
forward -> optimiser step -> metrics, samples, checkpoint. Everything is seeded from the run
seed, the step and the problem, so `--resume` continues exactly.
"""

from __future__ import annotations

import json
import math
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from npr import grammar
from npr.data import load_benchmark
from npr.engine import LLM, SamplingParams
from npr.grading import grade
from npr.modeling import topology_forward
from npr.prompts import prompt_ids
from npr.rewards import get_reward
from npr.topology import collate, executable
from npr.train import checkpoint, distributed
from npr.train.config import Config
from npr.train.objectives import batch_advantages, dapo_loss, group_advantages, overlong_penalty, papo_loss
from npr.train.policy import Policy, load_policy


class TrainingError(RuntimeError):
    pass


@dataclass
class Rollout:
    problem: dict
    group: int  # index of its prompt among all prompts of the step (over ranks and rounds)
    sample: int
    out: object  # engine Completion
    reward: float
    correct: bool
    valid: bool

    def summary(self, tags: dict) -> dict:
        """What every rank needs to know about this rollout to take the same decisions."""
        return {
            "group": self.group,
            "sample": self.sample,
            "reward": self.reward,
            "correct": self.correct,
            "valid": self.valid,
            "length": len(self.out.token_ids),
            "total_tokens": self.out.stats["total_tokens"],
            "sampled": sum(not f for f in self.out.forced),
            "schema_ok": executable(self.out.token_ids, tags) is None,
        }


class Prompts:
    """An endless, seeded shuffle of the training problems; its position is checkpointed."""

    def __init__(self, problems: list[dict], seed: int, position: int = 0):
        self.problems, self.seed, self.position = problems, seed, position

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.problems))
            order = list(range(len(self.problems)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            out.append(self.problems[order[i]])
            self.position += 1
        return out


def rollouts(llm: LLM, cfg: Config, problems: list[tuple[int, dict]], step: int, round_: int, reward_fn):
    """n rollouts for each (group id, problem); seeds depend on the problem, not on the rank."""
    r = cfg.rollout
    prompts, params, meta = [], [], []
    for g, p in problems:
        ids = prompt_ids(llm.tokenizer, p)
        for j in range(r.n):
            seed = zlib.crc32(f"{cfg.run.seed}/{step}/{round_}/{p['id']}/{j}".encode())
            prompts.append(ids)
            params.append(
                SamplingParams(
                    mode=r.mode,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    max_tokens=r.max_tokens,
                    max_path_tokens=r.max_path_tokens,
                    enforce_structure=r.enforce_structure,
                    repetition_penalty=r.repetition_penalty,
                    seed=seed,
                )  # fmt: skip
            )
            meta.append((p, g, j))
    outs = llm.generate(prompts, params) if prompts else []
    result = []
    for (p, g, j), o in zip(meta, outs):
        text = o.text
        reward = float(reward_fn(p["problem"], text, str(p.get("answer", "")), p))
        result.append(Rollout(p, g, j, o, reward, bool(grade(p, text)), grammar.parse(text).valid))
    return result


def _sequence_batch(rolls: list[Rollout], pad_id: int, tag_ids: dict):
    """Input ids, topology, response mask (sampled tokens only) and engine log-probs, right-padded."""
    seqs = [(r.out.prompt_ids + r.out.token_ids, r.out.layout) for r in rolls]
    ids, topo = collate(seqs, tag_ids, pad_id=pad_id)
    B, L = ids.shape
    mask = torch.zeros(B, L - 1)
    old = torch.zeros(B, L - 1)
    for b, r in enumerate(rolls):
        n, m = len(r.out.prompt_ids), len(r.out.token_ids)
        sampled = torch.tensor([not f for f in r.out.forced], dtype=torch.float32)
        mask[b, n - 1 : n - 1 + m] = sampled
        old[b, n - 1 : n - 1 + m] = torch.tensor(r.out.logprobs)
    return ids, topo, mask, old


def train_step(policy: Policy, opt, cfg: Config, rolls: list[Rollout], advantages, tag_ids: dict, pad_id: int,
               total_tokens):  # fmt: skip
    """One optimiser step; the loss is the token-mean over the kept rollouts of all ranks."""
    a, model = cfg.algo, policy.model
    device = next(model.parameters()).device
    stats = {"clip_fraction": 0.0, "entropy": 0.0}
    model.train()
    opt.zero_grad(set_to_none=True)
    starts = list(range(0, len(rolls), cfg.optim.micro_batch))
    if policy.fsdp:  # every forward/backward is a collective: all ranks run as many micro-batches
        starts += [None] * (distributed.max_int(len(starts)) - len(starts))
    for s in starts:
        if s is None:
            _idle_micro_batch(model, pad_id, device)
            continue
        chunk = rolls[s : s + cfg.optim.micro_batch]
        ids, topo, mask, old = _sequence_batch(chunk, pad_id, tag_ids)
        ids, mask, old = ids.to(device), mask.to(device), old.to(device)
        logits = topology_forward(model, ids, topo).logits[:, :-1].float()
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
        adv = advantages[s : s + len(chunk)].to(device)
        share = mask.sum() / max(total_tokens, 1)  # this micro-batch's share of the token-mean
        if a.loss == "dapo":
            loss, st = dapo_loss(logp, old, adv, mask, a.clip_low, a.clip_high)
            stats["clip_fraction"] += st["clip_fraction"] * float(share)
        elif a.loss == "papo":
            loss = papo_loss(logp, adv, mask)
        else:
            raise ValueError(f"unknown loss {a.loss!r} (dapo or papo)")
        if not torch.isfinite(loss):
            opt.zero_grad(set_to_none=True)
            raise TrainingError(f"non-finite loss ({loss.item()}); stopped, the last checkpoint is kept")
        (loss * share).backward()
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
            stats["entropy"] += float((ent * mask).sum() / max(total_tokens, 1))
    if not policy.fsdp:  # FSDP has already reduce-scattered (summed) the gradients
        distributed.sum_gradients(policy.trainable())
    stats = distributed.sum_floats(stats)
    norm = torch.nn.utils.clip_grad_norm_(policy.trainable(), cfg.optim.grad_clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        raise TrainingError(f"non-finite gradient norm ({float(norm)}); stopped, the last checkpoint is kept")
    opt.step()
    model.eval()
    stats["grad_norm"] = float(norm)
    return stats


def _idle_micro_batch(model, pad_id: int, device) -> None:
    """A zero-loss forward/backward so a rank with fewer rollouts meets the others' collectives."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    (model(input_ids=ids).logits.sum() * 0.0).backward()


def train_rl(cfg: Config, resume: bool = False, progress: bool = True) -> dict:
    rank, world = distributed.init()
    progress = progress and rank == 0
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    ckpt = checkpoint.latest(out) if resume else None
    if resume and ckpt is None:
        raise ValueError(f"--resume: no checkpoint in {out}/checkpoints")
    policy = load_policy(cfg.model, ckpt)
    model, tok = policy.model, policy.tokenizer
    with policy.full_weights():
        llm = LLM(model, tok, kv_cache_gb=cfg.rollout.kv_cache_gb)
    problems = load_benchmark(cfg.data.source, cfg.data.size, cfg.data.problem_field, cfg.data.answer_field)
    reward_fn = get_reward(cfg.algo.reward)
    o = cfg.optim
    opt = torch.optim.AdamW(policy.trainable(), lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    prompts = Prompts(problems, cfg.run.seed)
    start = 0
    if ckpt is not None:
        state = checkpoint.load_state(ckpt)
        policy.load_optimizer_state(opt, state["optimizer"])
        prompts.position, start = state["position"], state["step"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
    writer = None
    if cfg.run.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("run.tensorboard needs the tensorboard package (pip install tensorboard)") from None
        writer = SummaryWriter(str(out / "tensorboard"))
    log = (out / "metrics.jsonl").open("a")
    samples = (out / "samples.txt").open("a")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    summary = {}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = [
        TextColumn("RL"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, disable=not progress, transient=True) as bar:
        task = bar.add_task("rl", total=cfg.run.steps, completed=start, info="")
        for step in range(start, cfg.run.steps):
            t0 = time.perf_counter()
            kept, seen, mine, dropped, rounds, base = [], [], {}, 0, 0, 0
            need = cfg.rollout.prompts_per_step
            while need > 0 and rounds <= (cfg.algo.max_resample if cfg.algo.dynamic_sampling else 0):
                taken = prompts.take(need)  # the same on every rank; each samples its share
                share = [(base + i, p) for i, p in enumerate(taken) if i % world == rank]
                with policy.full_weights():
                    batch = rollouts(llm, cfg, share, step, rounds, reward_fn)
                mine |= {(r.group, r.sample): r for r in batch}
                summaries = sorted(distributed.gather([r.summary(llm.tags) for r in batch]),
                                   key=lambda x: (x["group"], x["sample"]))  # fmt: skip
                seen += summaries
                base, rounds = base + len(taken), rounds + 1
                for g in sorted({x["group"] for x in summaries}):
                    group = [x for x in summaries if x["group"] == g]
                    if cfg.algo.schema_filter:
                        group = [x for x in group if x["schema_ok"]]
                    if not group or (cfg.algo.dynamic_sampling and len({x["reward"] for x in group}) == 1):
                        dropped += 1
                        continue
                    kept.append(group)
                need = cfg.rollout.prompts_per_step - len(kept)
            gen_time = time.perf_counter() - t0
            flat = [x for g in kept for x in g]
            stats = {}
            if flat:
                rewards = torch.tensor([x["reward"] for x in flat])
                if cfg.algo.overlong_buffer:
                    lengths = torch.tensor([x["length"] for x in flat])
                    rewards = rewards + overlong_penalty(
                        lengths, cfg.rollout.max_tokens, cfg.algo.overlong_buffer, cfg.algo.overlong_factor
                    )
                groups = torch.tensor([i for i, g in enumerate(kept) for _ in g])
                adv_fn = {"group": group_advantages, "batch": batch_advantages}[cfg.algo.advantage]
                adv = adv_fn(rewards, groups)
                local = [i for i, x in enumerate(flat) if (x["group"], x["sample"]) in mine]
                rolls = [mine[flat[i]["group"], flat[i]["sample"]] for i in local]
                total = sum(x["sampled"] for x in flat)
                stats = train_step(policy, opt, cfg, rolls, adv[local], llm.tags, pad, total)
            tokens = sum(x["total_tokens"] for x in seen)
            m = {
                "step": step + 1,
                "reward_mean": _mean([x["reward"] for x in seen]),
                "reward_std": float(torch.tensor([x["reward"] for x in seen]).std()) if len(seen) > 1 else 0.0,
                "accuracy": _mean([x["correct"] for x in seen]),
                "format_valid_rate": _mean([x["valid"] for x in seen]),
                "response_length": _mean([x["length"] for x in seen]),
                "dropped_groups": dropped,
                "kept_groups": len(kept),
                "sampling_rounds": rounds,
                "tokens_per_s": tokens / max(gen_time, 1e-9),
                "step_time": time.perf_counter() - t0,
                **stats,
            }
            if rank == 0:
                log.write(json.dumps(m) + "\n")
                log.flush()
                if writer:
                    for k, v in m.items():
                        writer.add_scalar(k, v, step + 1)
                for r in list(mine.values())[: cfg.run.samples_per_step]:
                    samples.write(f"=== step {step + 1} | {r.problem['id']} | reward {r.reward:+.2f}\n{r.out.text}\n\n")
                samples.flush()
            summary = m
            bar.update(task, advance=1, info=f"reward {m['reward_mean']:+.2f} valid {m['format_valid_rate']:.2f}")
            if (step + 1) % cfg.run.save_every == 0 or step + 1 == cfg.run.steps:
                state = {
                    "step": step + 1,
                    "position": prompts.position,
                    "optimizer": policy.optimizer_state(opt),
                    "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(),
                }
                policy.save(out, step + 1, state)
                distributed.barrier()
    log.close()
    samples.close()
    if writer:
        writer.close()
    return summary


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else math.nan
