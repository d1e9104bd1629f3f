"""Requests, branches and runs while decoding, and the `Completion` handed back."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from npr.engine.kv_pool import Segment
from npr.engine.params import SamplingParams
from npr.engine.structure import TagState
from npr.topology import Layout


@dataclass(eq=False)
class Run:
    """The tokens of one segment (main line or one step) and what was recorded for each."""

    index: int  # creation order = canonical order of the trajectory
    key: tuple[int, int]  # (block, step) for steps, (block before it, -1) for main runs: seeds the noise
    seg: Segment = field(default_factory=Segment)
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    offset: int = 0  # prompt tokens at the start (first run only)
    computed: int = 0  # tokens whose keys/values are in the pool
    target: list[int] | None = None  # a replayed request's tokens for this run (set on first use)
    noise: int = -1  # the run's part of its noise keys (sampler.noise_base; set on first use)


@dataclass(eq=False)
class Block:
    index: int
    plans: int
    prefix: list[Run]  # context shared by the steps
    steps: list[Run] = field(default_factory=list)
    paths: list[int] = field(default_factory=list)  # critical path at the end of each step
    ended: int = 0
    held: bool = False  # the block holds references on prefix and steps until the join
    prefix_len: int = 0  # context tokens before the steps (the steps' shared part of their rows)
    rows: list[int] = field(default_factory=list)  # context-table rows of the steps, kept until the join


@dataclass(eq=False)
class Branch:
    """A live decoding stream: writes `run`, attends over `context` (ancestors, then `run`)."""

    req: Request
    run: Run
    context: list[Run]
    state: TagState
    path: int  # completion tokens on this root-to-here path
    block: Block | None = None
    step: int = -1
    done: bool = False  # its last token is sampled; it retires once that token is in the pool
    dropped: bool = False  # its request was finished or preempted
    row: int = -1  # its row in the context table
    length: int = 0  # context tokens already in that row
    # pieces of other rows to copy in first: (row, start, end) in tokens, then (start, end) in
    # pages, end -1 = all the row's pages
    sources: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    frees: list[int] = field(default_factory=list)  # rows to release once the sources are copied

    @property
    def pending(self) -> int:
        return len(self.run.tokens) - self.run.computed

    @property
    def tokens(self) -> int:
        """Context tokens including those not yet in the pool."""
        return self.length + self.pending


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    replay: list[list[int]] | None = None  # per-run token targets instead of sampling (benchmarks, tests)
    resumed: bool = False  # `replay` holds the tokens decoded before a preemption: it samples past them
    replay_logprobs: list[list[float]] | None = None  # (resumed) the log-probs recorded with those tokens
    runs: list[Run] = field(default_factory=list)
    branches: list[Branch] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    total: int = 0  # completion tokens over all branches
    max_path: int = 0
    finish_reason: str | None = None
    error: str | None = None
    refused: Counter = field(default_factory=Counter)
    preemptions: int = 0
    stops: tuple[int, ...] = ()  # end-of-sequence ids (set on admission)
    started: float = 0.0
    ended: float = 0.0

    def reset(self) -> None:
        """Forget the KV progress (after a preemption): it decodes again from the prompt, writing the
        tokens it had chosen before sampling on. Sampling them again from the seed would give the
        same tokens only where logits are bitwise batch-invariant, which GPU kernels in bf16 are
        not, and a client may already hold them (a stream)."""
        if self.replay is None or self.resumed:
            self.replay, self.resumed = [run.tokens[run.offset :] for run in self.runs], True
            self.replay_logprobs = [run.logprobs[run.offset :] for run in self.runs]
        self.runs, self.branches, self.blocks = [], [], []
        self.total = self.max_path = 0
        self.refused = Counter()
        self.preemptions += 1


@dataclass
class Completion:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # canonical order: main line, then each block's steps in order, ...
    text: str
    logprobs: list[float]  # of each token under the model (0.0 where forced)
    forced: list[bool]  # True where the engine wrote the token (fork/join), not the model
    positions: list[int]  # position ids of the completion tokens (docs/design.md §3)
    blocks: list[dict]  # {"plans": k, "branches": [[start, end), ...]} spans in token_ids
    finish_reason: str
    stats: dict
    error: str | None = None
    layout: Layout | None = None  # topology of prompt + completion as decoded (also when truncated)


def completion(req: Request, decode) -> Completion:
    ids, lps, forced, pos, spans = [], [], [], [], {}
    block, branch = [], []
    for run in req.runs:
        start = len(ids)
        ids += run.tokens[run.offset :]
        lps += run.logprobs[run.offset :]
        forced += run.forced[run.offset :]
        pos += run.positions[run.offset :]
        spans[run.index] = [start, len(ids)]
        is_step = run.key[1] >= 0
        block += [run.key[0] if is_step else -1] * (len(ids) - start)
        branch += [run.key[1] if is_step else -1] * (len(ids) - start)
    blocks = [{"plans": b.plans, "branches": [spans[r.index] for r in b.steps]} for b in req.blocks]
    stats = {
        "total_tokens": req.total,
        "critical_path_tokens": req.max_path,
        "blocks": len(req.blocks),
        "branches": sum(len(b.steps) for b in req.blocks),
        "parallel_blocks": sum(len(b.steps) >= 2 for b in req.blocks),
        "refused_forks": dict(req.refused),
        "preemptions": req.preemptions,
        "wall_time": (req.ended or time.perf_counter()) - req.started,
    }
    n = len(req.prompt)
    complete = all(b.ended == b.plans and len(req.runs) > b.steps[-1].index + 1 for b in req.blocks)
    lay = Layout(list(range(n)) + pos, [-1] * n + block, [-1] * n + branch, complete)
    return Completion(
        req.id, list(req.prompt), ids, decode(ids), lps, forced, pos, blocks, req.finish_reason, stats, req.error, lay
    )
