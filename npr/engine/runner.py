"""The model runner: attention metadata for one step, the forward, and batched sampling.

Host work per step is proportional to the new tokens: their ids, positions, pool slots and
table coordinates go to the device in one copy; each branch's context row is already there
(`ContextTable`), so a bucket's context is a device-side slice of the table, not a list
rebuilt on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from npr.engine import attention
from npr.engine.context import ContextTable, int64_rows
from npr.engine.kv_pool import KVPool
from npr.engine.request import Block, Branch
from npr.engine.sampler import SamplingBatch, sample

KERNELS = ("auto", "sdpa", "flex")
Q_BLOCK = 128  # FlexAttention's query block: one per decode bucket row, a few per prompt chunk


class ModelRunner:
    def __init__(self, model, pool: KVPool, table: ContextTable, kernel: str = "auto"):
        if kernel not in KERNELS:
            raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
        self.model, self.pool, self.table = model, pool, table
        self.body, self.head = model.base_model, model.get_output_embeddings()  # looked up once, not per step
        self.device = table.device
        self.dtype = next(model.parameters()).dtype  # the queries' dtype: the sdpa masks are built in it
        self.kernel = ("flex" if self.device.type == "cuda" else "sdpa") if kernel == "auto" else kernel
        ps = pool.page_size
        if self.kernel == "flex":
            if ps < 16 or ps & (ps - 1):
                raise ValueError(f"the flex kernel needs a page size that is a power of two >= 16, got {ps}")
            slots = pool.num_pages * ps
            # written slots per page, plus one scratch entry that absorbs writes meant for no page
            self.fill = torch.zeros(pool.num_pages + 1, dtype=torch.int64, device=self.device)
            self.new_group = torch.full((slots,), -1, dtype=torch.int64, device=self.device)  # group writing a slot
            self.new_pos = torch.zeros(slots, dtype=torch.int64, device=self.device)  # its index in the chunk
        self._arange = torch.arange(256, device=self.device)
        # the staged copies of a run of pure decode steps (sdpa): the work list and sibling groups
        # they were made for (the scheduler hands the same list back while the run lasts), and one
        # `_Copy` per bucket (a bucket's kind follows from its index: sibling groups come first)
        self._stage_for: tuple | None = None
        self._stage: list[_Copy | None] = []
        attention.register()

    def forward(
        self, work: list[tuple[Branch, int]], copies: list[Branch], last: list[int], steady: bool = False
    ) -> torch.Tensor:
        """Compute the scheduled tokens; return the logits [len(last), V] at packed positions `last`.

        `work` lists the flushed branches (forks' parents, ended steps) first: the rows forked
        or joined from them (`copies`) are laid out after their last page is counted. `steady`:
        a pure decode step whose work the scheduler keeps for the next step (`Scheduler.is_steady`).
        """
        dev, ps, table = self.device, self.pool.page_size, self.table
        ids, pos, slots, rows, cols, seen, prow, pcol, page = [], [], [], [], [], [], [], [], []
        unseen = table.vocab  # the `seen` column of a token the penalty does not count (a prompt's)
        sizes, group_rows, lengths, ops = [], [], [], ([], [])
        siblings: dict[tuple[Block, int], list[int]] = {}  # a block's steps computing n tokens each (shared prefix)
        flushed = next((g for g, (b, _) in enumerate(work) if not b.done), len(work))  # they come first
        for g, (b, n) in enumerate(work):
            if g == flushed:  # after the flushed branches' pages: lay out the forks' and joins' rows
                ops = self._layout(copies)
            run, row, length = b.run, b.row, b.length
            c = run.computed
            if n == 1:  # a decode step: the common case, without the chunk's list building
                if b.block is not None:
                    siblings.setdefault((b.block, 1), []).append(g)
                tok = run.tokens[c]
                ids.append(tok)
                pos.append(run.positions[c])
                off = c % ps
                slots.append(run.seg.pages[c // ps] * ps + off)
                rows.append(row)
                cols.append(length)
                seen.append(tok if c >= run.offset else unseen)  # completion tokens: the penalty's "seen"
                starts = () if off else (c,)
            else:
                ids += run.tokens[c : c + n]
                pos += run.positions[c : c + n]
                slots += run.seg.slots(c, c + n, ps)
                rows += [row] * n
                cols += range(length, length + n)
                seen += [t if c + i >= run.offset else unseen for i, t in enumerate(run.tokens[c : c + n])]
                starts = range(-(-c // ps) * ps, c + n, ps)
                if b.block is not None:  # a fork's steps computing their forced opening together
                    siblings.setdefault((b.block, n), []).append(g)
            for i in starts:  # pages this chunk starts
                prow.append(row)
                pcol.append(table.npages[row])
                page.append(run.seg.pages[i // ps])
                table.npages[row] += 1
            sizes.append(n)
            group_rows.append(row)
            lengths.append(length + n)
        if flushed == len(work):
            ops = self._layout(copies)
        # everything the device needs of this step, in one host -> device copy
        pages = [prow, pcol, page] if page else []
        meta = int64_rows(dev, ids, pos, slots, rows, cols, seen, group_rows, lengths, sizes, *pages)
        ids_t, pos_t, slot_t, row_t, col_t, seen_t = meta[:6]
        groups = meta[6:9]  # each group's table row, context length after the step, and new tokens
        # only rows that start a page this step or are copied into can outgrow the table's width
        most_pages = max([table.npages[r] for r in prow] + [table.npages[b.row] for b in copies], default=0)
        table.reserve(max(lengths + [b.length for b in copies]), most_pages)
        table.write(row_t, col_t, slot_t)
        if page:
            table.write_pages(*meta[9:])
        table.copy(*ops)
        for b in copies:
            for row in b.frees:
                table.release(row)
            b.sources, b.frees = [], []
        table.mark_seen(row_t, seen_t)
        attention.STATE.pool = self.pool
        if self.kernel == "flex":  # sharing only ever reads less here: every block of siblings shares
            shared = [(blk.prefix_len, m) for (blk, n), m in siblings.items() if n == 1 and len(m) > 1]
            attention.STATE.batch = self._flex_buckets(slot_t, sizes, groups[2], group_rows, shared)
        else:
            shared = [(blk.prefix_len, m) for (blk, _), m in siblings.items() if _share(blk.prefix_len, m, lengths)]
            go_on = self._stage_for is not None and self._stage_for[0] is work and self._stage_for[1] == shared
            stage = 0 if not steady else 2 if go_on else 1  # 1: start staged copies, 2: append to them
            batch = self._buckets(slot_t, groups, sizes, lengths, shared, group_rows, stage)
            self._stage_for = (work, shared) if stage else None
            attention.STATE.batch = batch
        cfg = self.model.config
        prev = _set_attention(cfg, attention.NAME)
        try:
            with torch.inference_mode():
                out = self.body(input_ids=ids_t[None], position_ids=pos_t[None], use_cache=False)
                at = slice(None) if len(last) == len(ids) else int64_rows(dev, last)[0]  # (no sync: non-blocking)
                hidden = out.last_hidden_state[0, at]
                return self.head(hidden).float()
        finally:
            attention.STATE.batch = None
            _set_attention(cfg, prev)
            if self.kernel == "flex":
                self.new_group[slot_t] = -1

    def _layout(self, copies: list[Branch]) -> tuple[list, list]:
        """Host side of the forks' and joins' row copies: the pieces each row takes, as (dst row, at,
        src row, start, end), in tokens and in pages (`ContextTable.copy`)."""
        pieces, page_pieces = [], []
        for b in copies:
            at = pat = 0
            for row, start, end, p0, p1 in b.sources:
                p1 = self.table.npages[row] if p1 < 0 else p1
                pieces.append((b.row, at, row, start, end))
                page_pieces.append((b.row, pat, row, p0, p1))
                at += end - start
                pat += p1 - p0
            self.table.npages[b.row] = pat
        return pieces, page_pieces

    def _by_size(self, sizes: list[int], size_t: torch.Tensor, keep: list[int] | None = None):
        """Buckets: (n, member groups, their index, [G, n] packed index of their queries).
        `size_t` holds `sizes` on the device; `keep` limits the buckets to those groups."""
        distinct = sorted(set(sizes if keep is None else [sizes[g] for g in keep]))
        if keep is None and len(distinct) == 1:  # one bucket (every pure decode step): no indexing
            n = distinct[0]
            yield n, range(len(sizes)), slice(None), torch.arange(len(sizes) * n, device=self.device).view(-1, n)
            return
        starts = torch.cumsum(size_t, 0) - size_t
        for n in distinct:
            members = [g for g in (range(len(sizes)) if keep is None else keep) if sizes[g] == n]
            idx = int64_rows(self.device, members)[0]
            yield n, members, idx, starts[idx][:, None] + torch.arange(n, device=self.device)[None, :]

    def _buckets(
        self, slot_mapping, groups, sizes: list[int], lengths: list[int], shared: list, group_rows: list[int],
        stage: int = 0,
    ) -> attention.Batch:  # fmt: skip
        """One bucket per distinct chunk length n; contexts are slices of the table rows. The
        decoding steps of a block in `shared` ((prefix length, groups)) attend as one group.
        `stage`: 1 starts a staged copy of a pure decode step's contexts, 2 appends to it."""
        by_k, first, keep = _siblings(shared, sizes)
        if stage:
            self._stage += [None] * (len(by_k) + 1 - len(self._stage))
        buckets = [self._shared_bucket(blks, first, lengths, group_rows, stage, i) for i, blks in enumerate(by_k)]
        for n, members, idx, queries in self._by_size(sizes, groups[2], keep):
            every = isinstance(idx, slice)  # the only bucket: all the step's groups, in order
            lens_n = lengths if every else [lengths[g] for g in members]
            width = max(lens_n)
            uniform = min(lens_n) == width
            rows, lens = (groups[0], groups[1]) if every else (groups[0][idx], groups[1][idx])
            staged, mask = self._staged(len(by_k), rows, lens, width, uniform, stage) if stage else (None, None)
            context = None if staged else self.table.slots[:, :width].index_select(0, rows)
            causal = n > 1 and uniform and width == n  # a whole prompt in one chunk: plain causal
            if n == 1 and not uniform and not staged:
                mask = self._decode_mask(lens, width)
            elif n > 1 and not causal:
                limit = (lens - n)[:, None] + self._columns(n)[None, :]  # query j sees [0, limit]
                hidden = self._columns(width)[None, None, :] > limit[:, :, None]
                mask = _additive(hidden, self.dtype)[:, None]
            buckets.append(attention.Bucket(queries, context, mask, causal=causal, every=every, staged=staged))
        return attention.Batch(slot_mapping, buckets)

    def drop_staged(self) -> None:
        """Let go of the staged copies (the pool's memory is going: `LLM.sleep`)."""
        self._stage, self._stage_for = [], None

    def _staged(self, i: int, rows, lens, width: int, uniform: bool, stage: int) -> tuple:
        """Bucket `i`'s staged copy in a pure decode step (one token per group) and its mask: its
        new tokens' columns when it goes on (`stage` 2) and has room, else a fresh one, gathered
        with room for half as many tokens again; (None, None) when the pool's share for copies is
        spent (it gathers). The mask (rows of unequal length) is kept over the copy's columns too:
        a step that goes on opens its new tokens' columns, one op instead of a new mask."""
        kept = self._stage[i]
        if stage == 2 and kept is not None and width <= kept.room:
            at = kept.base + lens - 1  # (row g's column 0 is g x cols, in the copy and its mask alike)
            if kept.mask is not None:
                kept.mask.view(-1).index_fill_(0, at, 0.0)
            return attention.Staged(kept.k, kept.v, width, at=at), _within(kept.mask, width)
        cols = width + width // 2 + 16
        copy = self._keep_copy(i, len(rows), cols, cols)
        if copy is None:
            return None, None
        copy.base = self._columns(len(rows)) * cols
        if not uniform:
            copy.mask = self._decode_mask(lens, cols)
        self.table.reserve(cols, 0)  # columns past a row's length hold stale slots: written before they are read
        fill = self.table.slots[:, :cols].index_select(0, rows).view(-1)
        return attention.Staged(copy.k, copy.v, width, fill=fill), _within(copy.mask, width)

    def _decode_mask(self, lens, cols: int) -> torch.Tensor:
        """[G, 1, 1, cols] additive mask of decoding rows: row g sees its first `lens[g]` columns (two
        ops, not six)."""
        return _additive(self._columns(cols) >= lens[:, None], self.dtype)[:, None, None]

    def _keep_copy(self, i: int, groups: int, cols: int, room: int) -> _Copy | None:
        """Buffers for bucket `i`'s fresh copy ([layers, groups, cols, ...]), kept with its room as
        `self._stage[i]`; None (kept too) when the pool's share is spent."""
        bufs = self.pool.staging_buffers(i, groups, cols)
        self._stage[i] = None if bufs is None else _Copy(*bufs, room)
        return self._stage[i]

    def _columns(self, n: int) -> torch.Tensor:
        """arange(n) on the device, sliced from one kept tensor (grown by doubling)."""
        if len(self._arange) < n:
            self._arange = torch.arange(max(n, 2 * len(self._arange)), device=self.device)
        return self._arange[:n]

    def _shared_bucket(self, blocks: list, first: list[int], lengths: list[int], group_rows: list[int], stage: int = 0,
                       i: int = 0):  # fmt: skip
        """k sibling steps computing n tokens each (decoding one, or a fork's forced openings), as
        one group of k n queries over a context of their shared prefix (gathered once, not k
        times) followed by the siblings' own tokens, token j of every sibling side by side (so each
        decode step's new tokens are adjacent columns); the mask lets sibling i's queries see the
        prefix and sibling i's tokens up to their own. `stage`, `i`: as `_staged`."""
        dev, k, n = self.device, len(blocks[0][1]), first[blocks[0][1][0] + 1] - first[blocks[0][1][0]]
        most_prefix = max(p for p, _ in blocks)
        most_own = max(lengths[g] - p for p, m in blocks for g in m)
        width = most_prefix + k * most_own
        kept = self._stage[i] if stage else None
        if stage == 2 and kept is not None and most_own <= kept.room:  # each sibling wrote one more own token:
            kept.at += k  # its column moves on by k (token j of every sibling side by side)
            kept.mask_at += k
            kept.mask.view(-1).index_fill_(0, kept.mask_at, 0.0)
            staged = attention.Staged(kept.k, kept.v, width, at=kept.at)
            return attention.Bucket(kept.queries, mask=_within(kept.mask, width), staged=staged)
        info = [[*(group_rows[g] for g in m), *(lengths[g] for g in m), *(first[g] for g in m), p] for p, m in blocks]
        t = torch.tensor(info, dtype=torch.int64).to(dev, non_blocking=True)
        rows, lens, queries, prefix = t[:, :k], t[:, k : 2 * k], t[:, 2 * k : 3 * k], t[:, 3 * k]
        own_len = lens - prefix[:, None]  # [B, k]
        if n > 1:  # each sibling's chunk: n queries, each seeing its own tokens up to itself
            queries = (queries[:, :, None] + self._columns(n)).flatten(1)
        if stage:  # a fresh copy, with room for half as many own tokens again
            room = most_own + most_own // 2 + 8
            cols = most_prefix + k * room
            copy = self._keep_copy(i, len(blocks), cols, room)
            if copy is not None:
                # the column of each sibling's newest token past the prefix; flat in the copy, in the mask
                newest = most_prefix + (own_len - 1) * k + self._columns(k)  # [B, k]
                copy.at = (self._columns(len(blocks))[:, None] * cols + newest).flatten()
                copy.mask_at = (self._columns(len(blocks) * k).view(-1, k) * cols + newest).flatten()
                copy.mask, copy.queries = self._sibling_mask(prefix, own_len, n, most_prefix, room), queries
                self.table.reserve(most_prefix + room, 0)
                fill = self._shared_context(rows, prefix, most_prefix, room).view(-1)
                staged = attention.Staged(copy.k, copy.v, width, fill=fill)
                return attention.Bucket(queries, mask=_within(copy.mask, width), staged=staged)
        mask = self._sibling_mask(prefix, own_len, n, most_prefix, most_own)
        return attention.Bucket(queries, self._shared_context(rows, prefix, most_prefix, most_own), mask)

    def _sibling_mask(self, prefix, own_len, n: int, most_prefix: int, own: int) -> torch.Tensor:
        """[B, 1, k n, most_prefix + k own] additive mask of sibling groups (`_shared_bucket`): query q
        of sibling i sees its block's prefix and sibling i's own tokens up to its own."""
        k = own_len.shape[1]
        sees = own_len[:, :, None] - n + self._columns(n)  # [B, k, n]: the last own token query (i, q) sees
        mine = self._columns(own) <= sees[..., None]  # [B, k, n, own]
        mine = torch.eye(k, dtype=torch.bool, device=self.device)[None, :, None, :, None] & mine[:, :, :, None]
        sees_prefix = (self._columns(most_prefix) < prefix[:, None])[:, None, :].expand(-1, k * n, -1)
        visible = torch.cat([sees_prefix, mine.transpose(3, 4).flatten(3).flatten(1, 2)], 2)  # [B, k n, width]
        return _additive(~visible, self.dtype)[:, None]

    def _shared_context(self, rows, prefix, most_prefix: int, own: int) -> torch.Tensor:
        """[B, most_prefix + k * own] slots: each block's prefix (from its first sibling's row), then
        token j of every sibling for j < own (columns past a row's width are clamped: hidden)."""
        cols = (prefix[:, None] + self._columns(own)).clamp(max=self.table.slots.shape[1] - 1)  # [B, own]
        mine = self.table.slots[rows[:, None, :], cols[:, :, None]]  # [B, own, k]
        return torch.cat([self.table.slots[rows[:, 0], :most_prefix], mine.flatten(1)], 1)

    def _flex_buckets(
        self, slot_mapping, sizes: list[int], n_all: torch.Tensor, group_rows: list[int], shared: list
    ) -> attention.Batch:
        """Block masks over the pool's pages: a group sees the written slots of its context's pages.
        The decoding steps of a block in `shared` ((prefix length, groups)) attend as one group."""
        from torch.nn.attention.flex_attention import BlockMask

        dev, ps = self.device, self.pool.page_size
        page, off = slot_mapping // ps, slot_mapping % ps
        fresh = torch.where(off == 0, page, self.pool.num_pages)  # written from its first slot: a fresh page
        self.fill[fresh] = 0
        self.fill.scatter_reduce_(0, page, off + 1, "amax")
        starts = torch.cumsum(n_all, 0) - n_all  # (`n_all`: `sizes` on the device)
        # the output size given: else a GPU reads the repeats' sum back (a sync)
        group = torch.repeat_interleave(torch.arange(len(sizes), device=dev), n_all, output_size=len(slot_mapping))
        self.new_group[slot_mapping] = group
        self.new_pos[slot_mapping] = torch.arange(len(slot_mapping), device=dev) - starts[group]
        fill, new_group, new_pos, slots = self.fill, self.new_group, self.new_pos, self.pool.num_pages * ps
        # a page written before this step and filled up is wholly visible to every query that lists
        # it: a full block, which the fused kernel reads without evaluating mask_mod
        whole = fill == ps
        whole[page] = False
        by_k, first, keep = _siblings(shared, sizes)
        buckets = [self._flex_shared_bucket(blks, first, group_rows, whole) for blks in by_k]
        for n, members, idx, queries in self._by_size(sizes, n_all, keep):
            pages, listed, sees = self._page_rows([group_rows[g] for g in members])
            full = listed & whole[pages]
            q_blocks = -(-n // Q_BLOCK)
            blocks = [*_block_list(pages, listed & ~full, q_blocks), *_block_list(pages, full, q_blocks)]
            groups = torch.arange(len(sizes), device=dev) if isinstance(idx, slice) else idx
            visible = _visibility(ps, fill, new_group, new_pos, groups, sees)
            mask = BlockMask.from_kv_blocks(
                *blocks, BLOCK_SIZE=(Q_BLOCK, ps), mask_mod=visible, seq_lengths=(n, slots), compute_q_blocks=False
            )
            buckets.append(attention.Bucket(queries, block_mask=mask, every=isinstance(idx, slice)))
        return attention.Batch(slot_mapping, buckets)

    def _flex_shared_bucket(self, blocks: list, first: list[int], group_rows: list[int], whole):
        """k sibling steps decoding one token each, as one group of k queries over the block's pages,
        each listed once: the prefix's pages are read once for all k siblings, not k times (on a
        GPU decoding is bound by those reads). Query i sees the prefix and sibling i's own pages
        (a step starts on a fresh page, so siblings share no page past the prefix)."""
        from torch.nn.attention.flex_attention import BlockMask

        dev, ps, sink = self.device, self.pool.page_size, self.pool.num_pages
        k = len(blocks[0][1])
        pages, listed, sees = self._page_rows([group_rows[g] for _, m in blocks for g in m])
        width = pages.shape[1]
        sees = sees.view(len(blocks), k, sink + 1)
        prefix = sees.all(1)  # the pages every sibling sees
        pages, listed = pages.view(len(blocks), k * width), listed.view(len(blocks), k * width)
        in_prefix = prefix.gather(1, pages)
        once = listed & ((torch.arange(k * width, device=dev) < width)[None, :] | ~in_prefix)  # prefix from sibling 0
        full = once & in_prefix & whole[pages]
        mask = BlockMask.from_kv_blocks(
            *_block_list(pages, once & ~full, 1), *_block_list(pages, full, 1), BLOCK_SIZE=(Q_BLOCK, ps),
            mask_mod=_sibling_visibility(ps, self.fill, sees), seq_lengths=(k, sink * ps), compute_q_blocks=False,
        )  # fmt: skip
        queries = torch.tensor([[first[g] for g in m] for _, m in blocks], dtype=torch.int64).to(dev, non_blocking=True)
        return attention.Bucket(queries, block_mask=mask)

    def _page_rows(self, rows: list[int]):
        """The pages of these table rows ([R, W], padded), which are listed, and the pages each row
        sees ([R, pages + 1] bool, the last column a sink for the padding): the block mask lists
        them for the fused kernel, and the mask_mod checks them too (the eager fallback evaluates
        mask_mod over the whole pool)."""
        dev, sink = self.device, self.pool.num_pages
        counts = [self.table.npages[r] for r in rows]
        width = max(counts)
        num, at = int64_rows(dev, counts, rows)
        pages = self.table.pages[at, :width]
        listed = torch.arange(width, device=dev)[None, :] < num[:, None]
        sees = torch.zeros(len(rows), sink + 1, dtype=torch.bool, device=dev)
        return pages, listed, sees.scatter_(1, torch.where(listed, pages, sink), True)

    def sample(
        self, logits: torch.Tensor, sampled: list[Branch], batch: SamplingBatch, masks
    ) -> tuple[list[int], list[float]]:
        seen = None
        if self.table.seen is not None and any(p != 1.0 and f < 0 for p, f in zip(batch.penalty, batch.forced)):
            seen = self.table.seen_rows([b.row for b in sampled])
        return sample(logits, batch, seen, masks)


@dataclass(eq=False)
class _Copy:
    """A bucket's staged copy between steps: its buffers, the most context columns (plain buckets)
    or own tokens per sibling (sibling groups) it has room for, and its mask over all its columns
    (None: rows of equal length need none). Plain buckets: the flat index of each row's column 0
    (`base`). Sibling groups: the flat index of each sibling's newest token in the copy (`at`) and
    in the mask (`mask_at`), and the group's queries, the same while the run lasts."""

    k: torch.Tensor
    v: torch.Tensor
    room: int
    mask: torch.Tensor | None = None
    base: torch.Tensor | None = None
    at: torch.Tensor | None = None
    mask_at: torch.Tensor | None = None
    queries: torch.Tensor | None = None


def _within(mask: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """A kept mask's first `width` columns (a view)."""
    return None if mask is None else mask[..., :width]


def _set_attention(cfg, name: str | None) -> str | None:
    """Set a model config's attention implementation; return the one it had. transformers' setter
    also walks the sub-configs, through attribute hooks that cost ~20 us a step on a CPU; a config
    without sub-configs is set in its own dict (the setter's storage) directly."""
    own = cfg.__dict__
    if "_attn_implementation_internal" in own and not cfg.sub_configs:
        prev, own["_attn_implementation_internal"] = own["_attn_implementation_internal"], name
        return prev
    prev = cfg._attn_implementation
    cfg._attn_implementation = name
    return prev


def _siblings(shared: list[tuple[int, list[int]]], sizes: list[int]) -> tuple[list[list], list[int], list[int] | None]:
    """The blocks of sibling steps that attend as one group ((prefix length, groups)), by sibling
    count and tokens each; the packed index of each group's first token; the groups left to attend on their own
    (None: all of them)."""
    if not shared:
        return [], [], None
    by_k: dict[tuple[int, int], list] = {}
    for blk in shared:
        by_k.setdefault((len(blk[1]), sizes[blk[1][0]]), []).append(blk)
    grouped = {g for _, m in shared for g in m}
    return list(by_k.values()), list(accumulate(sizes, initial=0)), [g for g in range(len(sizes)) if g not in grouped]


def _block_list(pages: torch.Tensor, chosen: torch.Tensor, q_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) of a BlockMask: each row's `chosen` pages first, in order (a stable sort),
    the same list for each of its `q_blocks` query blocks."""
    order = torch.sort((~chosen).to(torch.uint8), dim=1, stable=True).indices
    num = chosen.sum(1, dtype=torch.int32)[:, None, None].expand(-1, 1, q_blocks).contiguous()
    listed = pages.gather(1, order).to(torch.int32)[:, None, None, :].expand(-1, 1, q_blocks, -1).contiguous()
    return num, listed


def _visibility(ps: int, fill, new_group, new_pos, members, sees):
    """The flex mask_mod: query q of group b sees slot kv when kv's page is in b's context, the
    slot is written, and, for b's own new tokens, kv is not after q. A closure over tensors (one
    code object for every step), so the compiled kernel takes them as inputs and never recompiles."""

    def visible(b, h, q, kv):
        page = kv // ps
        written = sees[b, page] & ((kv % ps) < fill[page])
        own = new_group[kv] == members[b]
        return written & (~own | (new_pos[kv] <= q))

    return visible


def _sibling_visibility(ps: int, fill, sees):
    """The flex mask_mod of sibling steps attending as one group: query q (sibling q) of block b
    sees slot kv when kv's page is in sibling q's context and the slot is written. The query index
    is clamped because a fused kernel may evaluate the padded rows of its query block too."""

    def visible(b, h, q, kv):
        page = kv // ps
        return sees[b, q.clamp(max=sees.shape[1] - 1), page] & ((kv % ps) < fill[page])

    return visible


def _share(prefix: int, members: list[int], lengths: list[int]) -> bool:
    """Whether a block's decoding steps attend as one group: at least two of them, and their own
    tokens no longer than the prefix (each query also scores its siblings' tokens, masked, so
    past that point the shared gather saves less than the extra scores cost)."""
    return len(members) > 1 and sum(lengths[g] - prefix for g in members) <= prefix


def _additive(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where visible, -inf where `hidden`: SDPA would convert a boolean mask in every call."""
    mask = torch.where(hidden, -torch.inf, 0.0)  # fp32 (one op; faster than zeros, then masked_fill_)
    return mask if dtype == torch.float32 else mask.to(dtype)
