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
    backend = COMPILE_BACKEND or ("inductor" if query.is_cuda else None)
    if backend:  # eager flex attention materialises [B, H, L, L] scores: compile it on GPU
        fn = compiled_flex(backend)
    out = fn(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


COMPILE_BACKEND: str | None = None  # None: inductor on CUDA, eager elsewhere (tests set "eager" to count graphs)
_COMPILED: dict[str, object] = {}


def compiled_flex(backend: str = "inductor"):
    """flex_attention compiled with dynamic shapes, for the trainer and the engine alike: packed
    rows change width at almost every micro-batch, and a static compile would recompile per width
    until torch's recompile limit, then fall back to the eager kernel (which materialises the
    scores: 128 GiB at 32k tokens, 32 heads). Dynamo keeps one cache per function, shared by
    every caller, and guards on grad mode, batch size 1 and single-block masks, so the engine's
    inference calls and the trainer's grad and no-grad calls need more than the default 8
    entries: the limit is raised to 32 (still bounded, so a real shape leak would show)."""
    if backend not in _COMPILED:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        _COMPILED[backend] = torch.compile(flex_attention, dynamic=True, backend=backend)
    return _COMPILED[backend]


ATTENTION = ("auto", "flex", "default")


def use_trainer_attention(model, choice: str) -> str:
    """The trainer's attention (`model.attention`): "flex" (FlexAttention with a BlockMask built
    from O(L) labels: no L x L mask), "default" (the model's own kernel with a dense additive
    mask) or "auto" (flex on CUDA, default elsewhere). Returns the kernel used. The engine is not
    affected: it runs its own paged kernel over the KV pool."""
    if choice not in ATTENTION:
        raise ValueError(f"model.attention: expected one of {', '.join(ATTENTION)}, got {choice!r}")
    if choice == "auto":
        choice = "flex" if next(model.parameters()).is_cuda else "default"
    if choice == "flex":
        use_flex_attention(model)
    return choice


def use_flex_attention(model) -> None:
    """Switch `model` to FlexAttention (registered once under the name "npr_flex")."""
    from transformers import AttentionInterface

    AttentionInterface.register(FLEX, _flex_attention)
    model.set_attn_implementation(FLEX)


def compute_dtype(model) -> torch.dtype:
    """The dtype activations have: the weights' dtype, or under FSDP2 mixed precision (fp32 shards,
    bf16 compute) the dtype the weights are gathered in, which `load_policy` sets as
    `model.npr_compute_dtype` (not in the config: `save_pretrained` rewrites its dtype)."""
    return getattr(model, "npr_compute_dtype", None) or model.dtype


def topology_forward(model, input_ids: torch.Tensor, topo: Topology, **kwargs):
    """Forward `input_ids` [B, L] with the topology's positions and visibility; returns the model output.

    The mask kind follows the model's attention implementation: a BlockMask for
    FlexAttention, else a dense additive mask in the model's dtype.
    """
    topo = topo.to(input_ids.device)
    if model.config._attn_implementation == FLEX:
        mask = block_mask(topo)
    else:
        mask = additive_mask(topo, dtype=compute_dtype(model))
    return model(input_ids=input_ids, attention_mask=mask, position_ids=topo.position_ids, **kwargs)


HEAD_CHUNK = 1024  # tokens per pass through the output head: [1024, 151936] fp32 logits are 0.6 GB


def _head_chunk(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """[n, 2]: log p(target) (differentiable) and the entropy of the distribution (detached)."""
    logp_all = F.log_softmax(F.linear(hidden, weight.to(hidden.dtype), bias).float(), dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.stack([logp, entropy], dim=-1)


class TokenStatsHead(torch.nn.Module):
    """Stands in for the output head during one forward: instead of [B, L, V] logits it returns
    [B, L, 2] (log-prob of each position's target, entropy), `chunk` tokens at a time. Each chunk is
    recomputed in the backward pass (activation checkpointing), so no [L, V] tensor is ever held:
    memory grows with L x hidden, not L x vocabulary (the vocabulary is 151,936 for Qwen3).

    It runs inside the model's own forward, so FSDP gathers and reduces the head's weight (tied to
    the embeddings or not) exactly as for the ordinary head."""

    def __init__(self, head: torch.nn.Module, targets: torch.Tensor, chunk: int = HEAD_CHUNK):
        super().__init__()
        self.head, self.targets, self.chunk = head, targets, chunk

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        B, L, H = hidden.shape
        flat, targets = hidden.reshape(B * L, H), self.targets.reshape(B * L)
        weight, bias = self.head.weight, getattr(self.head, "bias", None)
        if weight.dtype in (torch.bfloat16, torch.float16) and weight.requires_grad and torch.is_grad_enabled():
            # The chunks' weight gradients are summed where the weight fans out: in its own dtype,
            # ~30 bf16 roundings at 30k tokens. Fanning out from an fp32 copy sums them in fp32
            # (each chunk casts back inside its checkpoint, so no 16-bit copy outlives its chunk).
            # Without a weight gradient (the old policy's log-probs, a frozen head under LoRA) the
            # chunks use the weight as it is: the same values, without a 1.6 GB fp32 copy of
            # Qwen3-4B's head.
            weight = weight.float()
        parts = [
            checkpoint(
                _head_chunk, flat[i : i + self.chunk], targets[i : i + self.chunk], weight, bias, use_reentrant=False
            )  # fmt: skip
            for i in range(0, B * L, self.chunk)
        ]
        return torch.cat(parts).reshape(B, L, 2)


def topology_token_stats(model, input_ids: torch.Tensor, topo: Topology, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """[B, L-1, 2]: out[:, t, 0] = log p(input_ids[:, t+1] | ...) (with gradient) and out[:, t, 1] the
    entropy of that next-token distribution, under the topology, never materialising [L, V] logits."""
    head = model.get_output_embeddings()
    targets = F.pad(input_ids[:, 1:], (0, 1))  # the last position predicts nothing we score
    model.set_output_embeddings(TokenStatsHead(head, targets, chunk))
    try:
        out = topology_forward(model, input_ids, topo).logits
    finally:
        model.set_output_embeddings(head)
    return out[:, :-1]


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token: out[:, t] = log p(input_ids[:, t+1] | ...), shape [B, L-1]."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
