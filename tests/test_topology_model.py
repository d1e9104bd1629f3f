"""The topology against a real (tiny, random) model: masked logits equal independent decoding."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model

from npr import grammar
from npr.modeling import token_logprobs, topology_forward, use_flex_attention
from npr.tags import tag_ids
from npr.tokens import encode_pieces
from npr.topology import collate

ATOL = 1e-4


def trajectory(tokenizer, steps=("1: For n = 1 we get 2", "2: compare both results and the sum"), prompt="x + y = z"):
    """(prompt ids, prefix through </guideline>, [step ids], takeaway-and-after ids)."""
    plans = [f"plan {i}" for i in range(len(steps))]
    text = grammar.build([(plans, [s.split(": ", 1)[1] for s in steps], "compare")], " so \\boxed{42}")
    pieces = grammar.canonical_pieces(grammar.parse(text))
    ids = encode_pieces(tokenizer, pieces)
    t = tag_ids(tokenizer)
    g = ids.index(t["</guideline>"]) + 1
    starts = [i for i, x in enumerate(ids) if x == t["<step>"]]
    ends = [i + 1 for i, x in enumerate(ids) if x == t["</step>"]]
    p = tokenizer.encode(prompt)
    return p, ids[:g], [ids[s:e] for s, e in zip(starts, ends)], ids[ends[-1] :]


def logits_of(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), **kw).logits[0]


def reference_takeaway_logits(model, prefix, steps, tail):
    """Decode each step alone on a copy of the prefix cache, concatenate the caches, run the tail."""
    from transformers import DynamicCache

    with torch.no_grad():
        base = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prefix]), past_key_values=base)
        grown = []
        for s in steps:
            c = copy.deepcopy(base)
            model(input_ids=torch.tensor([s]), past_key_values=c)
            grown.append(c)
        joined = DynamicCache(config=model.config)
        for layer in range(model.config.num_hidden_layers):
            ks = [base.layers[layer].keys] + [c.layers[layer].keys[:, :, len(prefix) :] for c in grown]
            vs = [base.layers[layer].values] + [c.layers[layer].values[:, :, len(prefix) :] for c in grown]
            joined.update(torch.cat(ks, dim=2), torch.cat(vs, dim=2), layer)
        start = len(prefix) + max(len(s) for s in steps)
        pos = torch.arange(start, start + len(tail))[None]
        out = model(input_ids=torch.tensor([tail]), past_key_values=joined, position_ids=pos)
    return out.logits[0]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_steps_and_takeaway_match_independent_decoding(tokenizer, family, attn):
    model = make_model(family, len(tokenizer), attn)
    prompt, prefix, steps, tail = trajectory(tokenizer)
    full = prompt + prefix + sum(steps, []) + tail
    ids, topo = collate([(full, len(prompt))], tag_ids(tokenizer))
    with torch.no_grad():
        got = topology_forward(model, ids, topo).logits[0]
    head = prompt + prefix
    at = len(head)
    for s in steps:  # each step, decoded alone after its prefix
        ref = logits_of(model, head + s)[len(head) :]
        assert torch.allclose(got[at : at + len(s)], ref, atol=ATOL), (family, attn)
        at += len(s)
    ref = reference_takeaway_logits(model, head, steps, tail)
    assert torch.allclose(got[at:], ref, atol=ATOL)
    # the model honours mask and positions: plain causal decoding of the same ids differs for step 2
    plain = logits_of(model, full)
    s2 = slice(len(head) + len(steps[0]), len(head) + len(steps[0]) + len(steps[1]))
    assert (plain[s2] - got[s2]).abs().max() > 1e-3
    shifted = logits_of(model, full, attention_mask=None, position_ids=topo.position_ids + 7)
    assert (shifted - got).abs().max() > 1e-3


def test_padded_and_packed_batches_match_single_rows(tokenizer):
    model = make_model("qwen3", len(tokenizer), "sdpa")
    t = tag_ids(tokenizer)
    a = trajectory(tokenizer)
    b = trajectory(tokenizer, steps=("1: one", "2: two two", "3: the sum three"), prompt="Let us try")
    seqs = [(x[0] + x[1] + sum(x[2], []) + x[3], len(x[0])) for x in (a, b)]
    singles = []
    for s in seqs:
        ids, topo = collate([s], t)
        with torch.no_grad():
            singles.append(topology_forward(model, ids, topo).logits[0])
    ids, topo = collate(seqs, t, pad_id=tokenizer.pad_token_id)  # padded batch, one per row
    with torch.no_grad():
        batch = topology_forward(model, ids, topo).logits
    for r, ref in enumerate(singles):
        assert torch.allclose(batch[r, : len(ref)], ref, atol=ATOL)
    ids, topo = collate([seqs], t)  # both packed in one row
    with torch.no_grad():
        packed = topology_forward(model, ids, topo).logits[0]
    n0 = len(seqs[0][0])
    assert torch.allclose(packed[:n0], singles[0], atol=ATOL)
    assert torch.allclose(packed[n0:], singles[1], atol=ATOL)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_flex_attention_matches_dense(tokenizer, family):
    model = make_model(family, len(tokenizer), "sdpa")
    t = tag_ids(tokenizer)
    a = trajectory(tokenizer)
    b = trajectory(tokenizer, steps=("1: one", "2: two", "3: three"), prompt="Let us")
    seqs = [(x[0] + x[1] + sum(x[2], []) + x[3], len(x[0])) for x in (a, b)]
    ids, topo = collate(seqs, t, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        dense = topology_forward(model, ids, topo).logits
        use_flex_attention(model)
        flex = topology_forward(model, ids, topo).logits
    real = topo.doc >= 0
    assert torch.allclose(dense[real], flex[real], atol=ATOL)
    lp = token_logprobs(flex, ids)
    assert lp.shape == (2, ids.shape[1] - 1) and torch.all(lp[real[:, 1:]] <= 0)


def test_compiled_flex_attention_does_not_recompile_for_new_widths(tokenizer, monkeypatch):
    """Packed rows change width at every micro-batch: the compiled kernel must take them all with
    one graph (a static compile recompiles per width, then falls back to eager flex attention).
    Compiled here with dynamo's eager backend, which counts graphs without generating code."""
    from torch._dynamo.utils import counters

    from npr import modeling

    monkeypatch.setattr(modeling, "COMPILE_BACKEND", "eager")
    model = make_model("qwen3", len(tokenizer), "sdpa")
    t = tag_ids(tokenizer)
    x = trajectory(tokenizer)
    full = x[0] + x[1] + sum(x[2], []) + x[3]
    with torch.no_grad():
        widths = (1, 2, 3, 5, 8)  # 53 to 424 tokens: one to four 128-token blocks
        dense = [topology_forward(model, *collate([(full * k, len(x[0]))], t)).logits for k in widths]
        use_flex_attention(model)
        torch._dynamo.reset()
        counters.clear()
        flex = [topology_forward(model, *collate([(full * k, len(x[0]))], t)).logits for k in widths]
    # one graph for rows of a single 128-token block (dynamo specialises sizes of 1), one for all wider rows
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    for d, f in zip(dense, flex):
        assert torch.allclose(d, f, atol=ATOL)


