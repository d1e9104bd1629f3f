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

from array import array

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

    def copy(self, pieces: list[tuple[int, int, int, int, int]], page_pieces: list[tuple[int, int, int, int, int]]):
        """Copy pieces of rows into others (a fork's prefix, a join's pieces), each (dst row, at,
        src row, start, end), in tokens and in pages: all of a step's pieces in one gather and one
        scatter (a fork of k children is k pieces; a piece at a time was ~10 ops each). No piece's
        destination row is another's source (forks and joins copy from rows that exist already)."""
        _copy_pieces(self.slots, pieces)
        _copy_pieces(self.pages, page_pieces)

    def mark_seen(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """seen[rows, tokens] = True. A token the penalty does not count (a prompt's) comes as id
        `vocab`, the last column, which nothing reads: one write, no mask (boolean indexing would
        be a device sync on GPUs)."""
        if self.seen is None:
            self.seen = torch.zeros(self.rows, self.vocab + 1, dtype=torch.bool, device=self.device)
        self.seen[rows, tokens] = True

    def seen_rows(self, rows: list[int]) -> torch.Tensor:
        """[len(rows), vocab] bool: the tokens each row's own run has written."""
        return self.seen[int64_rows(self.device, rows)[0], : self.vocab]


def _widen(t: torch.Tensor, cols: int) -> torch.Tensor:
    if cols <= t.shape[1]:
        return t
    grown = torch.zeros(t.shape[0], max(cols, 2 * t.shape[1]), dtype=t.dtype, device=t.device)
    grown[:, : t.shape[1]] = t
    return grown


def _copy_pieces(t: torch.Tensor, pieces: list[tuple[int, int, int, int, int]]) -> None:
    """t[dst, at : at + end - start] = t[src, start:end] for every piece, in a few ops whatever their number."""
    pieces = [p for p in pieces if p[4] > p[3]]
    if not pieces:
        return
    dst, at, src, start, end = zip(*pieces)
    if not set(dst).isdisjoint(src):  # one gather, then one scatter: a piece must not read another's writes
        raise RuntimeError("a context row is copied into and out of in the same step")
    n = [e - s for s, e in zip(start, end)]
    dst_t, at_t, src_t, start_t, n_t = int64_rows(t.device, dst, at, src, start, n)
    total = sum(n)
    piece = torch.repeat_interleave(torch.arange(len(n), device=t.device), n_t, output_size=total)
    off = torch.arange(total, device=t.device) - (torch.cumsum(n_t, 0) - n_t)[piece]
    t[dst_t[piece], at_t[piece] + off] = t[src_t[piece], start_t[piece] + off]


def int64_rows(device, *lists: list[int]) -> list[torch.Tensor]:
    """Host lists of ints (or bools) as 1-D int64 tensors on `device`, slices of one tensor: one
    copy for all (a step's metadata is a dozen lists, and each copy costs a call), built through
    an array, several times cheaper than `torch.tensor` of the lists (and from one joined list:
    `array.extend` of each list took 1.8x as long, 34 against 19 us for the nine lists of a
    64-row decode step). One slice a list, as every view op is a dispatch (~1-2 us on a CPU)."""
    joined = []
    for row in lists:
        joined += row
    flat = array("q", joined)
    whole = torch.frombuffer(flat, dtype=torch.int64) if flat else torch.zeros(0, dtype=torch.int64)
    # on a CPU the tensor is the array's memory (and keeps it alive); a copy to a GPU from pageable
    # memory is staged before the call returns, so the array may go after it
    whole = whole.to(device, non_blocking=True)
    out, at = [], 0
    for row in lists:
        out.append(whole[at : at + len(row)])
        at += len(row)
    return out
