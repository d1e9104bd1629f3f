"""Each branch's context as one row of pool slots (and one of pool pages) on the device.

A slot row lists, in order, the pool slot of every token the branch attends to (its
ancestors' segments, then its own run); a page row lists the pages those segments own,
which is what a paged kernel walks. A decode step writes one slot per branch (`write`); a
fork fills each child's rows with a device copy of its parent's (`copy`, once per fork); a
join concatenates the prefix and every step once. Nothing is rebuilt per step, and the host
only sends what changed: O(new tokens) per step, not O(branches x context).

The table also keeps, per row, which tokens the branch's own run has written (`seen`), for
the in-step repetition penalty, so the sampler never needs a branch's token list.
"""

from __future__ import annotations

import torch


class ContextTable:
    def __init__(self, rows: int, device: torch.device, vocab: int, cols: int = 256):
        self.device, self.vocab = device, vocab
        self.slots = torch.zeros(rows, cols, dtype=torch.int64, device=device)
        self.pages = torch.zeros(rows, 16, dtype=torch.int64, device=device)
        self.npages = [0] * rows  # pages in each row (host copy, so no device sync is needed)
        self.seen: torch.Tensor | None = None  # [rows, vocab + 1] bool, allocated on first use (see mark_seen)
        self.free: list[int] = list(range(rows - 1, -1, -1))

    @property
    def rows(self) -> int:
        return self.slots.shape[0]

    def alloc(self) -> int:
        if not self.free:  # more live rows than planned (held steps of open blocks): grow
            n = self.rows
            self.slots = torch.cat([self.slots, torch.zeros_like(self.slots)])
            self.pages = torch.cat([self.pages, torch.zeros_like(self.pages)])
            self.npages += [0] * n
            if self.seen is not None:
                self.seen = torch.cat([self.seen, torch.zeros_like(self.seen)])
            self.free = list(range(2 * n - 1, n - 1, -1))
        row = self.free.pop()
        self.npages[row] = 0
        if self.seen is not None:
            self.seen[row] = False
        return row

    def release(self, row: int) -> None:
        self.free.append(row)

    def shrink(self, cols: int = 256) -> None:
        """Back to the starting width once no row is live (the widest context may have been 30k)."""
        if len(self.free) != self.rows:
            raise RuntimeError(f"cannot shrink the context table: {self.rows - len(self.free)} rows are live")
        self.slots = self.slots.new_zeros(self.rows, min(cols, self.slots.shape[1]))
        self.pages = self.pages.new_zeros(self.rows, min(16, self.pages.shape[1]))
        self.seen = None  # [rows, vocab]: allocated again on first use

    def reserve(self, cols: int, pages: int) -> None:
        """Make room for `cols` tokens and `pages` pages per row (doubling: amortised growth)."""
        self.slots = _widen(self.slots, cols)
        self.pages = _widen(self.pages, pages)

    def write(self, rows: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor) -> None:
        self.slots[rows, cols] = slots

    def write_pages(self, rows: torch.Tensor, cols: torch.Tensor, pages: torch.Tensor) -> None:
        self.pages[rows, cols] = pages

    def copy(self, dst: int, src: int, slots: tuple[int, int, int], pages: tuple[int, int, int]) -> None:
        """Copy a piece of `src` into `dst` (a fork's prefix, a join's pieces): (at, start, end) each."""
        at, start, end = slots
        self.slots[dst, at : at + end - start] = self.slots[src, start:end]
        at, start, end = pages
        self.pages[dst, at : at + end - start] = self.pages[src, start:end]

    def mark_seen(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """seen[rows, tokens] = True. A token the penalty does not count (a prompt's) comes as id
        `vocab`, the last column, which nothing reads: one write, no mask (boolean indexing would
        be a device sync on GPUs)."""
        if self.seen is None:
            self.seen = torch.zeros(self.rows, self.vocab + 1, dtype=torch.bool, device=self.device)
        self.seen[rows, tokens] = True

    def seen_rows(self, rows: list[int]) -> torch.Tensor:
        """[len(rows), vocab] bool: the tokens each row's own run has written."""
        return self.seen[torch.tensor(rows, device=self.device), : self.vocab]


def _widen(t: torch.Tensor, cols: int) -> torch.Tensor:
    if cols <= t.shape[1]:
        return t
    grown = torch.zeros(t.shape[0], max(cols, 2 * t.shape[1]), dtype=t.dtype, device=t.device)
    grown[:, : t.shape[1]] = t
    return grown
