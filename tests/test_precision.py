"""Mixed precision: a bf16 model trains through fp32 master weights, as the fp32 reference does."""

from __future__ import annotations

import copy

import torch
from conftest import make_model

from npr.train.config import OptimConfig
from npr.train.loop import make_optimizer, optimizer_step
from npr.train.policy import Policy


def _steps(model, n: int, lr: float, tokenizer):
    """`n` AdamW steps of the trainer's own optimiser path on a fixed next-token loss."""
    policy = Policy(model, tokenizer)
    opt, sched = make_optimizer(policy, OptimConfig(lr=lr, grad_clip=1e9), n)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer_step(policy, opt, sched, grad_clip=1e9)
    return policy, opt


def test_bf16_model_moves_like_the_fp32_reference_at_lr_1e_6(tokenizer):
    bf16 = make_model("qwen3", len(tokenizer)).to(torch.bfloat16).train()
    fp32 = copy.deepcopy(bf16).float()  # the same starting values, exactly
    start = {n: p.detach().float().clone() for n, p in fp32.named_parameters()}
    lr, n = 1e-6, 3
    policy, opt = _steps(bf16, n, lr, tokenizer)
    _steps(fp32, n, lr, tokenizer)
    names = [name for name, _ in bf16.named_parameters()]
    moved_master, moved_ref, agree = 0, 0, 0
    for name, master, ref in zip(names, policy.master, (p for _, p in fp32.named_parameters())):
        d_master, d_ref = master.detach() - start[name], ref.detach() - start[name]
        live = d_ref != 0  # unused tokens' embedding rows get no gradient in either
        moved_ref += int(live.sum())
        moved_master += int((d_master[live] != 0).sum())
        # Adam's steps are about lr each: the same direction and size as the reference's
        agree += int(((d_master - d_ref).abs() <= 0.25 * d_ref.abs())[live].sum())
    total = sum(p.numel() for p in fp32.parameters())
    assert moved_ref > 0.5 * total and moved_master > 0.99 * moved_ref
    assert agree > 0.95 * moved_ref, agree / moved_ref
    # the model's weights are the masters rounded to bf16, and the masters resume exactly
    for p, m in zip(bf16.parameters(), policy.master):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))
    state = policy.optimizer_state(opt)
    fresh, fresh_opt = _steps(copy.deepcopy(bf16), 0, lr, tokenizer)
    fresh.load_optimizer_state(fresh_opt, state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.master, policy.master))


def test_without_masters_bf16_adam_steps_are_lost(tokenizer):
    """The failure the masters prevent: AdamW on the bf16 tensors themselves moves almost nothing."""
    model = make_model("qwen3", len(tokenizer)).to(torch.bfloat16).train()
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    moved = sum(int((p.detach() != s).sum()) for p, s in zip(model.parameters(), start))
    assert moved < 0.2 * sum(p.numel() for p in model.parameters())


def test_micro_batch_gradients_accumulate_in_fp32_masters(tokenizer):
    """Two micro-batches of a bf16 model: the master's gradient is the fp32 sum of the two bf16
    gradients (a bf16 buffer would round the sum), and no bf16 gradient is left on the model."""
    model = make_model("qwen3", len(tokenizer)).to(torch.bfloat16).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 2, 24), generator=torch.Generator().manual_seed(1))
    alone = []
    for part in ids:  # each micro-batch's gradient on its own, in bf16
        model.zero_grad(set_to_none=True)
        model(input_ids=part, labels=part).loss.backward()
        alone.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    policy = Policy(model, tokenizer)
    make_optimizer(policy, OptimConfig(lr=1e-6), 1)
    for part in ids:
        model(input_ids=part, labels=part).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    rounded = 0
    for m, g1, g2 in zip(policy.master, *alone):
        exact = g1.float() + g2.float()
        assert torch.equal(m.grad, exact)
        rounded += int(((g1 + g2).float() != exact).sum())  # what bf16 accumulation would have lost
    assert rounded > 0


def test_bf16_output_head_gradient_sums_its_chunks_in_fp32():
    """The head runs 16 tokens at a time here (1,024 in training): 128 chunk gradients of the weight.
    Summed in bf16 they drift ~1.4 % from the exact gradient; summed in fp32, within one bf16
    rounding of each chunk (~0.3 %)."""
    import torch.nn.functional as F

    from npr.modeling import TokenStatsHead

    g = torch.Generator().manual_seed(0)
    V, H, L = 96, 32, 2048
    head = torch.nn.Linear(H, V, bias=False).to(torch.bfloat16)
    hidden = torch.randn(1, L, H, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, V, (1, L), generator=g)
    weight = torch.randn(1, L, generator=g)  # per-token factors, like advantages
    out = TokenStatsHead(head, targets, chunk=16)(hidden)
    (out[..., 0] * weight).sum().backward()
    exact = head.weight.detach().double().requires_grad_()
    logp = F.log_softmax(F.linear(hidden.double(), exact), -1).gather(-1, targets[..., None]).squeeze(-1)
    (logp * weight.double()).sum().backward()
    assert head.weight.grad.dtype == torch.bfloat16
    err = float((head.weight.grad.double() - exact.grad).norm() / exact.grad.norm())
    assert err < 0.005, err
    with torch.no_grad():  # the old policy's log-probs: no fp32 copy of the weight, the same values
        assert torch.equal(TokenStatsHead(head, targets, chunk=16)(hidden), out.detach())
    head.weight.requires_grad_(False)  # a frozen head (LoRA): no copy either, the same values
    assert torch.equal(TokenStatsHead(head, targets, chunk=16)(hidden.requires_grad_()).detach(), out.detach())
