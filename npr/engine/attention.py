"""Paged attention for unmodified Hugging Face models, through transformers' AttentionInterface.

The engine packs the new tokens of every scheduled group (a branch's chunk of tokens) into
one row, sets a `Batch` describing where their keys/values go and what each group sees,
and runs the model. In every layer the function below writes the new keys/values into the
pool, then attends per bucket of groups with equal chunk length (decode steps form one
bucket). Positions come in as `position_ids`, so RoPE stays in the model. Two kernels:

- "sdpa" (CPUs, and the reference): gather each group's context out of the pool by its
  slot row, one batched SDPA per bucket. Simple and exact, but it copies the live KV once
  per layer per step; so a run of pure decode steps over the same branches keeps their
  contexts in a contiguous copy (`Staged`) and appends each step's new keys and values to
  it, which copies only the new tokens.
- "flex" (GPUs): FlexAttention reads the pool in place. The pool is the key/value sequence
  (batch 1, shared by every group); a `BlockMask` per bucket lists, for each group, the
  pages its context owns (one KV block = one page), and a mask_mod hides the unwritten
  tail of partially filled pages and keeps a chunk causal; pages filled before the step are
  listed as full blocks, which the kernel reads without the mask_mod. Why this kernel: our segments
  are token-level (a fork starts a step on a fresh page, a join concatenates the prefix
  and every step's partly filled last page), which block tables of whole pages
  (flash-attn) cannot express without copying those tails, and FlashInfer's page-size-1
  layout would mean a dependency we cannot test offline. FlexAttention ships with torch,
  takes arbitrary page lists per batch row, and its mask_mod handles partial pages exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from npr.engine.kv_pool import KVPool

NAME = "npr_paged"


@dataclass
class Staged:
    """A decode bucket's contexts as a contiguous copy, kept across a run of pure decode steps
    over the same branches: the step that starts it gathers `fill` (each group's slots, padded
    to the buffers' width) in every layer; each later step only writes its queries' new keys and
    values at `at` (their flat indices: group x the buffers' columns + the new token's column)."""

    k: torch.Tensor  # [layers, G, cols, kv heads, D], cols > every group's context length
    v: torch.Tensor
    width: int  # columns the step attends to (the longest context)
    fill: torch.Tensor | None = None  # [G * cols] pool slots: a gathering step
    at: torch.Tensor | None = None  # flat index of each query's new token, in query order: an appending step
    # the views every layer takes, made once a step for all layers (a handful of view ops a layer
    # is a few percent of a small model's decode step on a CPU): the copies as flat rows to write
    # ([layers, G * cols, kv heads, D]), and their first `width` columns to read ([layers, G, kv heads, width, D])
    flat: tuple = field(init=False, repr=False)
    read: tuple = field(init=False, repr=False)

    def __post_init__(self):
        layers, _, _, heads, dim = self.k.shape
        self.flat = (self.k.view(layers, -1, heads, dim), self.v.view(layers, -1, heads, dim))
        self.read = (self.k[:, :, : self.width].transpose(2, 3), self.v[:, :, : self.width].transpose(2, 3))


@dataclass
class Bucket:
    """Groups with the same number of new tokens n, attended in one batched call."""

    queries: torch.Tensor  # [G, n] index of each query among the T new tokens
    context: torch.Tensor | None = None  # sdpa: [G, C] pool slots of each group's context (right-padded)
    mask: torch.Tensor | None = None  # sdpa: [G, 1, n, C] additive (0 / -inf) in the query dtype, or None
    causal: bool = False  # sdpa: no mask needed but causality (a whole prompt in one chunk)
    block_mask: object = None  # flex: BlockMask over the pool's pages
    staged: Staged | None = None  # sdpa: the context from a staged copy instead of a gather
    every: bool = False  # the only bucket, holding all T new tokens in order (queries = arange)


def _bucket_queries(q_all: torch.Tensor, bk: Bucket) -> torch.Tensor:
    """[G, H, n, D] queries of a bucket: a view when it holds every new token in order (every pure
    decode step), which spares a gather here and a scatter of the output in every layer."""
    if bk.every:
        return q_all.view(*bk.queries.shape, *q_all.shape[1:]).transpose(1, 2)
    return q_all[bk.queries].transpose(1, 2)


def _place(out: torch.Tensor | None, q_all: torch.Tensor, bk: Bucket, o: torch.Tensor) -> torch.Tensor:
    """Write a bucket's output [G, H, n, D] at its queries' rows of `out` ([T, H, D], allocated on
    first use); a bucket of every token is the output itself."""
    o = o.transpose(1, 2).flatten(0, 1)
    if bk.every:
        return o
    out = torch.empty_like(q_all) if out is None else out
    out[bk.queries.flatten()] = o
    return out


@dataclass
class Batch:
    slot_mapping: torch.Tensor  # [T] pool slot of each new token
    buckets: list[Bucket]


class _State:
    pool: KVPool | None = None
    batch: Batch | None = None
    calls = 0


STATE = _State()


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    pool, batch = STATE.pool, STATE.batch
    if pool is None or batch is None:
        raise RuntimeError("npr_paged attention used outside the NPR engine")
    STATE.calls += 1
    layer = module.layer_idx
    k_pool, v_pool = pool.k[layer], pool.v[layer]
    k_new, v_new = _as(key[0].transpose(0, 1), k_pool.dtype), _as(value[0].transpose(0, 1), v_pool.dtype)  # [T, Hkv, D]
    k_pool.index_copy_(0, batch.slot_mapping, k_new)
    v_pool.index_copy_(0, batch.slot_mapping, v_new)
    q_all = query[0].transpose(0, 1)  # [T, H, D]
    if batch.buckets and batch.buckets[0].block_mask is not None:
        return flex_buckets(q_all, k_pool, v_pool, batch.buckets, scaling, pool.page_size)[None], None
    return sdpa_buckets(q_all, pool, layer, (k_pool, v_pool), (k_new, v_new), batch.buckets, scaling)[None], None


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)` without the call when it has that dtype (a call costs a CPU step ~1 us a layer)."""
    return x if x.dtype == dtype else x.to(dtype)


def flex_kernel():
    """flex_attention, compiled with dynamic shapes on CUDA (widths change every step; the one
    compiled function the trainer uses too), eager elsewhere (or as `modeling.COMPILE_BACKEND`
    says: tests compile with dynamo's eager backend to count graphs)."""
    from npr import modeling

    backend = modeling.COMPILE_BACKEND or ("inductor" if torch.cuda.is_available() else None)
    if backend:
        return modeling.compiled_flex(backend)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def flex_tile(page_size: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Kernel options of the paged flex call: the keys the fused kernel loads at a time (BLOCK_N).
    Inductor's GPU kernel refuses a key/value block (here one page) that is not a multiple of
    BLOCK_N (a ValueError at the first call: it compiles one default config, not a search), and
    its default BLOCK_N is 64 or 128 for 16-bit heads up to 128 wide, 32-64 in fp32 and 16-64 past
    128 (torch 2.13, A100 to B200). A tile of one page, capped below every default of its dtype and
    head width, divides the page and never asks for more shared memory than the default would."""
    cap = (64 if dtype.itemsize == 2 else 32) if head_dim <= 128 else 16
    return {"BLOCK_N": min(page_size, cap)}


def flex_buckets(q_all: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, buckets: list[Bucket], scaling,
                 page_size: int):  # fmt: skip
    """The GPU path: every bucket attends over the whole pool, restricted by its BlockMask."""
    out = None
    options = flex_tile(page_size, q_all.shape[-1], q_all.dtype)
    k = k_pool.permute(1, 0, 2)[None].to(q_all.dtype)  # [1, Hkv, slots, D], a view when dtypes match
    v = v_pool.permute(1, 0, 2)[None].to(q_all.dtype)
    for bk in buckets:
        q = _bucket_queries(q_all, bk)
        gqa = q.shape[1] != k.shape[1]
        o = flex_kernel()(q, k, v, block_mask=bk.block_mask, scale=scaling, enable_gqa=gqa, kernel_options=options)
        out = _place(out, q_all, bk, o)
    return out


def sdpa_buckets(q_all: torch.Tensor, pool: KVPool, layer: int, kv: tuple, new: tuple, buckets: list[Bucket],
                 scaling):  # fmt: skip
    """The reference path: gather each bucket's context out of the pool (`kv`: the layer's keys
    and values in it), one SDPA per bucket (a staged bucket reads its copy instead; `new` holds
    the step's new keys and values).

    Grouped-query heads go to SDPA as they are (`enable_gqa`), so keys and values are never
    repeated per query head and one [G, 1, n, C] mask, built once per step, serves every head
    and layer (a boolean mask would be converted to an additive one in every call).
    """
    out = None
    heads, dim = q_all.shape[1:]
    k_pool, v_pool = kv
    kv_heads = k_pool.shape[1]
    for bk in buckets:
        g, n = bk.queries.shape
        if bk.staged is not None:
            k, v = _staged(bk, layer, kv, new)
        else:
            width = bk.context.shape[1]
            flat = bk.context.reshape(-1)
            kbuf, vbuf = pool.gather_buffers(len(flat))
            k = torch.index_select(k_pool, 0, flat, out=kbuf).view(g, width, kv_heads, dim).transpose(1, 2)
            v = torch.index_select(v_pool, 0, flat, out=vbuf).view(g, width, kv_heads, dim).transpose(1, 2)
        q, k, v = _bucket_queries(q_all, bk), _as(k, q_all.dtype), _as(v, q_all.dtype)
        gqa = heads != kv_heads
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bk.mask, is_causal=bk.causal, scale=scaling, enable_gqa=gqa
        )
        out = _place(out, q_all, bk, o)
    return out


def _staged(bk: Bucket, layer: int, kv: tuple, new: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """This layer's keys and values [G, Hkv, width, D] from a bucket's staged copy: gathered into
    it on the step that starts it, else its queries' new keys and values written at their columns
    (the values the pool holds, so the attention is exactly the gathering path's)."""
    st = bk.staged
    k, v = st.flat[0][layer], st.flat[1][layer]  # [G * cols, Hkv, D]
    if st.fill is not None:
        torch.index_select(kv[0], 0, st.fill, out=k)
        torch.index_select(kv[1], 0, st.fill, out=v)
    elif bk.every:
        k.index_copy_(0, st.at, new[0])
        v.index_copy_(0, st.at, new[1])
    else:
        mine = bk.queries.flatten()
        k.index_copy_(0, st.at, new[0][mine])
        v.index_copy_(0, st.at, new[1][mine])
    return st.read[0][layer], st.read[1][layer]


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
