"""The RL loop shared by Stage 1 (DAPO, sequential rollouts) and Stage 3 (PAPO, parallel rollouts).

step: prompts -> engine rollouts on the live weights (n per prompt) -> rewards -> filters
(dynamic sampling, schema filter) -> advantages -> token-level policy loss with the topology
forward -> optimiser step -> metrics, samples, checkpoint. Everything is seeded from the run
seed, the step and the problem, so `--resume` continues exactly.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass

import torch

from npr import grammar
from npr.data import load_benchmark
from npr.engine import LLM, SamplingParams
from npr.engine.params import BUDGET_STOPS, layout_texts
from npr.modeling import topology_token_stats
from npr.rewards import get_reward
from npr.tasks import grade, prompt_ids, read_prompt_file, with_instruction
from npr.topology import collate, executable
from npr.train import distributed
from npr.train.config import Config
from npr.train.loop import Run, Stream, backward, check_losses, make_optimizer, micro_batches, optimizer_step
from npr.train.objectives import batch_advantages, dapo_loss, group_advantages, overlong_penalty, papo_loss
from npr.train.policy import Policy


@dataclass
class Rollout:
    problem: dict
    group: int  # index of its prompt among all prompts of the step (over ranks and rounds)
    sample: int
    out: object  # engine Completion
    reward: float
    correct: bool
    valid: bool
    old: torch.Tensor | None = None  # log-probs of its tokens recomputed by the trainer before the update

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
            "critical_path": self.out.stats["critical_path_tokens"],
            "blocks": self.out.stats["blocks"],
            "branches": self.out.stats["branches"],
            "parallel_blocks": self.out.stats["parallel_blocks"],
            "sampled": sum(not f for f in self.out.forced),
            "schema_ok": schema_ok(self.out, tags),
        }


def rollouts(llm: LLM, cfg: Config, problems: list[tuple[int, dict]], step: int, round_: int, reward_fn):
    """n rollouts for each (group id, problem); seeds depend on the step, the group
    and the problem, not on the rank."""
    r = cfg.rollout
    texts = layout_texts(r.layout)
    prompts, params, meta = [], [], []
    for g, p in problems:
        ids = prompt_ids(llm.tokenizer, p)
        for j in range(r.n):
            # the group id too: a problem drawn twice in one step gets two different groups
            seed = zlib.crc32(f"{cfg.run.seed}/{step}/{round_}/{g}/{p['id']}/{j}".encode())
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
                    **texts,
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


def schema_ok(out, tags: dict) -> bool:
    """The schema filter's test: an executable parallel schema, or a rollout the token budget cut
    off. A cut-off rollout is the policy's doing and scores as wrong; dropping it would never teach
    the policy to stay within the latency budget (on the default world its answers then grew under
    Stage 3: critical path 104 -> 122 tokens, format-valid 0.95 -> 0.70)."""
    return out.finish_reason in BUDGET_STOPS or executable(out.token_ids, tags) is None


def select_groups(summaries: list[dict], schema_filter: bool, dynamic_sampling: bool):
    """(kept groups, dropped groups, filtered rollouts). The schema filter removes rollouts the
    topology cannot execute before their rewards count; dynamic sampling drops groups whose
    remaining rewards are all equal (no signal)."""
    kept, dropped, filtered = [], 0, 0
    for g in sorted({x["group"] for x in summaries}):
        group = [x for x in summaries if x["group"] == g]
        if schema_filter:
            filtered += sum(not x["schema_ok"] for x in group)
            group = [x for x in group if x["schema_ok"]]
        if not group or (dynamic_sampling and len({x["reward"] for x in group}) == 1):
            dropped += 1
            continue
        kept.append(group)
    return kept, dropped, filtered


def mini_batch_parts(owners: list[int], mini: int) -> list[int]:
    """The part (optimiser step) of each kept rollout, given the rank holding it: each rank's
    rollouts, in order, cut into `mini` near-equal runs, so every step trains on every rank's
    share. (Contiguous groups would give a step the groups of a few ranks while the others ran
    empty passes: at 8 ranks, 16 groups and 4 steps, half the GPUs idle in every update.) At one
    rank, part j is the j-th of `mini` near-equal runs of the rollouts in order."""
    part = [0] * len(owners)
    by_rank: dict[int, list[int]] = {}
    for i, r in enumerate(owners):
        by_rank.setdefault(r, []).append(i)
    for idx in by_rank.values():
        for j in range(mini):
            for k in range(j * len(idx) // mini, (j + 1) * len(idx) // mini):
                part[idx[k]] = j
    return part


def _sequence_batch(rolls: list[Rollout], pad_id: int, tag_ids: dict):
    """Input ids, topology, response mask (sampled tokens only), the engine's log-probs and the
    trainer's recomputed old log-probs (None unless every rollout has them), right-padded."""
    seqs = [(r.out.prompt_ids + r.out.token_ids, r.out.layout) for r in rolls]
    ids, topo = collate(seqs, tag_ids, pad_id=pad_id)
    B, L = ids.shape
    mask = torch.zeros(B, L - 1)
    engine = torch.zeros(B, L - 1)
    old = torch.zeros(B, L - 1) if all(r.old is not None for r in rolls) else None
    for b, r in enumerate(rolls):
        n, m = len(r.out.prompt_ids), len(r.out.token_ids)
        mask[b, n - 1 : n - 1 + m] = torch.tensor([not f for f in r.out.forced], dtype=torch.float32)
        engine[b, n - 1 : n - 1 + m] = torch.tensor(r.out.logprobs)
        if old is not None:
            old[b, n - 1 : n - 1 + m] = r.old
    return ids, topo, mask, engine, old


