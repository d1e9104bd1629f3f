"""The NPR engine: continuous batching of branching trajectories over a paged KV pool.

One `step()` = schedule (admit, preempt if the pool is short) -> one model forward over
the pending tokens of every live branch of every request -> sample -> apply the schema:
fork k branches on `</guideline>`, join on the last `</step>`, finish on stop, budgets,
repetition or an illegal structure. Nothing falls back to sequential decoding silently.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch

from npr.engine import attention
from npr.engine.attention import Batch, model_shape
from npr.engine.kv_pool import KVPool
from npr.engine.params import SamplingParams
from npr.engine.request import Block, Branch, Completion, Request, Run, completion
from npr.engine.sampler import choose, noise_seed, penalize
from npr.engine.structure import Allowed, TagState
from npr.tags import GUIDELINE_END, STEP, STEP_END, TAGS, TAKEAWAY, tag_ids
from npr.topology import join_position, step_start

DEFAULT_KV_GB = 0.25


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder, or a training run folder (its latest checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    pointer = path / "checkpoints" / "latest.json"
    if not (path / "config.json").exists() and pointer.exists():
        return path / "checkpoints" / json.loads(pointer.read_text())["path"]
    return path


def load(path: str | Path, dtype=None, device=None, trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer from a local directory (safetensors only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or "auto", use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval(), tok


class LLM:
    """`LLM(model, tokenizer).generate(prompts, SamplingParams(...))` -> list of `Completion`."""

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        kv_cache_gb: float | None = None,
        num_pages: int | None = None,
        page_size: int = 16,
        max_num_seqs: int = 256,
        max_batch_tokens: int = 8192,
        trust_remote_code: bool = False,
    ):
        if isinstance(model, (str, Path)):
            model, tokenizer = load(model, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            raise ValueError("LLM needs a tokenizer when given a model object")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        layers, kv_heads, head_dim = model_shape(model)
        dtype = next(model.parameters()).dtype
        if num_pages is None:
            gb = kv_cache_gb
            if gb is None:  # GPU: most of what the weights left free; CPU: a small fixed pool
                gb = (
                    0.6 * torch.cuda.mem_get_info(self.device)[0] / 2**30
                    if self.device.type == "cuda"
                    else DEFAULT_KV_GB
                )
            num_pages = KVPool.pages_for_budget(gb, layers, kv_heads, head_dim, page_size, dtype)
        self.pool = KVPool(layers, kv_heads, head_dim, num_pages, page_size, dtype, self.device)
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self.tags = tag_ids(tokenizer)
        self.tag_of = {i: t for t, i in self.tags.items()}
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self._labels: dict[int, list[int]] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: dict[int, Request] = {}
        self._next_id = 0
        attention.register()
        self._check_backend()

    # ---- public API ---------------------------------------------------------------------------

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, replay: list[list[int]] | None = None
    ) -> int:
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        req = Request(self._next_id, ids, params, seed, replay=replay)
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: bool = False,
        replay: Sequence[list[list[int]]] | None = None,
    ) -> list[Completion]:
        if isinstance(prompts, str):
            prompts = [prompts]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        ids = [self.add_request(p, sp, replay[i] if replay else None) for i, (p, sp) in enumerate(zip(prompts, plist))]
        bar = None
        if progress:
            from rich.progress import Progress

            bar = Progress(transient=True)
            task = bar.add_task("generating", total=len(ids))
            bar.start()
        try:
            while self.waiting or self.running:
                self.step()
                if bar:
                    bar.update(task, completed=sum(i in self.finished for i in ids))
        finally:
            if bar:
                bar.stop()
        return [self._completion(self.finished.pop(i)) for i in ids]

    # ---- one engine step ----------------------------------------------------------------------

    def step(self) -> None:
        self._admit()
        groups = self._schedule()
        if not groups:
            return
        logits = self._forward(groups)
        flushed = [g for g in groups if g.done]  # their last token is now in the pool
        for g in groups:
            g.run.computed = len(g.run.tokens)
        for branch, row in zip([g for g in groups if not g.done], logits):
            if branch.req.finish_reason is None:
                self._sample(branch, row)
        for g in flushed:
            if g.req.finish_reason is None:
                self._retire(g)
        for req in [r for r in self.running if r.finish_reason is not None]:
            self.running.remove(req)
            self.finished[req.id] = req

    def _admit(self) -> None:
        live = sum(len(r.branches) for r in self.running)
        budget = self.max_batch_tokens
        while self.waiting and live < self.max_num_seqs:
            req = self.waiting[0]
            need = -(-(len(req.prompt) + 1) // self.pool.page_size)
            if need > self.pool.num_pages:
                self.waiting.popleft()
                self._finish(req, "aborted", f"prompt of {len(req.prompt)} tokens exceeds the KV pool")
                self.finished[req.id] = req
                continue
            if self.running and (need + live > self.pool.free_pages or len(req.prompt) > budget):
                break
            self.waiting.popleft()
            req.started = req.started or time.perf_counter()
            run = Run(0, (-1, -1), offset=len(req.prompt))
            for i, t in enumerate(req.prompt):
                run.add(t, i, 0.0, True)
            req.runs.append(run)
            branch = Branch(req, run, [run], TagState(), path=0)
            self.pool.acquire([run.seg])
            req.branches.append(branch)
            self.running.append(req)
            live += 1
            budget -= len(req.prompt)

    def _schedule(self) -> list[Branch]:
        """Branches with tokens to compute; preempts the newest request until their pages fit."""
        while True:
            groups = [b for r in self.running for b in r.branches if b.pending]
            need = sum(self.pool.pages_needed(b.run.seg, b.pending) for b in groups)
            if need <= self.pool.free_pages:
                break
            victim = self.running[-1]
            self._drop(victim)
            self.running.remove(victim)
            if not self.running:
                self._finish(
                    victim, "aborted", "the KV pool cannot hold this request alone; give the engine more pages"
                )
                self.finished[victim.id] = victim
                return []
            victim.reset()
            self.waiting.appendleft(victim)
        for b in groups:
            self.pool.append(b.run.seg, b.pending)
        return groups

    # ---- the model ----------------------------------------------------------------------------

    def _forward(self, groups: list[Branch]) -> torch.Tensor:
        """Run the pending tokens of every group; return logits [n, V] of the groups still decoding."""
        dev = self.device
        ids, pos, sizes = [], [], []
        for b in groups:
            run = b.run
            ids += run.tokens[run.computed :]
            pos += run.positions[run.computed :]
            sizes.append(b.pending)
        slots = torch.cat([b.run.seg.slots[b.run.computed :] for b in groups])
        ns = torch.tensor(sizes)
        starts = torch.cumsum(ns, 0) - ns
        buckets = []
        for n in sorted(set(sizes)):
            members = [g for g, size in enumerate(sizes) if size == n]
            contexts = [torch.cat([r.seg.slots for r in groups[g].context]) for g in members]
            lengths = torch.tensor([len(c) for c in contexts])
            context = torch.nn.utils.rnn.pad_sequence(contexts, batch_first=True)
            queries = starts[members][:, None] + torch.arange(n)[None, :]
            mask = None
            if n > 1 or (lengths != lengths[0]).any():
                limit = (lengths - n)[:, None] + torch.arange(n)[None, :]  # query j sees context [0, limit]
                mask = (torch.arange(context.shape[1])[None, None, :] <= limit[:, :, None])[:, None].to(dev)
            buckets.append(attention.Bucket(context.to(dev), mask, queries.to(dev)))
        attention.STATE.pool = self.pool
        attention.STATE.batch = Batch(slots.to(dev), buckets)
        last = (torch.cumsum(ns, 0) - 1)[[not b.done for b in groups]]
        cfg = self.model.config
        prev = cfg._attn_implementation
        try:
            cfg._attn_implementation = attention.NAME
            with torch.inference_mode():
                out = self.model.base_model(
                    input_ids=torch.tensor([ids], device=dev),
                    position_ids=torch.tensor([pos], device=dev),
                    use_cache=False,
                )
                hidden = out.last_hidden_state[0, last.to(dev)]
                logits = self.model.get_output_embeddings()(hidden).float()
        finally:
            attention.STATE.batch = None
            cfg._attn_implementation = prev
        return logits

    def _check_backend(self) -> None:
        """Fail early, with a clear message, for models that bypass AttentionInterface."""
        run = Run(0, (-1, -1))
        run.add(self.eos[0] if self.eos else 0, 0, 0.0, True)
        probe = Branch(None, run, [run], TagState(), 0)
        self.pool.acquire([run.seg])
        self.pool.append(run.seg, 1)
        attention.STATE.calls = 0
        try:
            self._forward([probe])
        finally:
            self.pool.release([run.seg])
        layers = self.model.config.num_hidden_layers
        if attention.STATE.calls != layers:
            raise ValueError(
                f"{type(self.model).__name__} does not route attention through transformers' AttentionInterface "
                f"({attention.STATE.calls} of {layers} layers did); the NPR engine cannot run it"
            )

    # ---- sampling and structure ---------------------------------------------------------------

    def _sample(self, b: Branch, logits: torch.Tensor) -> None:
        req, p = b.req, b.req.params
        logp = torch.log_softmax(logits, dim=-1)
        if req.replay is not None:
            target = req.replay[b.run.index] if b.run.index < len(req.replay) else []
            j = len(b.run.tokens) - b.run.offset
            if j >= len(target):
                return self._finish(req, "stop")
            tok = target[j]
        else:
            if b.state.phase == "step":  # the repetition penalty applies inside steps only
                logits = penalize(logits, b.run.tokens[b.run.offset :], p.repetition_penalty)
            mask = None
            if p.enforce_structure:
                mask = self._mask(b.state.allowed(p.max_plans, self._block_fits(b)), p)
            seed = noise_seed(req.seed, b.run.key, len(b.run.tokens))
            tok = choose(logits, p.temperature, p.top_k, p.top_p, seed, mask)
        self._append(b, tok, float(logp[tok]))

    def _block_fits(self, b: Branch) -> bool:
        """Whether a minimal block (one plan, one step, a takeaway) still fits both budgets."""
        p, req = b.req.params, b.req
        fits = req.total + 12 <= p.max_tokens and b.path + 12 <= p.path_budget
        if not fits and b.state.phase == "out" and not req.refused.get("block_budget"):
            req.refused["block_budget"] += 1
        return fits

    def _stop_ids(self, p: SamplingParams) -> tuple[int, ...]:
        return tuple(self.eos if p.stop_token_ids is None else p.stop_token_ids)

    def _mask(self, allowed: Allowed, p: SamplingParams) -> torch.Tensor:
        stops = self._stop_ids(p)
        key = (allowed, stops)
        if key not in self._masks:
            tag_ids_ = torch.tensor([self.tags[t] for t in TAGS])
            ok = torch.tensor([self.tags[t] for t in allowed.tags], dtype=torch.long)
            if allowed.text:
                m = torch.zeros(self.vocab, dtype=torch.bool)
                m[tag_ids_] = True
                m[list(stops)] = not allowed.eos
            else:
                m = torch.ones(self.vocab, dtype=torch.bool)
                if allowed.eos:
                    m[list(stops)] = False
            m[ok] = False
            self._masks[key] = m.to(self.device)
        return self._masks[key]

    def _append(self, b: Branch, tok: int, logprob: float) -> None:
        req, p = b.req, b.req.params
        if req.total + 1 > p.max_tokens:
            return self._finish(req, "length")
        if b.path + 1 > p.path_budget:
            return self._finish(req, "path_length")
        tag = self.tag_of.get(tok)
        stops = self._stop_ids(p)
        parallel = p.mode == "parallel"
        self._write(b, tok, logprob)
        if tok in stops and tag is None:
            if b.state.phase == "out" or not parallel:
                return self._finish(req, "stop")
            return self._finish(req, "invalid_schema", f"end of sequence inside <{b.state.phase}>")
        if tag is not None:
            if not b.state.legal(tag):
                if parallel:
                    return self._finish(req, "invalid_schema", f"illegal {tag} in phase {b.state.phase!r}")
            else:
                b.state.advance(tag)
                if parallel and tag == GUIDELINE_END:
                    return self._fork(b)
                if parallel and tag == STEP_END:
                    return self._end_step(b)
        elif p.stop and b.state.phase == "out" and self._hit_stop(b.run, p.stop):
            return self._finish(req, "stop")
        if self._repeating(b.run, p.repetition_limit):
            return self._finish(req, "repetition")

    @staticmethod
    def _write(b: Branch, tok: int, logprob: float = 0.0, forced: bool = False, position: int | None = None) -> None:
        """Append a completion token to the branch's run and charge it to both budgets."""
        b.run.add(tok, b.run.positions[-1] + 1 if position is None else position, logprob, forced)
        b.req.total += 1
        b.path += 1
        b.req.max_path = max(b.req.max_path, b.path)

    def _label(self, i: int) -> list[int]:
        if i not in self._labels:
            self._labels[i] = self.tokenizer.encode(f"{i}:", add_special_tokens=False)
        return self._labels[i]

    def _fork(self, b: Branch) -> None:
        req, p = b.req, b.req.params
        k = b.state.plans
        forced = [[self.tags[STEP], *self._label(i + 1)] for i in range(k)]
        if k > p.max_plans:
            req.refused["too_many_plans"] += 1
            return self._finish(req, "invalid_schema", f"{k} plans exceed max_plans={p.max_plans}")
        if req.total + sum(len(f) + 1 for f in forced) + 2 > p.max_tokens:
            req.refused["budget"] += 1
            return self._finish(req, "length")
        if b.path + max(len(f) for f in forced) + 3 > p.path_budget:
            req.refused["path_budget"] += 1
            return self._finish(req, "path_length")
        b.done = True
        block = Block(len(req.blocks), k, list(b.context))
        req.blocks.append(block)
        start = step_start(b.run.positions[-1])
        for i, toks in enumerate(forced):
            run = Run(len(req.runs), (block.index, i))
            req.runs.append(run)
            child = Branch(req, run, block.prefix + [run], TagState("step"), b.path, block, i)
            self.pool.acquire([r.seg for r in child.context])
            for j, t in enumerate(toks):
                self._write(child, t, forced=True, position=start + j)
            block.steps.append(run)
            block.paths.append(0)
            req.branches.append(child)
        # the block keeps its prefix and finished steps alive until the join
        self.pool.acquire([r.seg for r in block.prefix + block.steps])
        block.held = True

    def _end_step(self, b: Branch) -> None:
        req, block = b.req, b.block
        b.done = True
        block.ended += 1
        block.paths[b.step] = b.path
        if block.ended < block.plans:
            return
        path = max(block.paths)
        if req.total + 1 > req.params.max_tokens:
            return self._finish(req, "length")
        if path + 1 > req.params.path_budget:
            return self._finish(req, "path_length")
        run = Run(len(req.runs), (block.index, -1))
        req.runs.append(run)
        joined = Branch(req, run, block.prefix + block.steps + [run], TagState("takeaway"), path)
        self.pool.acquire([r.seg for r in joined.context])
        self._unhold(block)
        self._write(
            joined, self.tags[TAKEAWAY], forced=True, position=join_position([r.positions[-1] for r in block.steps])
        )
        req.branches.append(joined)

    def _hit_stop(self, run: Run, stops: list[str]) -> bool:
        tail = self.tokenizer.decode(run.tokens[max(run.offset, len(run.tokens) - 16) :])
        return any(s and s in tail for s in stops)

    @staticmethod
    def _repeating(run: Run, limit: int) -> bool:
        toks = run.tokens[run.offset :]
        for period in range(1, 17):
            span = period * limit
            if len(toks) < span:
                break
            tail = toks[-span:]
            if tail == tail[:period] * limit:
                return True
        return False

    # ---- lifecycle ----------------------------------------------------------------------------

    def _retire(self, b: Branch) -> None:
        self.pool.release([r.seg for r in b.context])
        b.req.branches.remove(b)

    def _drop(self, req: Request) -> None:
        for b in req.branches:
            self.pool.release([r.seg for r in b.context])
        for block in req.blocks:
            self._unhold(block)
        req.branches = []

    def _unhold(self, block: Block) -> None:
        if block.held:
            self.pool.release([r.seg for r in block.prefix + block.steps])
            block.held = False

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.finish_reason is not None:
            return
        self._drop(req)
        req.finish_reason, req.error = reason, error
        req.ended = time.perf_counter()

    def _completion(self, req: Request) -> Completion:
        return completion(req, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))
