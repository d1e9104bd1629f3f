"""Batched sampling: the right distribution, the right support, and noise that depends on the key only."""

from __future__ import annotations

import pytest
import torch

from npr.engine.sampler import SamplingBatch, gumbel, gumbel_argmax, gumbel_of, noise_hash, noise_seed, sample


def batch(rows: int, **kw) -> SamplingBatch:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, forced=-1, masks=-1)
    base |= kw
    keys = [noise_seed(11, (-1, -1), i) for i in range(rows)]
    return SamplingBatch(*([base[k]] * rows for k in ("temperature", "top_k", "top_p", "penalty")), keys,
                         [base["forced"]] * rows, [base["masks"]] * rows)  # fmt: skip


def test_samples_follow_the_softmax_and_logprobs_are_untempered():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(40) * 2, 0)
    rows = 20_000
    toks, lps = sample(p.log()[None].expand(rows, -1), batch(rows))
    freq = torch.bincount(torch.tensor(toks), minlength=40) / rows
    assert (freq - p).abs().max() < 0.015  # 3 sigma at p = 0.5 is 0.011
    torch.testing.assert_close(torch.tensor(lps), p.log()[toks], atol=1e-5, rtol=0)
    hot, hot_lps = sample(p.log()[None].expand(2000, -1) * 1.0, batch(2000, temperature=2.0))
    torch.testing.assert_close(torch.tensor(hot_lps), p.log()[hot], atol=1e-5, rtol=0)  # raw model log-probs
    flat = torch.bincount(torch.tensor(hot), minlength=40) / 2000
    assert flat.max() < freq.max()  # a higher temperature flattens the choice


def test_logprobs_are_the_trainers_formula_bit_for_bit():
    """The engine's log-prob of a token is the RL trainer's (`modeling._head_chunk`: log-softmax of
    the fp32 logits, then gather) to the last bit, so `logprob_gap` measures the two forwards only."""
    from npr.modeling import _head_chunk

    torch.manual_seed(3)
    hidden, weight = torch.randn(64, 32), torch.randn(997, 32)
    logits = torch.nn.functional.linear(hidden, weight)  # the head, as `_head_chunk` computes it
    for b in (batch(64), batch(64, forced=5), batch(64, top_p=0.7), batch(64, temperature=0.0)):
        toks, lps = sample(logits, b)
        trainer = _head_chunk(hidden, torch.tensor(toks), weight, None)[:, 0]
        assert torch.equal(torch.tensor(lps, dtype=torch.float32), trainer)


def test_top_k_top_p_greedy_forced_and_masks():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).expand(3000, -1)
    assert set(sample(logits, batch(3000, top_k=2))[0]) == {0, 1}
    p = torch.softmax(logits[0], 0)  # 0.64, 0.24, ...: top_p=0.7 keeps the two best
    assert set(sample(logits, batch(3000, top_p=0.7))[0]) == {0, 1}
    assert set(sample(logits, batch(3000, top_p=float(p[0]) - 1e-3))[0]) == {0}
    assert set(sample(logits[:10], batch(10, temperature=0.0))[0]) == {0}
    toks, lps = sample(logits[:4], batch(4, forced=3))
    assert toks == [3] * 4 and abs(lps[0] - float(torch.log_softmax(logits[0], 0)[3])) < 1e-6
    masks = torch.tensor([[True, True, False, False, False]])
    assert set(sample(logits[:500], batch(500, masks=0), masks=masks)[0]) <= {2, 3, 4}
    assert set(sample(logits[:5], batch(5, temperature=0.0, masks=0), masks=masks)[0]) == {2}


def test_repetition_penalty_only_where_seen():
    logits = torch.tensor([[2.0, 1.9, -1.0]]).expand(2, -1)
    seen = torch.tensor([[True, False, False], [False, False, False]])
    toks, _ = sample(logits, batch(2, temperature=0.0, penalty=1.1), seen=seen)
    assert toks == [1, 0]  # 2.0 / 1.1 < 1.9 in the row that saw token 0


def test_noise_is_a_function_of_the_key_alone():
    keys = torch.tensor([noise_seed(s, (b, i), j) for s in (1, 2) for b in (-1, 0) for i in (-1, 3) for j in (0, 9)])
    g = gumbel(keys, 64)
    assert torch.equal(gumbel(keys[5:6], 64)[0], g[5]) and torch.equal(gumbel(keys.flip(0), 64).flip(0), g)
    assert len({tuple(r.tolist()) for r in g}) == len(keys)  # distinct keys, distinct noise
    big = gumbel(torch.arange(4000), 16)
    assert abs(big.mean().item() - 0.5772) < 0.02 and abs(big.std().item() - 1.2825) < 0.02  # Gumbel(0, 1)


