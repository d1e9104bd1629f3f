"""The tags as added tokens of a Hugging Face tokenizer and model (docs/design.md §2).

Each tag is one id, matched before the tokenizer's own splitting, but not a *special* token: a
`decode(..., skip_special_tokens=True)` (the default of vLLM and TRL) keeps the schema, as Qwen's
tokenizers keep `<think>`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from npr.tags import TAGS, missing_tags, tag_ids


def _sub_tokens(tokenizer, tag: str) -> list[int]:
    """The tag's text split into ordinary sub-tokens (even when the tag is a token already)."""
    ids = tokenizer.encode(tag, add_special_tokens=False, split_special_tokens=True)
    if len(ids) == 1 and ids[0] == tokenizer.convert_tokens_to_ids(tag):  # an added token: split by hand
        ids = tokenizer.encode(tag[0], add_special_tokens=False) + tokenizer.encode(tag[1:], add_special_tokens=False)
    if not ids:
        raise ValueError(f"tokenizer encodes {tag!r} to no tokens")
    return ids


def add_tag_tokens(tokenizer, tags=TAGS) -> None:
    """Register tags as added tokens: one id each, matched before the tokenizer's own splitting,
    not special (so decoding with skip_special_tokens keeps them)."""
    from transformers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])


def add_npr_tokens(tokenizer, model=None) -> dict[str, int]:
    """Add the eight tags as single-id (non-special) tokens and give the model rows for them;
    return tag -> id.

    Each new embedding row (input embeddings, and the output head when untied) starts as
    the mean of the rows of the tag's ordinary sub-tokens. Idempotent: tags the tokenizer
    already has, with rows the model already has, are left alone.
    """
    new = missing_tags(tokenizer)
    sub = {t: _sub_tokens(tokenizer, t) for t in TAGS}
    if new:
        add_tag_tokens(tokenizer, new)
    ids = tag_ids(tokenizer)
    if model is None:
        return ids
    emb = model.get_input_embeddings()
    rows = emb.weight.shape[0]
    fresh = [t for t in TAGS if t in new or ids[t] >= rows]
    if not fresh:
        return ids
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    head = model.get_output_embeddings()
    weights = [model.get_input_embeddings().weight]
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    with torch.no_grad():
        for w in weights:
            for t in fresh:
                w[ids[t]] = w[sub[t]].float().mean(0).to(w.dtype)
    return ids


def encode_pieces(tokenizer, pieces: Sequence[str]) -> list[int]:
    """Encode tags and texts separately and join the ids (no re-tokenisation across a tag)."""
    ids = tag_ids(tokenizer)
    out: list[int] = []
    for p in pieces:
        out += [ids[p]] if p in ids else tokenizer.encode(p, add_special_tokens=False)
    return out
