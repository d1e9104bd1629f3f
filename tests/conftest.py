"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random models (no downloads)."""

from __future__ import annotations

import sys

import pytest
import torch

from npr.bench import bias_tags  # noqa: F401 (the tests import it from here)
from npr.tokens import add_npr_tokens


def torchrun(procs: int = 2) -> list[str]:
    """The command that starts `procs` local ranks, its rendezvous on a port the system picks:
    a fixed port can still be held by another run's store (or another program) on the machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]


CORPUS = [
    "the plan is a step and a guideline with a takeaway",
    "1: 2: 3: 4: compute the sum, then compare both results",
    "x + y = z so the answer is \\boxed{42} and \\frac{1}{2}",
    "Let us try small cases first. For n = 1 we get 2.",
]


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_model(family: str, vocab_size: int, attn: str = "sdpa", tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        initializer_range=0.2,  # sharper than the default so a wrong mask shows in the logits
    )
    if family == "qwen3":
        cfg, cls = Qwen3Config(head_dim=16, **common), Qwen3ForCausalLM
    elif family == "llama":
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn
    return cls(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    tok = make_tokenizer()
    add_npr_tokens(tok)
    return tok