def test_noise_is_finite_at_the_top_hash_so_masked_and_cut_ids_are_never_chosen():
    """The one hash value in 2**24 whose u rounds to 1 in fp32 must not give +inf noise: a masked
    or top-p-cut id scored -inf + inf = NaN there, and argmax chose it."""
    key, worst = noise_seed(7, (0, 0), 52373), 483  # found by search: this key's hash of id 483 is the top value
    keys, ids = torch.tensor([key]), torch.tensor([[worst]])
    assert (noise_hash(keys, ids) >> 8).item() == 2**24 - 1  # the witness really is the top value
    assert torch.isfinite(gumbel_of(keys, ids)).all() and torch.isfinite(gumbel(keys, 512)).all()
    vocab = 512
    b = SamplingBatch([1.0] * 2, [0] * 2, [1.0, 0.7], [1.0] * 2, [key] * 2, [-1] * 2, [0, -1])
    masks = torch.zeros(1, vocab, dtype=torch.bool)
    masks[0, worst] = True  # row 0: only the witness id is masked, every other id is allowed
    logits = torch.zeros(2, vocab)
    logits[1, :8] = 10.0  # row 1: top-p 0.7 keeps ids 0-7 and cuts the witness
    toks, lps = sample(logits, b, masks=masks)
    assert toks[0] != worst and toks[1] < 8 and all(lp > -30 for lp in lps)


def test_gumbel_argmax_over_vocabulary_slices_equals_the_whole_sum():
    torch.manual_seed(0)
    rows, vocab = 200, 5000  # 200 rows: slices of 1024 ids, so five of them
    keys = torch.tensor([noise_seed(3, (0, r % 4), r) for r in range(rows)])
    warm = torch.randn(rows, vocab)
    warm[:50, :1024] = float("-inf")  # a whole first slice masked: a later one wins
    warm[50:100, 1500:] = float("-inf")  # only the first two slices allowed
    noise = gumbel(keys, vocab)
    assert torch.equal(gumbel(keys, vocab, 3000), noise[:, 3000:])  # a slice is the same noise
    expect = (warm + noise).argmax(-1)
    got = gumbel_argmax(warm, keys)
    assert torch.equal(got, expect) and (got[:50] >= 1024).all() and (got[50:100] < 1500).all()
    assert len(set(got.tolist())) > 150  # spread over the vocabulary, not one slice's winner


def test_gumbel_argmax_of_few_allowed_ids_equals_the_whole_sum():
    """With few ids allowed per row (top-p, the structure mask) a CPU draws noise for those only:
    the same ids as argmax over the whole row, the first id on a tie, 0 for a row of -inf."""
    from npr.engine.sampler import _kept_argmax

    torch.manual_seed(4)
    rows, vocab = 300, 700
    keys = torch.tensor([noise_seed(5, (1, r % 3), r) for r in range(rows)])
    warm = torch.randn(rows, vocab) * 3
    allowed = torch.rand(rows, vocab) < torch.linspace(0.002, 0.3, rows)[:, None]  # 0 to ~210 ids a row
    allowed[::7, 0], allowed[3] = True, False  # row 3 allows nothing
    warm = warm.masked_fill(~allowed, float("-inf"))
    assert 4 * allowed.sum() <= warm.numel() and (allowed.sum(-1) == 0).any()  # the few-ids path, empty rows too
    expect = (warm + gumbel(keys, vocab)).argmax(-1)
    assert torch.equal(gumbel_argmax(warm, keys), expect)
    row, col = torch.tensor([0, 0, 0, 2, 2]), torch.tensor([3, 5, 9, 1, 4])
    score = torch.tensor([1.0, 2.0, 2.0, -1.0, -1.0])  # ties: ids 5 and 9, then 1 and 4
    assert _kept_argmax(score, row, col, 3, 10).tolist() == [5, 0, 1]


