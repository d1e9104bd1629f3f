"""Batched token choice: penalty, structure mask, temperature, top-k, top-p and seeded noise.

Every sampling row of a step is handled in one set of tensor ops, and the chosen ids with
their log-probs come back to the host in one transfer. The Gumbel noise of a row is a hash
of (request seed, branch, token index, vocabulary id) computed on the device, so a request
decodes the same tokens whatever it is batched with, and again after a preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from npr.engine.context import int64_rows

_MASK = float("-inf")
_M32 = 0xFFFFFFFF
_BELOW_ONE = 1.0 - 2.0**-24  # the largest fp32 below 1


NOISE_KEYS = 2**62


def noise_base(seed: int, branch: tuple[int, int]) -> int:
    """The part of a noise key fixed for a whole branch (`noise_seed` adds the token index)."""
    block, step = branch
    return (seed * 1_000_003 + (block + 1) * 65_537 + (step + 1) * 8_191) % NOISE_KEYS


def noise_key(base: int, index: int) -> int:
    """The key of token `index` of a branch whose `noise_base` is `base`."""
    return (base + index * 131) % NOISE_KEYS


def noise_seed(seed: int, branch: tuple[int, int], index: int) -> int:
    """One 62-bit key per (request, branch, token index)."""
    return noise_key(noise_base(seed, branch), index)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors, in place; products stay below 2**59, so nothing
    overflows."""
    for _ in range(2):
        x ^= x >> 16
        x *= 0x45D9F3B
        x &= _M32
    x ^= x >> 16
    return x


def gumbel(keys: torch.Tensor, vocab: int, start: int = 0) -> torch.Tensor:
    """[R, vocab - start] standard Gumbel noise of vocabulary ids [start, vocab), a pure function
    of each row's key and the id."""
    return gumbel_of(keys, torch.arange(start, vocab, device=keys.device, dtype=torch.int64)[None, :])


