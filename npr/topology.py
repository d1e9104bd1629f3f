"""Positions and visibility of parallel trajectories: the paper's Algorithms 1 and 2 (docs/design.md §3).

From token ids alone, every token gets a position id and two labels: the block whose
steps it belongs to and its branch (step index) there, -1 outside steps. A token sees
every earlier token of its own trajectory except the tokens of sibling steps. These
O(L) labels are the one representation: the dense mask (tests, short rows) and the
FlexAttention BlockMask (GPUs) are both built from them, and the engine uses the same
position rules (`step_start`, `join_position`) while it decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from npr.tags import GUIDELINE, GUIDELINE_END, NEXT_PHASE, PLAN, STEP, STEP_END, TAKEAWAY


class TopologyError(ValueError):
    """The token sequence has no well-defined parallel topology (it is not executable)."""


def step_start(prefix_last_position: int) -> int:
    """Every step of a block starts right after the last position before its first step."""
    return prefix_last_position + 1


def join_position(step_last_positions: Sequence[int]) -> int:
    """`<takeaway>` comes after the longest step."""
    return max(step_last_positions) + 1


@dataclass
class Layout:
    """Topology of one sequence (prompt + response), one entry per token."""

    positions: list[int]
    block: list[int]  # index of the block whose step holds the token, else -1
    branch: list[int]  # index of that step within its block, else -1
    complete: bool  # False when the sequence stops inside a block (truncated)


def layout(ids: Sequence[int], tag_ids: dict[str, int], prompt_len: int = 0) -> Layout:
    """Compute positions and step membership; raise TopologyError on malformed structure.

    Tags inside the prompt are ignored. A sequence cut off inside a block is allowed (its
    topology is the prefix of the full one); `Layout.complete` tells. Text between two
    steps (never present in canonical form) belongs to the step before it, so nothing
    leaks from one step into a sibling.
    """
    tag_of = {i: t for t, i in tag_ids.items()}
    n = len(ids)
    positions = list(range(min(prompt_len, n))) + [0] * max(0, n - prompt_len)
    block, branch = [-1] * n, [-1] * n
    phase, nblocks = "out", -1
    nplans = nsteps = 0
    nxt = prompt_len  # next position on the main line
    base = cur = 0  # steps: start position, next position within the current step
    step_ends: list[int] = []
    for i in range(prompt_len, n):
        tag = tag_of.get(ids[i])
        if tag is not None:
            if tag not in NEXT_PHASE[phase]:
                raise TopologyError(f"unexpected {tag} at token {i} (after {phase!r})")
            if tag == GUIDELINE:
                nblocks, nplans, nsteps, step_ends = nblocks + 1, 0, 0, []
            elif tag == PLAN:
                nplans += 1
            elif tag == GUIDELINE_END and nplans == 0:
                raise TopologyError(f"<guideline> without plans ending at token {i}")
            elif tag == STEP:
                if nsteps == nplans:
                    raise TopologyError(f"step {nsteps + 1} at token {i} exceeds the {nplans} plans")
                if nsteps == 0:
                    base = step_start(nxt - 1)
                nsteps, cur = nsteps + 1, base
                step_ends.append(base)
            elif tag == TAKEAWAY:
                if nsteps != nplans:
                    raise TopologyError(f"<takeaway> at token {i} after {nsteps} steps for {nplans} plans")
                nxt = join_position(step_ends)
            phase = NEXT_PHASE[phase][tag]
        glue = tag is None and phase == "steps" and nsteps > 0
        if phase == "step" or tag == STEP_END or glue:
            positions[i], step_ends[-1] = cur, cur
            block[i], branch[i] = nblocks, nsteps - 1
            cur += 1
        else:
            positions[i] = nxt
            nxt += 1
    return Layout(positions, block, branch, complete=phase == "out")


def executable(ids: Sequence[int], tag_ids: dict[str, int], prompt_len: int = 0) -> str | None:
    """Schema filter: None when the sequence is complete and has a topology, else the reason."""
    try:
        lay = layout(ids, tag_ids, prompt_len)
    except TopologyError as e:
        return str(e)
    return None if lay.complete else "sequence ends inside a block"


@dataclass
class Topology:
    """A batch of rows, each holding one or more trajectories (packed) and right padding."""

    position_ids: torch.Tensor  # [B, L] long
    block: torch.Tensor  # [B, L] long: row-unique block id for step tokens, -1 elsewhere
    branch: torch.Tensor  # [B, L] long
    doc: torch.Tensor  # [B, L] long: trajectory index within the row, -1 for padding

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.doc.shape)

    def to(self, device) -> Topology:
        return Topology(*(t.to(device) for t in (self.position_ids, self.block, self.branch, self.doc)))


# (token ids, prompt length), or (token ids, Layout) when the layout is known already (the engine's)
Trajectory = tuple[Sequence[int], "int | Layout"]


def collate(
    rows: Sequence[Sequence[Trajectory]] | Sequence[Trajectory],
    tag_ids: dict[str, int],
    pad_id: int = 0,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, Topology]:
    """Lay out a batch: each row is a list of trajectories packed end to end, rows right-padded.

    A flat list of (ids, prompt_len) pairs means one trajectory per row.
    """
    if rows and isinstance(rows[0], tuple) and isinstance(rows[0][1], (int, Layout)):
        rows = [[r] for r in rows]
    width = max([sum(len(ids) for ids, _ in row) for row in rows] + [pad_to or 0])
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    block = torch.full(shape, -1, dtype=torch.long)
    branch = torch.full(shape, -1, dtype=torch.long)
    doc = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at, nblocks = 0, 0
        for d, (ids, known) in enumerate(row):
            lay = known if isinstance(known, Layout) else layout(ids, tag_ids, known)
            if len(lay.positions) != len(ids):
                raise ValueError(f"layout of {len(lay.positions)} tokens given for {len(ids)} ids")
            sl = slice(at, at + len(ids))
            input_ids[r, sl] = torch.as_tensor(list(ids), dtype=torch.long)
            pos[r, sl] = torch.as_tensor(lay.positions)
            b = torch.as_tensor(lay.block)
            block[r, sl] = torch.where(b >= 0, b + nblocks, b)
            branch[r, sl] = torch.as_tensor(lay.branch)
            doc[r, sl] = d
            nblocks += max(lay.block, default=-1) + 1
            at += len(ids)
    return input_ids, Topology(pos, block, branch, doc)


def visible(topo: Topology, b, q, kv):
    """Visibility rule shared by the dense mask and the FlexAttention mask_mod."""
    same_doc = (topo.doc[b, q] == topo.doc[b, kv]) & (topo.doc[b, kv] >= 0)
    bq, bk = topo.block[b, q], topo.block[b, kv]
    siblings = (bq == bk) & (bq >= 0) & (topo.branch[b, q] != topo.branch[b, kv])
    return (same_doc & (kv <= q) & ~siblings) | (q == kv)  # padding sees itself only (no NaN rows)


def dense_mask(topo: Topology) -> torch.Tensor:
    """Boolean visibility [B, 1, L, L] (True = may attend)."""
    B, L = topo.shape
    b = torch.arange(B, device=topo.doc.device)[:, None, None]
    q = torch.arange(L, device=topo.doc.device)[None, :, None]
    kv = torch.arange(L, device=topo.doc.device)[None, None, :]
    return visible(topo, b, q, kv)[:, None]


def additive_mask(topo: Topology, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float mask [B, 1, L, L]: 0 where visible, the dtype's minimum elsewhere (eager and SDPA)."""
    m = dense_mask(topo)
    return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)


def block_mask(topo: Topology, block_size: int = 128):
    """FlexAttention BlockMask built from the O(L) labels (never an L x L tensor on GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = topo.shape

    def mask_mod(b, h, q, kv):
        return visible(topo, b, q, kv)

    # compiled on GPU so the L x L mask is never materialised; eager on CPU (tests)
    compile_ = topo.doc.is_cuda
    return create_block_mask(mask_mod, B, None, L, L, device=topo.doc.device, BLOCK_SIZE=block_size, _compile=compile_)