def test_large_vocabulary_top_k_top_p_choose_among_candidates_like_the_full_sort():
    """At a large vocabulary top-k / top-p rows choose among their best ids; the ids equal the
    full sort's, and rows whose kept mass runs past the candidates are chosen again exactly."""
    from npr.engine import sampler

    torch.manual_seed(1)
    rows, vocab = 240, 20_000
    logits = torch.randn(rows, vocab) * torch.linspace(0.2, 6.0, rows)[:, None]  # flat to peaked rows
    logits[:8] = 0.0  # flat: 1024 of 20000 ids hold 5% of the mass, so top-p 0.9 needs the full sort
    logits[8:16, 300:] = float("-inf")  # masked beyond 300 ids: every row is sure
    top_k = [0, 0, 50, 5000] * (rows // 4)  # 5000 > the candidates: those rows need the full sort too
    top_p = [0.9, 0.5, 1.0, 0.95] * (rows // 4)
    b = SamplingBatch([1.0] * rows, top_k, top_p, [1.0] * rows, [noise_seed(4, (0, 0), r) for r in range(rows)],
                      [-1] * rows, [-1] * rows)  # fmt: skip
    fast, flagged = sampler._choose(logits, b, None, None, None)
    exact, _ = sampler._choose(logits, b, None, None, None, exact=True)
    unsure = flagged.nonzero()[:, 0].tolist()
    assert set(range(8)) & set(unsure) and not set(range(8, 16)) & set(unsure)
    assert 20 < len(unsure) < rows - 20  # both paths taken
    assert all(r in unsure for r in range(16, rows) if top_k[r] == 5000)  # the kept top-k outgrows them
    sure_rows = [r for r in range(rows) if r not in unsure]
    assert torch.equal(fast[sure_rows], exact[sure_rows])
    toks, lps = sample(logits, b)  # the unsure rows chosen again: every id is the full sort's
    assert toks == exact.tolist()
    torch.testing.assert_close(torch.tensor(lps), torch.log_softmax(logits, -1)[range(rows), toks], atol=1e-5, rtol=0)


def test_candidate_choice_keeps_ids_tied_at_the_nucleus_boundary_like_the_full_sort():
    """bf16 logits tie often (steps of 1/8 from 16 to 32); `topk` orders equal scores arbitrarily,
    so the nucleus keeps every id tied with its last one, as the full sort does."""
    from npr.engine import sampler

    rows, vocab = 256, 8192
    logits = torch.full((rows, vocab), -30.0)
    logits[:, 100], logits[:, [200, 300]] = 20.0, 19.0  # p = 0.576, 0.212, 0.212: top-p 0.7 needs 200 or 300
    torch.manual_seed(3)
    logits[: rows // 2] += (torch.randn(rows // 2, vocab) * 4).bfloat16().float()  # and many chance ties
    b = SamplingBatch([1.0] * rows, [0] * rows, [0.7] * rows, [1.0] * rows,
                      [noise_seed(5, (0, 0), r) for r in range(rows)], [-1] * rows, [-1] * rows)  # fmt: skip
    fast, flagged = sampler._choose(logits, b, None, None, None)
    exact, _ = sampler._choose(logits, b, None, None, None, exact=True)
    sure = [r for r in range(rows) if not flagged[r]]
    assert len(sure) > rows // 2 and torch.equal(fast[sure], exact[sure])
    assert {200, 300} <= set(fast[rows // 2 :].tolist())  # both tied ids are drawn


def test_temperature_must_be_finite_and_tiny_ones_decode_greedily():
    from npr.engine import SamplingParams

    assert SamplingParams(temperature=1e-40).temperature == 0.0  # 1 / 1e-40 overflows fp32 logits to inf
    assert SamplingParams(temperature=0.01).temperature == 0.01
    for bad in (float("inf"), float("nan"), -0.1):
        with pytest.raises(ValueError, match="temperature must be finite"):
            SamplingParams(temperature=bad)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=float("nan"))


def _sort_and_scatter(warm, top_k, top_p):
    """Top-k / top-p through the sort's permutation: the reference `_top_k_top_p` keeps to."""
    vocab = warm.shape[-1]
    ordered, order = torch.sort(warm, dim=-1, descending=True)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    ordered = ordered.masked_fill(ordered < ordered.gather(1, (k - 1)[:, None]), float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    drop = ((probs.cumsum(-1) - probs) > top_p) | (ordered == float("-inf"))
    return warm.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def test_top_k_top_p_needs_no_permutation():
    """The filter keeps what the sort-and-scatter reference keeps; ids tied at the boundary of the
    kept prefix are kept together (the reference splits them in the sort's arbitrary order)."""
    from npr.engine import sampler

    torch.manual_seed(2)
    rows, vocab = 96, 700
    warm = torch.randn(rows, vocab) * torch.linspace(0.3, 5.0, rows)[:, None]
    warm[::3, ::2] = float("-inf")  # masked ids, as the structure mask leaves them
    top_k = torch.tensor([0, 1, 3, 40, vocab, 5000] * (rows // 6))
    top_p = torch.tensor([0.1, 0.7, 0.95, 1.0] * (rows // 4))[:, None]
    assert torch.equal(sampler._top_k_top_p(warm, top_k, top_p), _sort_and_scatter(warm, top_k, top_p))
    assert torch.equal(sampler._ascending(warm), torch.sort(warm, dim=-1).values)
    tied = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])  # top-p 0.75 needs one of the 1.0s, not three
    probs = torch.softmax(tied, -1)[0]
    assert probs[0] < 0.75 < probs[0] + probs[1]
    assert (_sort_and_scatter(tied, torch.tensor([0]), torch.tensor([[0.75]])) > float("-inf")).sum() == 2
    kept = sampler._top_k_top_p(tied, torch.tensor([0]), torch.tensor([[0.75]])) > float("-inf")
    assert kept.tolist() == [[True, True, True, True, False]]
