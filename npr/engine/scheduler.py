"""Scheduling: admission, chunked prefill, preemption, and the schema's fork/join bookkeeping.

`schedule()` picks the tokens the next forward computes: every decoding branch's new tokens
first, then prompt chunks, all within `max_batch_tokens`; it preempts the newest request
when the pool cannot hold them. `postprocess()` applies the sampled tokens to the schema:
fork k branches on `</guideline>`, join on the last `</step>`, finish on stop, budgets,
repetition or an illegal structure. Forks count against `max_num_seqs` like admissions;
after a preemption, admission waits until a request finishes, so bursts of forks do not
make requests bounce in and out of the pool.
"""

from __future__ import annotations

import time
from collections import deque

from npr.engine.context import ContextTable
from npr.engine.kv_pool import KVPool
from npr.engine.params import SamplingParams
from npr.engine.request import Block, Branch, Request, Run
from npr.engine.structure import TagState
from npr.tags import GUIDELINE_END, STEP, STEP_END, TAGS, TAKEAWAY, tag_ids
from npr.topology import join_position, step_start

MIN_BLOCK = 12  # tokens of the smallest block: one plan, one step, a takeaway


class Scheduler:
    def __init__(
        self,
        pool: KVPool,
        table: ContextTable,
        tokenizer,
        max_num_seqs: int,
        max_batch_tokens: int,
        eos: tuple[int, ...] = (),  # the default stop ids (engine.stop_ids)
        watermark: float = 0.01,
    ):
        if max_num_seqs < 1 or max_batch_tokens < 1:
            raise ValueError("max_num_seqs and max_batch_tokens must be >= 1")
        if max_batch_tokens < max_num_seqs:  # else the branches left out of a step would starve
            raise ValueError(
                f"max_batch_tokens ({max_batch_tokens}) must be at least max_num_seqs ({max_num_seqs}): every live "
                "branch decodes a token each step, and a sibling left out would fall behind the others"
            )
        self.pool, self.table, self.tokenizer = pool, table, tokenizer
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self.watermark = max(1, int(watermark * pool.num_pages))  # free pages kept for running requests
        self.tags = tag_ids(tokenizer)
        self.tag_of = {i: t for t, i in self.tags.items() if t in TAGS}
        self.eos = eos
        self._texts: dict[str, list[int]] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: dict[int, Request] = {}
        self.paused = False  # admission waits after a preemption until a request finishes
        # the last step's work while it is pure decoding (one token per branch, every branch) and
        # no event has changed which branches run: the next step's work is the same list
        self._steady: list[tuple[Branch, int]] | None = None

    # ---- admission and scheduling -------------------------------------------------------------

    def live(self) -> int:
        return sum(not b.done for r in self.running for b in r.branches)

    def admit(self) -> None:
        if not self.waiting:
            return
        live, spare = self.live(), self._spare_pages()
        while self.waiting and live < self.max_num_seqs and not (self.paused and self.running):
            req = self.waiting[0]
            need = -(-(len(req.prompt) + 1) // self.pool.page_size)
            if len(req.prompt) + 1 > self.pool.capacity:  # its prompt and first token, alone
                self.waiting.popleft()
                self.finish(req, "aborted", f"prompt of {len(req.prompt)} tokens exceeds the KV pool")
                self.finished[req.id] = req
                continue
            if self.running and need + self.watermark > spare:
                break
            self.waiting.popleft()
            self.paused, self._steady = False, None
            req.started = req.started or time.perf_counter()
            req.stops = self.stop_ids(req.params)
            n = len(req.prompt)  # the prompt as forced tokens at positions 0..n-1, recorded in bulk
            run = Run(0, (-1, -1), tokens=list(req.prompt), positions=list(range(n)), logprobs=[0.0] * n,
                      forced=[True] * n, offset=n)  # fmt: skip
            req.runs.append(run)
            self.pool.acquire([run.seg])
            req.branches.append(Branch(req, run, [run], TagState(), path=0, row=self.table.alloc()))
            self.running.append(req)
            live += 1
            spare -= self.pool.pages_needed(run.seg, len(req.prompt))  # its prompt is still to prefill

    def _spare_pages(self) -> int:
        """Free pages minus those the prompts still to prefill will take."""
        owed = sum(self.pool.pages_needed(b.run.seg, b.pending) for r in self.running for b in r.branches)
        return self.pool.free_pages - owed

    def schedule(self) -> list[tuple[Branch, int]]:
        """(branch, new tokens) for the next forward; preempts the newest request until they fit.

        Branches whose last token is sampled (forks' parents, ended steps) always go first and
        whole: the rows of the branches forked or joined from them are copied right after.
        Then decoding requests, then prompt chunks and forced tokens, within `max_batch_tokens`.
        A request's branches go together: all of them sample in a step or none does, so sibling
        steps stay token for token in step, and the shared budgets end a block where they would
        in any other batch (a request's tokens never depend on what else the engine runs). A
        decoding request that does not fit waits one step whole; a request with too many forced
        tokens for the step computes all but each branch's last, so none samples before the others.
        """
        if self._steady is not None:  # the same branches as last step, one token each
            work = self._steady
            if self.pool.reserve_each([b.run.seg for b, _ in work]):
                return work
            self._steady = None  # the pool is short: the general path below preempts
        while True:
            flushed, decode, chunks = [], [], []  # decode, chunks: (a request's rows, their tokens)
            for r in self.running:
                rows, total = [], 0
                for b in r.branches:
                    n = b.pending
                    if n:
                        if b.done:
                            flushed.append((b, n))
                        else:
                            rows.append((b, n))
                            total += n
                if rows:
                    (decode if total == len(rows) else chunks).append((rows, total))
            # pure decoding: the next step's work is this one's until an event changes the branches
            steady = not flushed and not chunks
            budget, work = self.max_batch_tokens - len(flushed), flushed
            for rows, total in decode + sorted(chunks, key=lambda c: min(n for _, n in c[0])):  # shortest first
                if total > budget:  # it does not fit whole
                    if len(rows) == 1:  # a lone branch (a prompt) takes part of its chunk
                        rows = [(rows[0][0], budget)] if budget > 0 else []
                    else:  # all but each branch's last token, so none samples before the others
                        share = budget // len(rows)  # (a decoding request gets none: it waits whole)
                        rows = [(b, min(n - 1, share)) for b, n in rows if min(n - 1, share) > 0]
                    total = sum(n for _, n in rows)
                work += rows
                budget -= total
            if self.pool.reserve_all([(b.run.seg, n) for b, n in work]):
                # (every decoding request in: none waited for room)
                self._steady = work if steady and len(work) == sum(len(rows) for rows, _ in decode) else None
                return work
            if not self._preempt(keep=None):
                return []

    def is_steady(self, work: list[tuple[Branch, int]]) -> bool:
        """Whether `work` is a pure decode step's that the next step gets again, unless an event
        (a fork, a join, a finish, an arrival, a preemption) changes the branches in between."""
        return work is self._steady

    def to_copy(self) -> list[Branch]:
        """Branches whose rows still need their sources copied in (after this step's writes)."""
        if self._steady is not None:  # a fork's or join's step flushes its parent or steps: never steady
            return []
        return [b for r in self.running for b in r.branches if b.sources]

    def _preempt(self, keep: Request | None) -> bool:
        """Send the newest running request (other than `keep`) back to the queue; False if none."""
        victims = [r for r in self.running if r is not keep]
        if not victims:
            return False
        victim = victims[-1]
        self.running.remove(victim)
        self._steady = None
        if not self.running and keep is None:
            self.finish(victim, "aborted", "the KV pool cannot hold this request alone; give the engine more pages")
            self.finished[victim.id] = victim
            return False
        self._drop(victim)
        victim.reset()
        self.waiting.appendleft(victim)
        self.paused = True
        return True

    # ---- applying sampled tokens --------------------------------------------------------------

    def postprocess(
        self,
        work: list[tuple[Branch, int]],
        sampled: list[Branch],
        toks: list[int],
        lps: list[float],
        targets: list[int | None],
    ):
        """Apply the sampled tokens; `targets` holds each sampled branch's `replay_target`."""
        for b, n in work:
            b.run.computed += n
            b.length += n
        for b, tok, lp, target in zip(sampled, toks, lps, targets):
            if not b.dropped and b.req.finish_reason is None:
                self._accept(b, tok, lp, target == -1)
                if target is not None and b.req.resumed:
                    self._write_ahead(b)
        for b, _ in work:  # the flushed branches come first; the first with a token pending ends them
            if b.pending:
                break
            if b.done and not b.dropped and b.req.finish_reason is None:
                self._retire(b)
        for req in [r for r in self.running if r.finish_reason is not None]:
            self.running.remove(req)
            self.finished[req.id] = req
            self.paused = False

    def replay_target(self, b: Branch) -> int | None:
        """The token a replayed request writes next (-1 past its end: it finishes, unless it is a
        preempted request resuming, which samples on), or None when it samples."""
        run = b.run
        target = run.target
        if target is None:
            replay = b.req.replay
            if replay is None:
                return None
            target = run.target = replay[run.index] if run.index < len(replay) else []
        j = len(run.tokens) - run.offset
        return target[j] if j < len(target) else None if b.req.resumed else -1

    def _write_ahead(self, b: Branch) -> None:
        """A request resuming after a preemption writes the tokens it had decoded, up to its run's
        next tag, at once, with the log-probs recorded for them: the next step computes them as a
        chunk, as it does a prompt. One a step, a request preempted at 20k tokens would take 20k
        steps (minutes) to come back. Tags still come one a step, as sampled replay targets, so
        forks, joins and step ends happen where they did, and a branch that ends (`done`) never
        has more than its last token to compute. Each token goes through `_accept`: it cannot
        stop the request or exceed a budget, since the request had accepted it before."""
        run, req = b.run, b.req
        target, logprobs = run.target, req.replay_logprobs[run.index]
        j = start = len(run.tokens) - run.offset
        while j < len(target) and target[j] not in self.tag_of and not b.done and req.finish_reason is None:
            self._accept(b, target[j], logprobs[j], False)
            j += 1
        if j > start:
            self._steady = None  # its next step computes more than one token

    def block_fits(self, b: Branch) -> bool:
        """Whether a minimal block still fits both budgets (counted once as a refusal when not)."""
        p, req = b.req.params, b.req
        fits = req.total + MIN_BLOCK <= p.max_tokens and b.path + MIN_BLOCK <= p.path_budget
        if not fits and b.state.phase == "out" and not req.refused.get("block_budget"):
            req.refused["block_budget"] += 1
        return fits

    def stop_ids(self, p: SamplingParams) -> tuple[int, ...]:
        return self.eos if p.stop_token_ids is None else tuple(p.stop_token_ids)

    def _accept(self, b: Branch, tok: int, logprob: float, replay_ended: bool) -> None:
        req, p, run = b.req, b.req.params, b.run
        if replay_ended:
            return self.finish(req, "stop")
        if req.total >= p.max_tokens:
            return self.finish(req, "length")
        if b.path >= p.path_budget:
            return self.finish(req, "path_length")
        self._write(b, tok, logprob)
        tag = self.tag_of.get(tok)
        if tag is None:
            if tok in req.stops:
                if b.state.phase == "out" or p.mode != "parallel":
                    return self.finish(req, "stop")
                return self.finish(req, "invalid_schema", f"end of sequence inside <{b.state.phase}>")
            if p.stop and b.state.phase == "out" and self._hit_stop(run, p.stop):
                return self.finish(req, "stop")
        elif not b.state.legal(tag):
            if p.mode == "parallel":
                return self.finish(req, "invalid_schema", f"illegal {tag} in phase {b.state.phase!r}")
        else:
            b.state.advance(tag)
            if p.mode == "parallel" and tag == GUIDELINE_END:
                return self._fork(b)
            if p.mode == "parallel" and tag == STEP_END:
                return self._end_step(b)
        if _repeating(run, p.repetition_limit):
            return self.finish(req, "repetition")

    @staticmethod
    def _write(b: Branch, tok: int, logprob: float = 0.0, forced: bool = False, position: int | None = None) -> None:
        """Append a completion token to the branch's run and charge it to both budgets."""
        run = b.run  # this runs for every token: no call more than needed
        run.tokens.append(tok)
        run.positions.append(run.positions[-1] + 1 if position is None else position)
        run.logprobs.append(logprob)
        run.forced.append(forced)
        req = b.req
        req.total += 1
        b.path += 1
        if b.path > req.max_path:  # a comparison, not max(): this runs for every token
            req.max_path = b.path

    def _text(self, text: str) -> list[int]:
        """Token ids of forced text (cached: the same few labels recur in every block)."""
        if text not in self._texts:
            self._texts[text] = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        return self._texts[text]

    def _fork(self, b: Branch) -> None:
        self._steady = None
        req, p = b.req, b.req.params
        k = b.state.plans
        forced = [[self.tags[STEP], *self._text(p.fork_text.replace("{i}", str(i + 1)))] for i in range(k)]
        if k > p.max_plans:
            req.refused["too_many_plans"] += 1
            return self.finish(req, "invalid_schema", f"{k} plans exceed max_plans={p.max_plans}")
        if k > self.max_num_seqs:
            req.refused["max_num_seqs"] += 1
            return self.finish(req, "aborted", f"{k} plans exceed the engine's max_num_seqs={self.max_num_seqs}")
        if req.total + sum(len(f) + 1 for f in forced) + 2 > p.max_tokens:
            req.refused["budget"] += 1
            return self.finish(req, "length")
        if b.path + max(len(f) for f in forced) + 3 > p.path_budget:
            req.refused["path_budget"] += 1
            return self.finish(req, "path_length")
        while self.live() - 1 + k > self.max_num_seqs and self._preempt(keep=req):
            pass  # forks count against max_num_seqs: make room by preempting newer requests
        b.done = True
        block = Block(len(req.blocks), k, list(b.context), prefix_len=b.tokens)
        req.blocks.append(block)
        start = step_start(b.run.positions[-1])
        for i, toks in enumerate(forced):
            run = Run(len(req.runs), (block.index, i))
            req.runs.append(run)
            row = self.table.alloc()
            child = Branch(req, run, block.prefix + [run], TagState("step"), b.path, block, i, row=row)
            child.length, child.sources = block.prefix_len, [(b.row, 0, block.prefix_len, 0, -1)]
            self.pool.acquire([r.seg for r in child.context])
            for j, t in enumerate(toks):
                self._write(child, t, forced=True, position=start + j)
            block.steps.append(run)
            block.paths.append(0)
            block.rows.append(row)
            req.branches.append(child)
        # the block keeps its prefix and finished steps alive until the join
        self.pool.acquire([r.seg for r in block.prefix + block.steps])
        block.held = True

    def _end_step(self, b: Branch) -> None:
        self._steady = None
        req, block = b.req, b.block
        b.done = True
        block.ended += 1
        block.paths[b.step] = b.path
        if block.ended < block.plans:
            return
        path = max(block.paths)
        join = [self.tags[TAKEAWAY], *self._text(req.params.join_text)]
        if req.total + len(join) > req.params.max_tokens:
            return self.finish(req, "length")
        if path + len(join) > req.params.path_budget:
            return self.finish(req, "path_length")
        run = Run(len(req.runs), (block.index, -1))
        req.runs.append(run)
        joined = Branch(
            req, run, block.prefix + block.steps + [run], TagState("takeaway"), path, row=self.table.alloc()
        )
        at, p = block.prefix_len, block.prefix_len
        pages = sum(len(r.seg.pages) for r in block.prefix)
        joined.sources = [(block.rows[0], 0, p, 0, pages)]
        for row, step in zip(block.rows, block.steps):
            joined.sources.append((row, p, p + len(step.tokens), pages, -1))
            at += len(step.tokens)
        joined.length, joined.frees, block.rows = at, block.rows, []
        self.pool.acquire([r.seg for r in joined.context])
        self._unhold(block)
        at = join_position([r.positions[-1] for r in block.steps])
        for j, t in enumerate(join):
            self._write(joined, t, forced=True, position=at + j)
        req.branches.append(joined)

    def _hit_stop(self, run: Run, stops: list[str]) -> bool:
        tail = self.tokenizer.decode(run.tokens[max(run.offset, len(run.tokens) - 16) :])
        return any(s and s in tail for s in stops)

    # ---- lifecycle ----------------------------------------------------------------------------

    def _retire(self, b: Branch) -> None:
        self._steady = None
        self.pool.release([r.seg for r in b.context])
        if b.block is None:  # step rows belong to their block until the join has copied them
            self.table.release(b.row)
        b.req.branches.remove(b)

    def _drop(self, req: Request) -> None:
        for b in req.branches:
            self.pool.release([r.seg for r in b.context])
            if b.block is None:
                self.table.release(b.row)
            for row in b.frees:
                self.table.release(row)
            b.frees, b.dropped = [], True
        for block in req.blocks:
            self._unhold(block)
            for row in block.rows:
                self.table.release(row)
            block.rows = []
        req.branches = []

    def _unhold(self, block: Block) -> None:
        if block.held:
            self.pool.release([r.seg for r in block.prefix + block.steps])
            block.held = False

    def abort(self, request_id: int) -> Request | None:
        """Stop a waiting or running request now and free its pages and rows (a client went away).
        Called between steps; the request is returned finished with reason "aborted", or None when
        it is not waiting or running."""
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                break
        else:
            req = next((r for r in self.running if r.id == request_id), None)
            if req is None:
                return None
            self.running.remove(req)
            self.paused = False
        self._steady = None
        self.finish(req, "aborted", "cancelled")
        return req

    def finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.finish_reason is not None:
            return
        self._steady = None
        self._drop(req)
        req.finish_reason, req.error = reason, error
        req.ended = time.perf_counter()


# A loop is also this long before it ends a run: Qwen's tokenizer writes a number a digit a token,
# so 10**8 or 0.000000001 is eight repeats of "0", and a list of eight 1s eight of " 1,".
MIN_REPEAT_SPAN = 64


def _repeating(run: Run, limit: int) -> bool:
    """Whether the run ends with a pattern of 1-16 tokens repeated `limit` times and over at least
    MIN_REPEAT_SPAN tokens (reads only that tail)."""
    toks = run.tokens
    n, last = len(toks) - run.offset, toks[-1]
    if n < max(limit, MIN_REPEAT_SPAN) or (limit > 1 and last not in toks[-17:-1]):
        return False  # too short for any repeat, or the last token ends none (see the cheap reject below)
    for period in range(1, 17):
        repeats = max(limit, -(-MIN_REPEAT_SPAN // period))
        if n < period * repeats:
            continue  # spans are not monotone in the period (3 x 22 = 66 tokens, 4 x 16 = 64)
        if limit > 1 and last != toks[-1 - period]:
            continue  # cheap reject: a repeat of this period ends with the token `period` back
        tail = toks[-period * repeats :]
        if tail == tail[:period] * repeats:
            return True
    return False