@pytest.mark.parametrize("tie", [False, True])
def test_token_stats_through_the_head_in_chunks_equal_full_logits(tokenizer, tie):
    """Log-probs, entropy and gradients equal the full-logits computation within 1e-5 (fp32), and no
    [rows, vocabulary] tensor taller than one chunk is ever made, forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from npr.modeling import topology_token_stats

    model = make_model("qwen3", len(tokenizer), tie=tie)
    prompt, prefix, steps, tail = trajectory(tokenizer)
    rows = [(prompt + prefix + sum(steps, []) + tail, len(prompt)), (prompt + prefix[:-1], len(prompt))]
    ids, topo = collate(rows, tag_ids(tokenizer), pad_id=0)
    V, H, chunk = model.config.vocab_size, model.config.hidden_size, 7
    weight = torch.rand(ids.shape[0], ids.shape[1] - 1)

    logits = topology_forward(model, ids, topo).logits
    logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ref = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    (ref * weight).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    class Tallest(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                # rows of vocabulary-wide values (the head's [V, H] weight and its gradient aside)
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == V and t.numel() != V * H:
                    Tallest.rows = max(Tallest.rows, t.numel() // V)
            return out

    with Tallest():
        stats = topology_token_stats(model, ids, topo, chunk=chunk)
        (stats[..., 0] * weight).sum().backward()
    assert 0 < Tallest.rows <= chunk < ids.numel()
    assert stats.shape == (*ids.shape[:1], ids.shape[1] - 1, 2)
    torch.testing.assert_close(stats[..., 0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats[..., 1], ref_ent, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    assert model.get_output_embeddings() is model.lm_head and type(model.lm_head).__name__ == "Linear"
