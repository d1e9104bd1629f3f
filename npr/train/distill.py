"""Stage 2 data: self-distilled rejection sampling (NPR-Beta's training set).

The Stage-1 model answers each problem up to `tries` times (sequential decoding, temperature
1.0); a response is accepted only when it is correct, well-formed and executable by the
topology, and is stored in canonical form (docs/design.md §2) as text and as token ids. Up to `keep`
distinct responses are kept per problem. Output folder:

    examples.jsonl  one accepted example per line (problem record, prompt/response ids, text)
    attempts.jsonl  one line per finished problem (tries used, accepted, rejection reasons)
    stats.json      totals (acceptance rate, tries, plans per block, blocks per response)

A rerun with the same folder skips finished problems and never writes an example twice. Under
torchrun each rank decodes every world-th chunk of unfinished problems and appends to files of
its own (`examples.rankR.jsonl`), which rank 0 merges in problem order at the end (and at the
start, after an interrupted run, whatever the new number of ranks): sampling seeds are per
problem and try and the chunks are one process's, so the folder holds the same examples.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from npr import grammar
from npr.data import atomic_write, merge_parts, rank_part
from npr.engine import SamplingParams
from npr.progress import bar as progress_bar
from npr.tags import tag_ids
from npr.tasks import grade, prompt_ids
from npr.tokens import encode_pieces
from npr.topology import executable
from npr.train import distributed

EXAMPLES, ATTEMPTS, STATS = "examples.jsonl", "attempts.jsonl", "stats.json"


@dataclass
class DistillConfig:
    tries: int = 8  # responses sampled per problem at most (K)
    keep: int = 1  # accepted responses kept per problem at most (M)
    per_round: int = 4  # responses sampled per problem per round (stops early once `keep` are accepted)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    mode: str = "sequential"
    repetition_penalty: float = 1.0
    seed: int = 0
    chunk: int = 32  # problems per engine call; progress is saved between chunks
    layout: str = "canonical"  # the layout the accepted answers are encoded in: the one Stage 2 and 3 decode in


def judge(
    problem: dict, text: str, tokenizer, layout: str = "canonical"
) -> tuple[str | None, list[int], grammar.Response]:
    """(rejection reason or None, canonical response ids in `layout`, parsed response)."""
    resp = grammar.parse(text)
    if not resp.valid:
        return "malformed", [], resp
    if not grade(problem, text):
        return "incorrect", [], resp
    ids = encode_pieces(tokenizer, grammar.canonical_pieces(resp, layout))
    if executable(ids, tag_ids(tokenizer)) is not None:
        return "not executable", [], resp
    return None, ids, resp


def sampling(cfg: DistillConfig, seed: int) -> SamplingParams:
    """Stage-1 style sampling: the model writes its own structure (nothing enforced)."""
    return SamplingParams(
        mode=cfg.mode,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_tokens,
        enforce_structure=False,
        repetition_penalty=cfg.repetition_penalty,
        seed=seed,
    )


def run_distill(llm, problems: list[dict], out_dir: str | Path, cfg: DistillConfig, progress: bool = True) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = distributed.rank_world()
    distributed.check_shared(out)
    tok = llm.tokenizer
    meta = {"tag_ids": tag_ids(tok), "vocab_size": len(tok), "config": asdict(cfg)}
    index = {}
    for i, p in enumerate(problems):
        index.setdefault(p["id"], i)
    # what is done is rank 0's reading, sent to all (another node may still see the files unmerged)
    done, kept = distributed.on_rank0(lambda: _start(out, index))
    seen = set(kept)  # dedupe across reruns: the accepted answers of problems not marked done
    prior = Counter(pid for pid, _ in kept)  # a problem cut by a crash keeps what it had accepted
    unique = [problems[i] for pid, i in index.items() if pid not in done]  # each id once, first place
    # whole chunks to each rank: the engine decodes the batches one process would
    chunks = [unique[c : c + cfg.chunk] for c in range(0, len(unique), cfg.chunk)][rank::world]
    part_examples, part_attempts = (rank_part(out / name, rank, world) for name in (EXAMPLES, ATTEMPTS))
    accepted = 0
    shown = len(problems) - len(unique) if world == 1 else 0  # under torchrun the bar shows rank 0's share
    with progress_bar("distill", progress) as bar:
        task = bar.add_task("distill", total=shown + sum(map(len, chunks)), completed=shown, info="")
        for chunk in chunks:
            state = {p["id"]: {"tries": 0, "accepted": [], "reasons": Counter()} for p in chunk}
            while True:
                todo = [p for p in chunk if prior[p["id"]] + len(state[p["id"]]["accepted"]) < cfg.keep
                        and state[p["id"]]["tries"] < cfg.tries]  # fmt: skip
                if not todo:
                    break
                prompts, params, meta_rows = [], [], []
                for p in todo:
                    st = state[p["id"]]
                    pids = prompt_ids(tok, p)
                    for j in range(st["tries"], min(cfg.tries, st["tries"] + cfg.per_round)):
                        seed = zlib.crc32(f"{cfg.seed}/{p['id']}/{j}".encode())
                        prompts.append(pids)
                        params.append(sampling(cfg, seed))
                        meta_rows.append((p, j, pids))
                for (p, j, pids), o in zip(meta_rows, llm.generate(prompts, params)):
                    st = state[p["id"]]
                    st["tries"] = max(st["tries"], j + 1)
                    if prior[p["id"]] + len(st["accepted"]) >= cfg.keep:
                        continue
                    reason, rids, resp = judge(p, o.text, tok, cfg.layout)
                    text = grammar.canonical(resp) if reason is None else ""
                    if reason is None and (p["id"], text) in seen:
                        reason = "duplicate"
                    if reason is not None:
                        st["reasons"][reason] += 1
                        continue
                    seen.add((p["id"], text))
                    st["accepted"].append({
                        "id": p["id"],
                        "record": p,
                        "prompt_ids": pids,
                        "response": text,
                        "response_ids": rids,
                        "layout": cfg.layout,  # of response_ids (a resumed run may change it)
                        "try": j,
                        "plans": [len(b.plans) for b in resp.blocks],
                    })  # fmt: skip
            with part_examples.open("a", encoding="utf-8") as f:  # examples first: attempts marks done
                for p in chunk:
                    for e in state[p["id"]]["accepted"]:
                        f.write(json.dumps(e) + "\n")
                        accepted += 1
            with part_attempts.open("a", encoding="utf-8") as f:
                for p in chunk:
                    st = state[p["id"]]
                    row = {"id": p["id"], "tries": st["tries"], "accepted": prior[p["id"]] + len(st["accepted"]),
                           "reasons": dict(st["reasons"])}  # fmt: skip
                    f.write(json.dumps(row) + "\n")
            bar.update(task, advance=len(chunk), info=f"{accepted} accepted now")
    distributed.wait_for_all(out, "distill-done")
    return distributed.on_rank0(lambda: _summarize(out, index, meta))


def _merge(out: Path, index: dict) -> tuple[list[dict], list[dict]]:
    """The ranks' parts merged into examples.jsonl and attempts.jsonl, in problem order (and the
    ranks' end marks cleared)."""
    distributed.clear_marks(out, "distill-done")

    def order(r: dict) -> int:
        return index.get(r["id"], len(index))

    examples = merge_parts(out / EXAMPLES, key=lambda e: (e["id"], e["response"]), order=order)
    return examples, merge_parts(out / ATTEMPTS, key=lambda a: a["id"], order=order)


