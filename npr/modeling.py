"""Run an unmodified Hugging Face causal LM under a parallel topology.

Two attention paths, one answer: a dense 4-D additive mask (eager or SDPA; CPU and
short rows) and FlexAttention with a BlockMask built from O(L) labels (the fast path
on GPUs, eager on CPU for tests). Positions are passed as `position_ids`; RoPE stays
inside the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from npr.topology import Topology, additive_mask, block_mask

FLEX = "npr_flex"


def _flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if query.is_cuda:  # eager flex attention materialises scores; compile it on GPU
        fn = _compiled_flex()
    out = fn(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


_COMPILED = None


def _compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def use_flex_attention(model) -> None:
    """Switch `model` to FlexAttention (registered once under the name "npr_flex")."""
    from transformers import AttentionInterface

    AttentionInterface.register(FLEX, _flex_attention)
    model.set_attn_implementation(FLEX)


def topology_forward(model, input_ids: torch.Tensor, topo: Topology, **kwargs):
    """Forward `input_ids` [B, L] with the topology's positions and visibility; returns the model output.

    The mask kind follows the model's attention implementation: a BlockMask for
    FlexAttention, else a dense additive mask in the model's dtype.
    """
    topo = topo.to(input_ids.device)
    if model.config._attn_implementation == FLEX:
        mask = block_mask(topo)
    else:
        mask = additive_mask(topo, dtype=model.dtype)
    return model(input_ids=input_ids, attention_mask=mask, position_ids=topo.position_ids, **kwargs)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token: out[:, t] = log p(input_ids[:, t+1] | ...), shape [B, L-1]."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
