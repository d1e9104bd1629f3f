"""Each branch's context as one row of pool slots on the device, kept incrementally.

A row lists, in order, the pool slot of every token the branch attends to (its ancestors'
segments, then its own run). A decode step writes one slot per branch (`write`); a fork
fills each child's row with a device copy of its parent's (`copy`, once per fork); a join
concatenates the prefix and every step once. Nothing is rebuilt per step, and the host only
sends what changed: O(new tokens) per step, not O(branches x context).

The table also keeps, per row, which tokens the branch's own run has written (`seen`), for
the in-step repetition penalty, so the sampler never needs a branch's token list.
"""

from __future__ import annotations

import torch


class ContextTable:
    def __init__(self, rows: int, device: torch.device, vocab: int, cols: int = 256):
        self.device, self.vocab = device, vocab
        self.slots = torch.zeros(rows, cols, dtype=torch.int64, device=device)
        self.seen: torch.Tensor | None = None  # [rows, vocab] bool, allocated on first use
        self.free: list[int] = list(range(rows - 1, -1, -1))

    @property
    def rows(self) -> int:
        return self.slots.shape[0]

    def alloc(self) -> int:
        if not self.free:  # more live rows than planned (held steps of open blocks): grow
            n = self.rows
            self.slots = torch.cat([self.slots, torch.zeros_like(self.slots)])
            if self.seen is not None:
                self.seen = torch.cat([self.seen, torch.zeros_like(self.seen)])
            self.free = list(range(2 * n - 1, n - 1, -1))
        row = self.free.pop()
        if self.seen is not None:
            self.seen[row] = False
        return row

    def release(self, row: int) -> None:
        self.free.append(row)

    def reserve(self, cols: int) -> None:
        """Make room for `cols` tokens per row (doubling, so growth is amortised)."""
        if cols > self.slots.shape[1]:
            grown = torch.zeros(self.rows, max(cols, 2 * self.slots.shape[1]), dtype=torch.int64, device=self.device)
            grown[:, : self.slots.shape[1]] = self.slots
            self.slots = grown

    def write(self, rows: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor) -> None:
        self.slots[rows, cols] = slots

    def copy(self, dst: int, at: int, src: int, start: int, end: int) -> None:
        """dst[at : at + end - start] = src[start:end] (a fork's prefix, a join's pieces)."""
        self.slots[dst, at : at + end - start] = self.slots[src, start:end]

    def mark_seen(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        if self.seen is None:
            self.seen = torch.zeros(self.rows, self.vocab, dtype=torch.bool, device=self.device)
        self.seen[rows, tokens] = True
