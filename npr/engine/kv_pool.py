"""Paged KV memory shared by all requests: pages, segments and reference counts (docs/design.md §4).

A segment is a run of tokens of one trajectory (the prompt and main line, or one step)
whose keys and values live in pool pages. A live branch holds a reference to every
segment of its context, so a prefix shared by k sibling steps is stored once and freed
when the last branch that sees it is done. Pages go back to the free list exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STAGE_SHARE = 0.25  # the most memory, as a share of the pool, that staged decode contexts may take


class PoolFull(RuntimeError):
    """Not enough free pages; the scheduler waits or preempts."""


@dataclass(eq=False)
class Segment:
    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens with a slot (written or about to be written this step)
    refs: int = 0
    freed: bool = False

    def slots(self, start: int, end: int, page_size: int) -> list[int]:
        """Pool slots of the segment's tokens [start, end)."""
        return [self.pages[i // page_size] * page_size + i % page_size for i in range(start, end)]


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"KV pool needs at least one page of at least one token (got {num_pages}x{page_size})")
        self.page_size, self.num_pages = page_size, num_pages
        self.capacity = num_pages * page_size  # tokens the whole pool holds
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._gathered = (self.k.new_empty(0), self.v.new_empty(0))  # see gather_buffers
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []  # see staging_buffers
        self.free: list[int] = list(range(num_pages - 1, -1, -1))
        self.live: set[int] = set()  # ids of segments holding pages, for leak checks

    @property
    def asleep(self) -> bool:
        return self.k.numel() == 0

    def sleep(self) -> None:
        """Free the K/V memory while nothing is cached (e.g. for a training update); `wake` restores it."""
        if self.live:
            raise RuntimeError(f"the KV pool cannot sleep: {len(self.live)} segments still hold pages")
        if self.asleep:
            return
        self._shape = self.k.shape
        self.k = self.v = self.k.new_empty(0)
        self._gathered, self._staged = (self.k, self.v), []

    def wake(self) -> None:
        if self.asleep:
            self.k = torch.zeros(self._shape, dtype=self.k.dtype, device=self.k.device)
            self.v = torch.zeros_like(self.k)

    def gather_buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers [n, kv heads, head dim] for keys and values gathered out of the pool, kept from
        layer to layer and step to step (each gathers about as much as the last). A fresh tensor
        each time costs the allocator fresh memory, and on a CPU the page faults of touching it
        cost more than the copy: the attention of a 64-row decode step over 1k-token contexts
        took 7.9 ms a step with fresh tensors, 5.1 with these (2 cores). Grown by doubling; freed
        by `sleep`."""
        k, v = self._gathered
        row = self.k.shape[2:]
        if len(k) < n:
            size = max(n, 2 * len(k))
            k, v = self.k.new_empty(size, *row), self.v.new_empty(size, *row)
            self._gathered = (k, v)
        return k[:n], v[:n]

    def staging_buffers(self, i: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Buffers [layers, rows, cols, kv heads, head dim] for keys and values: the contiguous copy
        of bucket `i` of a run of pure decode steps (see `attention.Staged`), kept and grown like
        `gather_buffers`, one pair per bucket; None when all the buckets' copies would take more
        than `STAGE_SHARE` of the pool's own memory (then that bucket gathers)."""
        if self.asleep:
            return None
        layers, _, heads, dim = self.k.shape
        n, most = layers * rows * cols * heads * dim, int(STAGE_SHARE * self.k.numel())
        staged = self._staged
        staged += [(self.k.new_empty(0), self.v.new_empty(0))] * (i + 1 - len(staged))
        k, v = staged[i]
        if len(k) < n:
            others = sum(len(b[0]) for j, b in enumerate(staged) if j != i)
            if others + n > most:
                return None
            size = min(max(n, 2 * len(k)), most - others)
            k, v = staged[i] = (self.k.new_empty(size), self.v.new_empty(size))
        shape = (layers, rows, cols, heads, dim)
        return k[:n].view(shape), v[:n].view(shape)

    @staticmethod
    def pages_for_budget(gb: float, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype) -> int:
        per_page = 2 * num_layers * page_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        return max(1, int(gb * 2**30 // per_page))

    @property
    def free_pages(self) -> int:
        return len(self.free)

    def pages_needed(self, seg: Segment, n: int) -> int:
        """Pages to allocate before `n` more tokens fit in `seg`."""
        spare = len(seg.pages) * self.page_size - seg.length
        return max(0, -(-(n - spare) // self.page_size))

    def append(self, seg: Segment, n: int) -> list[int]:
        """Reserve slots for `n` more tokens of `seg` (all or nothing); return them."""
        self.reserve(seg, n)
        return seg.slots(seg.length - n, seg.length, self.page_size)

    def reserve(self, seg: Segment, n: int) -> None:
        """`append` without building the slot list (the engine's per-step path)."""
        need = self.pages_needed(seg, n)
        if need > len(self.free):
            raise PoolFull(f"need {need} pages, {len(self.free)} free")
        self._grow(seg, n, need)

    def reserve_all(self, work: list[tuple[Segment, int]]) -> bool:
        """`reserve` n tokens in each segment, all or nothing: False, with nothing reserved, when the
        free pages are too few. Each need is computed once (the engine's per-step path)."""
        needs = [self.pages_needed(seg, n) for seg, n in work]
        if sum(needs) > len(self.free):
            return False
        for (seg, n), need in zip(work, needs):
            self._grow(seg, n, need)
        return True

    def reserve_each(self, segs: list[Segment]) -> bool:
        """`reserve_all` of one token in each segment (a decode step): only the segments whose last
        page is full take a page."""
        ps, free = self.page_size, self.free
        # (when every segment could take a page there is no need to count those that will)
        if len(segs) > len(free) and sum(len(seg.pages) * ps == seg.length for seg in segs) > len(free):
            return False
        for seg in segs:
            if len(seg.pages) * ps == seg.length:
                self._grow(seg, 0, 1)
            seg.length += 1
        return True

    def _grow(self, seg: Segment, n: int, need: int) -> None:
        """Give `seg` `need` free pages (there are that many) and count `n` more tokens in it."""
        if need:  # most calls (a decode token with room on its last page) allocate nothing
            seg.pages += [self.free.pop() for _ in range(need)]
            self.live.add(id(seg))
        seg.length += n

    def acquire(self, segs: list[Segment]) -> None:
        for s in segs:
            if s.freed:
                raise RuntimeError("acquiring a freed segment")
            s.refs += 1

    def release(self, segs: list[Segment]) -> None:
        for s in segs:
            if s.refs <= 0:
                raise RuntimeError("segment released more often than acquired")
            s.refs -= 1
            if s.refs == 0:
                if s.freed:
                    raise RuntimeError("segment freed twice")
                self.free.extend(reversed(s.pages))
                s.pages, s.freed = [], True
                self.live.discard(id(s))

    def check(self) -> None:
        """Invariant check for tests: no page is both free and owned, none is free twice."""
        if len(set(self.free)) != len(self.free) or len(self.free) > self.num_pages:
            raise RuntimeError("a page was freed twice")
