"""The model runner: attention metadata for one step, the forward, and batched sampling.

Host work per step is proportional to the new tokens: their ids, positions, pool slots and
table coordinates go to the device in one copy; each branch's context row is already there
(`ContextTable`), so a bucket's context is a device-side slice of the table, not a list
rebuilt on the host.
"""

from __future__ import annotations

import torch

from npr.engine import attention
from npr.engine.context import ContextTable
from npr.engine.kv_pool import KVPool
from npr.engine.request import Branch
from npr.engine.sampler import SamplingBatch, sample


class ModelRunner:
    def __init__(self, model, pool: KVPool, table: ContextTable):
        self.model, self.pool, self.table = model, pool, table
        self.device = table.device
        attention.register()

    def forward(self, work: list[tuple[Branch, int]], copies: list[Branch], last: list[int]) -> torch.Tensor:
        """Compute the scheduled tokens; return the logits [len(last), V] at packed positions `last`."""
        dev, ps = self.device, self.pool.page_size
        ids, pos, slots, rows, cols, fresh = [], [], [], [], [], []
        sizes, group_rows, lengths = [], [], []
        for b, n in work:
            run, c = b.run, b.run.computed
            ids += run.tokens[c : c + n]
            pos += run.positions[c : c + n]
            slots += run.seg.slots(c, c + n, ps)
            rows += [b.row] * n
            cols += range(b.length, b.length + n)
            fresh += [c + i >= run.offset for i in range(n)]  # completion tokens: the penalty's "seen"
            sizes.append(n)
            group_rows.append(b.row)
            lengths.append(b.length + n)
        meta = torch.tensor([ids, pos, slots, rows, cols, fresh], dtype=torch.int64).to(dev, non_blocking=True)
        groups = torch.tensor([group_rows, lengths, sizes], dtype=torch.int64).to(dev, non_blocking=True)
        self.table.reserve(max(lengths + [b.length for b in copies]))
        self.table.write(meta[3], meta[4], meta[2])
        for b in copies:  # forks and joins: their rows start as copies of their sources' rows
            at = 0
            for row, start, end in b.sources:
                self.table.copy(b.row, at, row, start, end)
                at += end - start
            for row in b.frees:
                self.table.release(row)
            b.sources, b.frees = [], []
        keep = meta[5].bool()
        self.table.mark_seen(meta[3][keep], meta[0][keep])
        attention.STATE.pool = self.pool
        attention.STATE.batch = self._buckets(meta[2], groups, sizes, lengths)
        cfg = self.model.config
        prev = cfg._attn_implementation
        try:
            cfg._attn_implementation = attention.NAME
            with torch.inference_mode():
                out = self.model.base_model(input_ids=meta[0][None], position_ids=meta[1][None], use_cache=False)
                hidden = out.last_hidden_state[0, torch.tensor(last, device=dev)]
                return self.model.get_output_embeddings()(hidden).float()
        finally:
            attention.STATE.batch = None
            cfg._attn_implementation = prev

    def _buckets(self, slot_mapping, groups, sizes: list[int], lengths: list[int]) -> attention.Batch:
        """One bucket per distinct chunk length n; contexts are slices of the table rows."""
        starts = torch.cumsum(groups[2], 0) - groups[2]
        buckets = []
        for n in sorted(set(sizes)):
            members = [g for g, size in enumerate(sizes) if size == n]
            width = max(lengths[g] for g in members)
            uniform = all(lengths[g] == width for g in members)
            idx = torch.tensor(members, device=self.device) if len(members) < len(sizes) else None
            rows, lens, first = groups[0], groups[1], starts
            if idx is not None:
                rows, lens, first = rows[idx], lens[idx], first[idx]
            context = self.table.slots[rows, :width]
            queries = first[:, None] + torch.arange(n, device=self.device)[None, :]
            mask = None
            if n > 1 or not uniform:
                limit = (lens - n)[:, None] + torch.arange(n, device=self.device)[None, :]  # query j sees [0, limit]
                mask = (torch.arange(width, device=self.device)[None, None, :] <= limit[:, :, None])[:, None]
            buckets.append(attention.Bucket(context, mask, queries))
        return attention.Batch(slot_mapping, buckets)

    def sample(
        self, logits: torch.Tensor, rows: list[int], batch: SamplingBatch, masks
    ) -> tuple[list[int], list[float]]:
        seen = None
        if self.table.seen is not None and any(p != 1.0 for p in batch.penalty):
            seen = self.table.seen[torch.tensor(rows, device=self.device)]
        return sample(logits, batch, seen, masks)
