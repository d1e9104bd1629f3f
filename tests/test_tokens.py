"""Special tokens: one id per tag, new rows = mean of the tag's sub-token rows, idempotent."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer

from npr.tags import TAGS, tag_ids
from npr.tokens import add_npr_tokens, encode_pieces


@pytest.mark.parametrize("tie", [False, True])
def test_new_rows_are_sub_token_means_and_second_call_changes_nothing(tie):
    tok = make_tokenizer()
    model = make_model("qwen3", len(tok), tie=tie)
    sub = {t: tok.encode(t, add_special_tokens=False) for t in TAGS}
    assert all(len(s) > 1 for s in sub.values())  # ordinary text before the call
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    ids = add_npr_tokens(tok, model)
    assert ids == tag_ids(tok) and len(set(ids.values())) == 8
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] == len(tok) == emb0.shape[0] + 8
    assert torch.equal(emb[: emb0.shape[0]], emb0)  # old rows untouched
    for t in TAGS:
        assert torch.allclose(emb[ids[t]], emb0[sub[t]].mean(0))
        if not tie:
            assert torch.allclose(head[ids[t]], head0[sub[t]].mean(0))
    assert (head.data_ptr() == emb.data_ptr()) == tie  # tying survives the resize
    for t in TAGS:  # each tag is now one token, also inside text
        assert tok.encode(f"a {t} b", add_special_tokens=False).count(ids[t]) == 1
    before = (len(tok), emb.detach().clone(), head.detach().clone())
    assert add_npr_tokens(tok, model) == ids
    assert len(tok) == before[0]
    assert torch.equal(model.get_input_embeddings().weight, before[1])
    assert torch.equal(model.get_output_embeddings().weight, before[2])


def test_rows_already_present_but_unused_are_initialised():
    """Like Qwen3, whose embedding matrix has spare rows beyond the tokenizer's vocabulary."""
    tok = make_tokenizer()
    model = make_model("qwen3", len(tok) + 16)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    sub = tok.encode("</step>", add_special_tokens=False)  # ordinary sub-tokens before the tags exist
    ids = add_npr_tokens(tok, model)
    assert model.get_input_embeddings().weight.shape[0] == emb0.shape[0]  # no resize needed
    assert torch.allclose(model.get_input_embeddings().weight[ids["</step>"]], emb0[sub].mean(0))


def test_saved_tokenizer_keeps_tags(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert tag_ids(again) == tag_ids(tokenizer)
    ids = encode_pieces(again, ["hi", "<plan>", "1: x", "</plan>"])
    assert ids[-1] == tag_ids(again)["</plan>"] and again.decode(ids) == "hi<plan>1: x</plan>"


def test_tags_survive_skip_special_tokens(tmp_path):
    """vLLM and TRL decode with skip_special_tokens=True: the schema must not vanish."""
    from transformers import AutoTokenizer

    from npr.world.tokenizer import build_tokenizer

    tok = make_tokenizer()
    add_npr_tokens(tok)
    tok.save_pretrained(tmp_path)
    for t in (tok, AutoTokenizer.from_pretrained(tmp_path), build_tokenizer()):
        ids = tag_ids(t)
        text = "<guideline><plan>1: a</plan></guideline><step>1: b</step><takeaway>c</takeaway>"
        enc = t.encode(text, add_special_tokens=False)
        assert sum(i in ids.values() for i in enc) == 8  # one id per tag
        out = t.decode(enc, skip_special_tokens=True)
        assert [tag for tag in TAGS if tag in out] == list(TAGS)


def test_missing_tags_error_names_them():
    with pytest.raises(ValueError, match="<guideline>.*add_npr_tokens"):
        tag_ids(make_tokenizer())
