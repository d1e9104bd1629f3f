"""Algorithms 1-2 on token ids: positions, visibility, batches, malformed input."""

from __future__ import annotations

import pytest
import torch

from npr.tags import TAGS
from npr.topology import TopologyError, collate, dense_mask, executable, layout

T = {t: i for i, t in enumerate(TAGS)}
G, G_, P, P_, S, S_, K, K_ = (T[t] for t in TAGS)
W = 100  # any ordinary word


def block(*step_lens, plan_len=2):
    """Token ids of a canonical block with steps of the given lengths (labels and text as words)."""
    ids = [G]
    for _ in step_lens:
        ids += [P] + [W] * plan_len + [P_]
    ids += [G_]
    for n in step_lens:
        ids += [S] + [W] * n + [S_]
    return ids + [K, W, K_]


def test_positions_follow_algorithm_2():
    prompt = [W] * 3
    ids = prompt + block(2, 4) + [W]
    lay = layout(ids, T, prompt_len=3)
    g = ids.index(G_)  # position of </guideline> equals its index (nothing before it is parallel)
    assert lay.positions[: g + 1] == list(range(g + 1))
    s1 = list(range(g + 1, g + 1 + 4))  # <step> w w </step>
    s2 = list(range(g + 1, g + 1 + 6))
    assert lay.positions[g + 1 : g + 5] == s1
    assert lay.positions[g + 5 : g + 11] == s2
    k = ids.index(K)
    assert lay.positions[k:] == [max(s1 + s2) + 1 + i for i in range(len(ids) - k)]
    assert lay.block[g + 1 : g + 11] == [0] * 10
    assert lay.branch[g + 1 : g + 11] == [0] * 4 + [1] * 6
    assert lay.block[k] == -1 and lay.complete


def test_visibility_isolates_siblings_only():
    ids = block(2, 3) + block(1, 1, 1) + [W]
    _, topo = collate([(ids, 0)], T)
    m = dense_mask(topo)[0, 0]
    lay = layout(ids, T)
    n = len(ids)
    for q in range(n):
        for kv in range(n):
            sib = lay.block[q] == lay.block[kv] >= 0 and lay.branch[q] != lay.branch[kv]
            assert bool(m[q, kv]) == (kv <= q and not sib), (q, kv)
    # second block's steps see both steps of the first block; the final token sees everything
    assert m[-1].all()


def test_several_blocks_and_prompt_tags_are_ignored():
    prompt = [W, S, W, K]  # an instruction that mentions tags
    ids = prompt + block(3) + [W] + block(1, 2)
    lay = layout(ids, T, prompt_len=len(prompt))
    assert lay.positions[: len(prompt)] == [0, 1, 2, 3]
    assert max(lay.block) == 1 and lay.complete
    # one-step block: positions run on without a gap
    first = len(prompt) + len(block(3))
    assert lay.positions[: first + 1] == list(range(first + 1))


def test_glue_between_steps_belongs_to_the_previous_step():
    ids = [G, P, W, P_, P, W, P_, G_, S, W, S_, W, W, S, W, S_, K, K_]
    lay = layout(ids, T)
    assert lay.branch[11:13] == [0, 0] and lay.positions[11] == lay.positions[10] + 1
    _, topo = collate([(ids, 0)], T)
    m = dense_mask(topo)[0, 0]
    assert not m[13:16, 11:13].any()  # step 2 does not see the glue written after step 1


@pytest.mark.parametrize(
    "ids, message",
    [
        ([G, P, W, P_, G_, S, W, S_, S, W, S_, K, K_], "exceeds"),
        ([G, P, W, P_, P, W, P_, G_, S, W, S_, K, K_], "1 steps for 2 plans"),
        ([G, G_, K, K_], "without plans"),
        ([G, P, W, S_], "unexpected </step>"),
        ([S, W, S_], "unexpected <step>"),
        ([G, P, W, P_, G_, S, W, S_, K, W, G], "unexpected <guideline>"),
    ],
)
def test_malformed_structure_is_an_error(ids, message):
    with pytest.raises(TopologyError, match=message):
        layout(ids, T)
    assert executable(ids, T) is not None


def test_truncated_sequence_is_a_prefix_of_the_full_layout():
    full = block(2, 3) + [W]
    ref = layout(full, T)
    for cut in range(1, len(full)):
        lay = layout(full[:cut], T)
        assert lay.positions == ref.positions[:cut] and lay.branch == ref.branch[:cut]
        assert (executable(full[:cut], T) is None) == lay.complete
    assert executable(full, T) is None


def test_padding_rows_are_isolated_and_not_nan():
    a, b = block(2, 2), block(1) + [W] * 9
    ids, topo = collate([(a, 0), (b, 0)], T, pad_id=7)
    assert ids.shape == (2, max(len(a), len(b)))
    m = dense_mask(topo)
    assert (ids[0, len(a) :] == 7).all() and (topo.doc[0, len(a) :] == -1).all()
    pads = torch.nonzero(topo.doc[0] < 0).flatten()
    for p in pads:  # padding sees only itself; real tokens never see padding
        assert m[0, 0, p].sum() == 1 and not m[0, 0, : len(a), p].any()