def _length(r: Rollout) -> int:
    return len(r.out.prompt_ids) + len(r.out.token_ids)


def recompute_old_logprobs(policy: Policy, cfg: Config, parts: list[list[Rollout]], tag_ids: dict,
                           pad_id: int) -> None:  # fmt: skip
    """The old policy's log-probs of each part's rollouts as the trainer computes them, before any
    update of this batch, so a later part's ratio measures only the updates. Taken in the micro-batches
    `train_step` will form from the same part: bf16 matmuls are not batch-invariant on GPUs, so
    another padding or batch size would put kernel noise into the ratio."""
    model = policy.model
    device = next(model.parameters()).device
    model.eval()
    with policy.full_weights(), torch.no_grad():  # gathered once: ranks may run different counts
        for rolls in parts:
            for part in micro_batches([_length(r) for r in rolls], cfg.optim):
                chunk = [rolls[i] for i in part]
                ids, topo = _sequence_batch(chunk, pad_id, tag_ids)[:2]
                logp = topology_token_stats(model, ids.to(device), topo)[..., 0].float().cpu()
                for b, r in enumerate(chunk):
                    n = len(r.out.prompt_ids)
                    r.old = logp[b, n - 1 : n - 1 + len(r.out.token_ids)]


def train_step(policy: Policy, opt, sched, cfg: Config, rolls: list[Rollout], advantages, tag_ids: dict,
               pad_id: int, total_tokens):  # fmt: skip
    """One optimiser step; the loss is the token-mean over the kept rollouts of all ranks."""
    a, model = cfg.algo, policy.model
    device = next(model.parameters()).device
    stats = {"clip_fraction": 0.0, "entropy": 0.0, "logprob_gap": 0.0, "nonfinite": 0.0}
    model.train()
    opt.zero_grad(set_to_none=True)

    def run_chunk(part) -> None:
        chunk, adv = part
        ids, topo, mask, engine, old = _sequence_batch(chunk, pad_id, tag_ids)
        ids, mask, engine = ids.to(device), mask.to(device), engine.to(device)
        token_stats = topology_token_stats(model, ids, topo)  # chunked through the head: no [L, V] tensor
        logp, ent = token_stats[..., 0], token_stats[..., 1].detach()
        # The old policy is the trainer's own: this forward itself for the first (or only) update of
        # a batch (the ratio is exactly 1), recomputed before it for later parts. The engine's log-probs
        # differ by kernel noise, in bf16 enough for the clip to act on the only update; their gap
        # is logged as a rollout/trainer mismatch gauge.
        current = logp.detach()
        old = current if old is None else old.to(device)
        adv = adv.to(device)
        share = mask.sum() / max(total_tokens, 1)  # this micro-batch's share of the token-mean
        stats["logprob_gap"] += float(((current.float() - engine).abs() * mask).sum() / max(total_tokens, 1))
        if a.loss == "dapo":
            loss, st = dapo_loss(logp, old, adv, mask, a.clip_low, a.clip_high)
            stats["clip_fraction"] += st["clip_fraction"] * float(share)
        elif a.loss == "papo":
            loss = papo_loss(logp, adv, mask)
        else:
            raise ValueError(f"unknown loss {a.loss!r} (dapo or papo)")
        stats["nonfinite"] += not bool(torch.isfinite(loss))  # checked over all ranks after the backward passes
        (loss * share).backward()
        stats["entropy"] += float((ent * mask).sum() / max(total_tokens, 1))

    parts = micro_batches([_length(r) for r in rolls], cfg.optim)
    chunks = [([rolls[i] for i in part], advantages[part]) for part in parts]
    backward(policy, chunks, run_chunk, pad_id)
    stats = distributed.sum_floats(stats)
    check_losses(stats.pop("nonfinite"), opt)
    stats["grad_norm"] = optimizer_step(policy, opt, sched, cfg.optim.grad_clip)
    model.eval()
    return stats


