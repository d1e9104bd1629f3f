"""RL objectives and rewards against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from npr import grammar
from npr.rewards import get_reward, stage1, stage1_gated
from npr.train.objectives import batch_advantages, dapo_loss, group_advantages, overlong_penalty, papo_loss


def test_group_advantages_and_zero_variance_groups():
    r = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5, 0.5])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = group_advantages(r, g)
    mean, std = 0.5, math.sqrt(0.75)
    assert adv[:4].tolist() == pytest.approx([(x - mean) / std for x in (1, -1, 1, 1)], rel=1e-4)
    assert adv[4:].tolist() == [0.0, 0.0]


def test_batch_advantages_use_the_batch_std():
    r = torch.tensor([1.0, -1.0, 2.0, 0.0])
    g = torch.tensor([0, 0, 1, 1])
    adv = batch_advantages(r, g)  # centred [1, -1, 1, -1]; the raw rewards' std (unbiased) is sqrt(5/3)
    assert adv.tolist() == pytest.approx([x / math.sqrt(5 / 3) for x in (1, -1, 1, -1)], rel=1e-4)
    assert batch_advantages(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])).tolist() == [0.0, 0.0]


def test_dapo_clip_higher_and_token_mean():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = dapo_loss(logp, old, adv, mask, 0.2, 0.28)
    # A>0: min(r, clip(r)) = 1.28, 1.0, 0.5 ; A<0: -max(r, clip(r))... = min(-r, -clip(r)) = -1.5, -1.0
    per = [-1.28, -1.0, -0.5, 1.5, 1.0]
    assert float(loss) == pytest.approx(sum(per) / 5, rel=1e-5)
    assert stats["clip_fraction"] == pytest.approx(1 / 5)  # only r=1.5 with A>0 loses its gradient


def test_dapo_gradient_is_zero_where_clipped():
    logp = torch.log(torch.tensor([[2.0, 1.0]])).requires_grad_()
    loss, _ = dapo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0


def test_papo_gradient_is_advantage_times_grad_logp():
    logp = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    papo_loss(logp, torch.tensor([2.0]), torch.ones(1, 2)).backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.0, -1.0])


def test_overlong_penalty():
    out = overlong_penalty(torch.tensor([10, 80, 90, 100, 120]), max_len=100, buffer=20)
    assert out.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_stage1_reward_on_crafted_responses():
    meta = {"grader": "math", "answer": "12"}
    good = "<guideline><plan>1: count</plan></guideline><step>1: it is 12</step><takeaway>12</takeaway>\\boxed{12}"
    assert stage1("p", good, "12", meta) == 1.0
    assert stage1("p", good.replace("{12}", "{13}"), "12", meta) == -1.0
    assert -3.0 < stage1("p", "just \\boxed{13}", "12", meta) < -2.5  # no block and wrong: the worst
    assert -1.0 < stage1("p", good.replace("<takeaway>12</takeaway>", ""), "12", meta) < 1.0  # malformed, right
    cd = {"grader": "countdown", "numbers": [2, 3], "target": 6}
    assert stage1("p", good.replace("\\boxed{12}", "\\boxed{2*3}"), "", cd) == 1.0
    assert stage1_gated("p", "just \\boxed{12}", "12", meta) == pytest.approx(grammar.parse("just").format_score)


MALFORMED = [  # one mistake each, from the mildest penalty to the worst
    lambda g: g.replace("</guideline><step>", "</guideline> glue <step>"),
    lambda g: g.replace("<step>1: it is 12</step>", "<step>1: </step>"),
    lambda g: g.replace("<takeaway>12</takeaway>", ""),
    lambda g: g.replace("<step>1: it is 12</step>", ""),
    lambda g: "just " + g[g.index("\\boxed") :],
]


@pytest.mark.parametrize("break_format", MALFORMED)
def test_stage1_reward_has_no_loophole(break_format):
    """Additive reading: breaking the format never pays, whatever the answer; the gated reading
    (the switch) lets a malformed answer beat a well-formed wrong one."""
    meta = {"grader": "math", "answer": "12"}
    good = "<guideline><plan>1: count</plan></guideline><step>1: it is 12</step><takeaway>12</takeaway>\\boxed{12}"
    wrong = good.replace("{12}", "{13}")
    bad_right, bad_wrong = break_format(good), break_format(wrong)
    assert grammar.parse(bad_right).format_score < 0
    r = {t: stage1("p", t, "12", meta) for t in (good, wrong, bad_right, bad_wrong)}
    assert r[good] > r[bad_right] > r[wrong] > r[bad_wrong]  # format and accuracy both always pay
    if grammar.parse(bad_wrong).format_score > -1.0:  # the gated reading's loophole
        assert stage1_gated("p", bad_wrong, "12", meta) > stage1_gated("p", wrong, "12", meta)


def test_reward_lookup():
    meta = {"grader": "math", "answer": "12"}
    assert get_reward("stage1_gated") is stage1_gated
    assert get_reward("npr.rewards:accuracy")("p", "\\boxed{12}", "12", meta) == 1.0
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("nope")