def noise_hash(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The 32-bit hashes [R, n] behind the noise of the ids [R or 1, n] in each row of `keys`."""
    lo, hi = (keys & _M32)[:, None], _mix(keys >> 32)[:, None]
    return _mix(_mix(ids ^ hi) ^ lo)


def gumbel_of(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The Gumbel noise of the ids [R or 1, n] in each row: the same values `gumbel` gives them.

    u = (top 24 bits + 0.5) / 2**24 in fp32, where x + 0.5 rounds to an even integer from 2**23
    on; so the top value would round to u = 1, whose noise is +inf, and an id that is masked
    (-inf) or cut by top-p would then score -inf + inf = NaN, which argmax picks (one (key, id)
    in 2**24: at top-p 0.7 over the demo model's 1,080 ids, one sampled token in ~15,600).
    Capping u just below 1 keeps the noise finite and changes no other value."""
    u = (noise_hash(keys, ids) >> 8).to(torch.float32).add_(0.5).mul_(1.0 / 2**24).clamp_(max=_BELOW_ONE)
    return u.log_().neg_().log_().neg_()


def gumbel_argmax(warm: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """argmax(warm + gumbel(keys)) per row: the same ids as the whole [R, V] sum (the first id on
    a tie), without its int64 temporaries: on a CPU over the allowed (finite) ids alone when they
    are few (`_kept_argmax`), else over slices of the vocabulary. At a 152k
    vocabulary and 64 rows each of the hash's ~30 passes would write 78 MB, and on 2 CPU cores
    the noise took 0.57 s a step; slices that stay in cache are several times faster (and on a
    GPU a few large slices keep the launches few)."""
    rows, vocab = warm.shape
    if reads_are_free(warm):  # which ids are allowed, known without a sync: noise for those only
        allowed = warm != _MASK  # counted before listed: listing most of [R, V] cost a dense row 1/5 more
        if 4 * int(allowed.sum()) <= warm.numel():
            row, col = allowed.nonzero(as_tuple=True)
            return _kept_argmax(warm[row, col] + gumbel_of(keys[row], col[:, None])[:, 0], row, col, rows, vocab)
    width = max(1024, (1 << (24 if warm.is_cuda else 17)) // max(rows, 1))
    best = tok = None
    for start in range(0, vocab, width):
        end = min(start + width, vocab)
        score = gumbel(keys, end, start).add_(warm[:, start:end])
        top, at = score.max(-1)
        if best is None:
            best, tok = top, at
        else:
            better = top > best  # strictly: an earlier slice keeps a tie, as argmax does
            best, tok = torch.where(better, top, best), torch.where(better, at + start, tok)
    return tok


def reads_are_free(t: torch.Tensor) -> bool:
    """Whether the host may read `t` (its values, a data-dependent shape) at no cost: on a CPU; on
    a GPU it is a sync. The sync-count test patches it to answer as a GPU would."""
    return t.device.type == "cpu"


def _kept_argmax(score: torch.Tensor, row: torch.Tensor, col: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """Per row, the first `col` of the highest `score` among its (row, col) pairs (in row-major
    order, as `nonzero` lists them): argmax of the whole row when every other id is -inf. Top-p
    keeps a handful of a row's ids (and a tag-only phase of the structure mask few more), so the
    hash's ~30 passes run over those instead of rows x vocab (on 2 CPU cores the noise was a
    third of a top-p sampling step of the demo's model; the values, and so the ids, are the same)."""
    best = score.new_full((rows,), _MASK).scatter_reduce_(0, row, score, "amax")
    first = torch.where(score == best[row], col, vocab)  # a tie goes to the first id, as argmax does
    # a row with no pair keeps 0, argmax's answer for a row of -inf
    return col.new_zeros(rows).scatter_reduce_(0, row, first, "amin", include_self=False)


@dataclass
class SamplingBatch:
    """Per-row settings of the rows sampled in one step (host lists, moved in one copy)."""

    temperature: list[float]
    top_k: list[int]  # 0 = off
    top_p: list[float]
    penalty: list[float]  # 1.0 = off (rows outside a step)
    keys: list[int]  # noise keys (noise_seed)
    forced: list[int]  # replayed token, or -1 to sample
    masks: list[int]  # index into the stacked structure masks, or -1

    @classmethod
    def of_rows(cls, rows: list[tuple]) -> SamplingBatch:
        """From one tuple per row, in the field order (cheaper to build than seven appends a row)."""
        return cls(*map(list, zip(*rows))) if rows else cls([], [], [], [], [], [], [])


def sample(
    logits: torch.Tensor,
    batch: SamplingBatch,
    seen: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
) -> tuple[list[int], list[float]]:
    """Choose one token per row of `logits` [R, V]; return (ids, log-probs under the raw logits).

    `seen` [R, V] bool marks the tokens the repetition penalty applies to; `masks` [U, V] bool
    holds the distinct structure masks (True = disallowed) that `batch.masks` points into.
    """
    dev = logits.device
    logits = logits.float()
    free = [r for r, f in enumerate(batch.forced) if f < 0]  # rows that choose (the rest replay a target)
    forced = int64_rows(dev, batch.forced)[0]
    tok, unsure = forced, None
    if free:  # a step that only replays (benchmarks, tests) pays for no choice at all
        rows = free if len(free) < len(batch.forced) else None
        tok = forced.clone()
        tok[_at(rows, dev)], unsure = _choose(logits, batch, rows, seen, masks)
    logp = torch.log_softmax(logits, -1)  # the trainer's formula (modeling._head_chunk), one fused pass
    flags = []  # rows whose top-p mass ran past their candidates (rare), known after the transfer
    if unsure is not None:
        flags.append(torch.zeros_like(tok).index_copy_(0, _at(free, dev), unsure.long()))
    out = _transfer(logp, tok, flags)  # the step's one device -> host sync
    again = [r for r, u in enumerate(out[2]) if u] if flags else []
    if again:  # chosen again over the whole vocabulary
        tok[_at(again, dev)], _ = _choose(logits, batch, again, seen, masks, exact=True)
        out = _transfer(logp, tok)
    return out[0], out[1]


def _transfer(logp, tok, extra=()) -> list[list]:
    """[ids, their log-probs in `logp` (the raw logits' log-softmax), *extra] as host lists, in one
    copy: one int64 tensor, the log-probs as the bits of float64s (so the ids need no conversion
    from floats)."""
    chosen = logp.gather(1, tok[:, None])[:, 0]
    host = torch.stack([tok, chosen.double().view(torch.int64), *extra]).cpu()
    return [host[0].tolist(), host[1].view(torch.float64).tolist(), *(h.tolist() for h in host[2:])]


def _at(rows: list[int] | None, dev) -> torch.Tensor | slice:
    return slice(None) if rows is None else int64_rows(dev, rows)[0]


def _choose(
    logits, batch: SamplingBatch, rows: list[int] | None, seen, masks, exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Penalty, structure mask, then argmax or seeded Gumbel-max over the rows that choose
    (`rows`, None = all): the same ids whichever rows share the step. Returns (ids, unsure):
    `unsure` marks the rows (if any took the candidate path) to choose again with `exact`."""
    dev, vocab = logits.device, logits.shape[-1]
    pick = list(range(len(batch.forced))) if rows is None else rows
    at = _at(rows, dev)

    def col(values, dtype):
        return torch.tensor([values[r] for r in pick], dtype=dtype).to(dev, non_blocking=True)

    scores = logits[at]
    if seen is not None and any(batch.penalty[r] != 1.0 for r in pick):
        pen = col(batch.penalty, torch.float32)[:, None]
        hit = seen[at] & (pen != 1.0)
        scores = torch.where(hit, torch.where(scores > 0, scores / pen, scores * pen), scores)
    if masks is not None and any(batch.masks[r] >= 0 for r in pick):
        mask_idx = col(batch.masks, torch.int64)
        disallowed = masks[mask_idx.clamp(min=0)] & (mask_idx >= 0)[:, None]
        scores = scores.masked_fill(disallowed, _MASK)
    tok, unsure = scores.argmax(-1), None
    drawn = [i for i, r in enumerate(pick) if batch.temperature[r] > 0]
    if not drawn:
        return tok, unsure
    # only rows that really sample pay for noise; only rows with top-k or top-p for the filter
    temp, keys = col(batch.temperature, torch.float32)[:, None], col(batch.keys, torch.int64)
    filtered = {i for i in drawn if 0 < batch.top_k[pick[i]] < vocab or batch.top_p[pick[i]] < 1.0}
    for part in ([i for i in drawn if i not in filtered], sorted(filtered)):
        if not part:
            continue
        d = _at(part if len(part) < len(pick) else None, dev)
        warm = scores[d] / temp[d]
        if part[0] not in filtered:
            tok[d] = gumbel_argmax(warm, keys[d])
            continue
        top_k, top_p = col(batch.top_k, torch.int64)[d], col(batch.top_p, torch.float32)[:, None][d]
        if exact or vocab < 4 * CANDIDATES:
            tok[d] = gumbel_argmax(_top_k_top_p(warm, top_k, top_p), keys[d])
        else:
            tok[d], sure = _candidate_choice(warm, keys[d], top_k, top_p)
            unsure = torch.zeros(len(pick), dtype=torch.bool, device=dev)
            unsure[d] = ~sure
    return tok, unsure


CANDIDATES = 1024  # top-k / top-p rows of a large vocabulary choose among their best ids


def _candidate_choice(warm, keys, top_k, top_p) -> tuple[torch.Tensor, torch.Tensor]:
    """`_top_k_top_p` then Gumbel-max, over each row's `CANDIDATES` best ids instead of a sort and
    noise over the whole vocabulary (at 152k ids and 64 rows, a top-p 0.7 sampling step took
    0.10 s instead of 0.63 on 2 CPU cores). Exact, up to rounding at the p boundary, for the rows
    it returns `sure`: those where every id past the candidates is dropped anyway (by top-k with
    no tie of the k-th past them, by top-p with no tie of the nucleus's last score past them, or
    masked). Ids tied with that last score are kept together, as in `_top_k_top_p`: bf16 logits
    tie often (steps of 0.125 from 16 to 32), and `topk` orders equals arbitrarily."""
    vocab = warm.shape[-1]
    best, ids = warm.topk(CANDIDATES, -1)  # sorted, best first
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    limited = k <= CANDIDATES
    kth = best.gather(1, (k.clamp(max=CANDIDATES) - 1)[:, None])
    kept = best.masked_fill(limited[:, None] & (best < kth), _MASK)
    # the softmax's denominator: the kept top-k (all among the candidates) or the whole vocabulary
    lse = torch.where(limited, kept.logsumexp(-1), warm.logsumexp(-1))[:, None]
    nucleus = _nucleus_floor(kept, (kept - lse).exp(), top_p)
    last = best[:, -1]
    whole = k >= vocab  # no top-k: the denominator above is right only for these or for `limited`
    sure = (last == _MASK) | (limited & (last < kth[:, 0])) | (whole & (last < nucleus[:, 0]))
    choice = (kept.masked_fill(kept < nucleus, _MASK) + gumbel_of(keys, ids)).argmax(-1)
    return ids.gather(1, choice[:, None])[:, 0], sure


def _top_k_top_p(warm: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's k best tokens (ties at the k-th kept), then the smallest prefix reaching p:
    every id scoring at least the last one that prefix needs (so ids of equal score share a fate).
    Only the sorted scores are needed, not the permutation."""
    vocab = warm.shape[-1]
    ordered = _ascending(warm).flip(-1)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth = ordered.gather(1, (k - 1)[:, None])
    ordered = ordered.masked_fill(ordered < kth, _MASK)
    return warm.masked_fill(warm < _nucleus_floor(ordered, torch.softmax(ordered, dim=-1), top_p), _MASK)


def _nucleus_floor(ordered: torch.Tensor, probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[R, 1]: the score of the last id each row's nucleus needs (the smallest prefix of `ordered`,
    scores best first, whose `probs` reach top_p); an id scoring at least that is kept, so ids
    tied with it share its fate whatever order the sort left them in."""
    drop = ((probs.cumsum(-1) - probs) > top_p) | (ordered == _MASK)  # the mass before it reaches top_p
    needed = (~drop).sum(-1, keepdim=True).clamp(min=1)  # the best of a row is never dropped
    return ordered.gather(1, needed - 1)


def _ascending(x: torch.Tensor) -> torch.Tensor:
    """Each row's values in ascending order, without the permutation: on a CPU numpy's vectorised
    sort, as torch.sort always builds the permutation too and is ~25x slower there (64 rows of
    512: 50 us against 1.3 ms on 2 cores, which was most of a sampling step of the tiny model)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    return torch.sort(x, dim=-1).values