def train_rl(cfg: Config, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    instruction = read_prompt_file(cfg.data.prompt_file)
    layout_texts(cfg.rollout.layout)  # an unknown layout fails here, not at the first fork
    run = Run(cfg, resume, progress, "RL", add_tags=True, overwrite=overwrite)
    policy, rank, world = run.policy, run.rank, run.world
    model, tok = policy.model, policy.tokenizer
    with policy.full_weights():
        llm = LLM(model, tok, kv_cache_gb=cfg.rollout.kv_cache_gb, attention=cfg.rollout.attention)
    problems = load_benchmark(cfg.data.source, cfg.data.size, cfg.data.problem_field, cfg.data.answer_field)
    problems = with_instruction(problems, instruction)
    reward_fn = get_reward(cfg.algo.reward)
    if cfg.algo.mini_batches < 1:
        raise ValueError(f"algo.mini_batches must be >= 1, got {cfg.algo.mini_batches}")
    opt, sched = make_optimizer(policy, cfg.optim, cfg.run.steps * cfg.algo.mini_batches)
    prompts = Stream(problems, cfg.run.seed)
    start = run.restore(opt, sched, prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    summary = {}
    with run.bar() as bar:
        task = bar.add_task("rl", total=cfg.run.steps, completed=start, info="")
        for step in range(start, cfg.run.steps):
            t0 = time.perf_counter()
            kept, seen, mine, dropped, filtered, rounds, base = [], [], {}, 0, 0, 0, 0
            need = cfg.rollout.prompts_per_step
            while need > 0 and rounds <= (cfg.algo.max_resample if cfg.algo.dynamic_sampling else 0):
                taken = prompts.take(need)  # the same on every rank; each samples its share
                share = [(base + i, p) for i, p in enumerate(taken) if (base + i) % world == rank]  # rounds rotate
                with policy.full_weights():
                    batch = rollouts(llm, cfg, share, step, rounds, reward_fn)
                mine |= {(r.group, r.sample): r for r in batch}
                summaries = sorted(distributed.gather([r.summary(llm.tags) | {"rank": rank} for r in batch]),
                                   key=lambda x: (x["group"], x["sample"]))  # fmt: skip
                seen += summaries
                base, rounds = base + len(taken), rounds + 1
                groups, n_dropped, n_filtered = select_groups(summaries, cfg.algo.schema_filter,
                                                              cfg.algo.dynamic_sampling)  # fmt: skip
                kept, dropped, filtered = kept + groups, dropped + n_dropped, filtered + n_filtered
                need = cfg.rollout.prompts_per_step - len(kept)
            gen_time = time.perf_counter() - t0
            llm.sleep()  # the KV pool's memory goes to the update; the next rollouts wake the engine
            flat = [x for g in kept for x in g]
            stats = {}
            if flat:
                rewards = torch.tensor([x["reward"] for x in flat])
                if cfg.algo.overlong_buffer:
                    lengths = torch.tensor([x["length"] for x in flat])
                    rewards = rewards + overlong_penalty(
                        lengths, cfg.rollout.max_tokens, cfg.algo.overlong_buffer, cfg.algo.overlong_factor
                    )
                group_of = [i for i, g in enumerate(kept) for _ in g]  # kept group of each rollout in `flat`
                adv_fn = {"group": group_advantages, "batch": batch_advantages}[cfg.algo.advantage]
                adv = adv_fn(rewards, torch.tensor(group_of))
                local = {
                    i: mine[x["group"], x["sample"]] for i, x in enumerate(flat) if (x["group"], x["sample"]) in mine
                }
                mini = cfg.algo.mini_batches
                updates, part_of = [], mini_batch_parts([x["rank"] for x in flat], mini)
                if mini > 1:  # before any update; part 0 is its own old policy (train_step)
                    later = [[local[i] for i in local if part_of[i] == j] for j in range(1, mini)]
                    recompute_old_logprobs(policy, cfg, later, llm.tags, pad)
                for j in range(mini):  # the kept rollouts in `mini` parts, one optimiser step each
                    if j not in part_of:
                        continue
                    mine_part = [i for i in local if part_of[i] == j]
                    rolls = [local[i] for i in mine_part]
                    total = sum(x["sampled"] for i, x in enumerate(flat) if part_of[i] == j)
                    updates.append(train_step(policy, opt, sched, cfg, rolls, adv[mine_part], llm.tags, pad, total))
                stats = {k: _mean([u[k] for u in updates]) for k in updates[0]}
            tokens = sum(x["total_tokens"] for x in seen)
            m = {
                "step": step + 1,
                "reward_mean": _mean([x["reward"] for x in seen]),
                "reward_std": float(torch.tensor([x["reward"] for x in seen]).std()) if len(seen) > 1 else 0.0,
                "accuracy": _mean([x["correct"] for x in seen]),
                "format_valid_rate": _mean([x["valid"] for x in seen]),
                "response_length": _mean([x["length"] for x in seen]),
                "parallel_trigger_rate": _mean([x["parallel_blocks"] > 0 for x in seen]),
                "blocks_per_response": _mean([x["blocks"] for x in seen]),
                "branches_per_block": sum(x["branches"] for x in seen) / max(1, sum(x["blocks"] for x in seen)),
                "token_parallelism": tokens / max(1, sum(x["critical_path"] for x in seen)),
                "critical_path": _mean([x["critical_path"] for x in seen]),
                "filtered": filtered,
                "dropped_groups": dropped,
                "kept_groups": len(kept),
                "sampling_rounds": rounds,
                "tokens_per_s": tokens / max(gen_time, 1e-9),
                "step_time": time.perf_counter() - t0,
                **stats,
            }
            run.log(m)
            run.write_samples("".join(
                f"=== step {step + 1} | {r.problem['id']} | reward {r.reward:+.2f}\n{r.out.text}\n\n"
                for r in list(mine.values())[: cfg.run.samples_per_step]
            ))  # fmt: skip
            summary = m
            bar.update(task, advance=1, info=f"reward {m['reward_mean']:+.2f} valid {m['format_valid_rate']:.2f}")
            run.maybe_save(step + 1, cfg.run.steps, opt, sched, prompts)
    run.close()
    return summary


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else math.nan