def _start(out: Path, index: dict) -> tuple[set, list[tuple]]:
    """(ids of finished problems, (id, response) of the examples of unfinished ones)."""
    examples, attempts = _merge(out, index)
    done = {a["id"] for a in attempts}
    return done, [(e["id"], e["response"]) for e in examples if e["id"] not in done]


def _summarize(out: Path, index: dict, meta: dict) -> dict:
    examples, attempts = _merge(out, index)
    stats = statistics(attempts, examples)
    atomic_write(out / STATS, json.dumps({**stats, **meta}, indent=2))
    return stats


def statistics(attempts: list[dict], examples: list[dict]) -> dict:
    tries = sum(a["tries"] for a in attempts)
    accepted = sum(a["accepted"] for a in attempts)
    reasons = Counter()
    for a in attempts:
        reasons.update(a["reasons"])
    plans = Counter(k for e in examples for k in e["plans"])
    blocks = Counter(len(e["plans"]) for e in examples)
    return {
        "problems": len(attempts),
        "problems_with_an_example": sum(a["accepted"] > 0 for a in attempts),
        "examples": len(examples),
        "tries": tries,
        "acceptance_rate": accepted / tries if tries else 0.0,
        "tries_per_problem": tries / len(attempts) if attempts else 0.0,
        "rejections": dict(reasons),
        "plans_per_block": {str(k): v for k, v in sorted(plans.items())},
        "blocks_per_response": {str(k): v for k, v in sorted(blocks.items())},
    }
