"""Paged attention for unmodified Hugging Face models, through transformers' AttentionInterface.

The engine packs the new tokens of every scheduled group (a branch's chunk of tokens)
into one row, sets a `Batch` describing where their keys/values go and what each group
sees, and runs the model. In every layer the function below writes the new keys/values
into the pool, gathers each group's context (its segments' slots, padded) and runs one
batched SDPA. Positions come in as `position_ids`, so RoPE stays in the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from npr.engine.kv_pool import KVPool

NAME = "npr_paged"


@dataclass
class Batch:
    slot_mapping: torch.Tensor  # [T] pool slot of each new token
    context: torch.Tensor  # [G, C] pool slots of each group's context (padded)
    mask: torch.Tensor  # [G, 1, Q, C] bool: query j of group g may attend context c
    queries: torch.Tensor  # [G, Q] index into the T new tokens (padded with 0)
    valid: torch.Tensor  # [G, Q] bool: real query


class _State:
    pool: KVPool | None = None
    batch: Batch | None = None
    calls = 0


STATE = _State()


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    pool, b = STATE.pool, STATE.batch
    if pool is None or b is None:
        raise RuntimeError("npr_paged attention used outside the NPR engine")
    STATE.calls += 1
    layer = module.layer_idx
    k_new = key[0].transpose(0, 1)  # [T, Hkv, D]
    v_new = value[0].transpose(0, 1)
    pool.k[layer].index_copy_(0, b.slot_mapping, k_new.to(pool.k.dtype))
    pool.v[layer].index_copy_(0, b.slot_mapping, v_new.to(pool.v.dtype))
    k = pool.k[layer][b.context].transpose(1, 2)  # [G, Hkv, C, D]
    v = pool.v[layer][b.context].transpose(1, 2)
    q = query[0].transpose(0, 1)[b.queries].transpose(1, 2)  # [G, H, Q, D]
    out = F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=b.mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1]
    )
    out = out.transpose(1, 2)[b.valid]  # [T, H, D] in packed order (groups are contiguous)
    return out[None], None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, paged_attention)


def model_shape(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a supported model, or a clear error."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__}: encoder-decoder models are not supported by the NPR engine")
    missing = [a for a in ("num_hidden_layers", "num_attention_heads", "hidden_size") if not hasattr(cfg, a)]
    if missing:
        raise ValueError(f"{type(model).__name__}: config lacks {', '.join(missing)}; not a supported decoder LM")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
        raise ValueError(f"{type(model).__name__}: sliding-window attention is not supported by the NPR engine")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, head_dim
