"""The default world's tokenizer: whole words, whole numbers and route codes, the tags as single tokens.

Built with `tokenizers` (WordLevel) and saved in Hugging Face format with a chat template,
so downstream code loads it with `AutoTokenizer` like any checkpoint's tokenizer. Text is
split into numbers, words and single symbols and decoded with single spaces between
tokens: space-separated text round-trips exactly.
"""

from __future__ import annotations

from npr.tags import TAGS
from npr.world.corpus import CODES, NPR_INSTRUCTION, SEQ_INSTRUCTION

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
MAX_NUMBER = 1000
WORDS = ["user", "assistant", "system", "use", "to", "make", "try", "yes", "no", "first", "last", "in", "order",
         "reaches", "none", "need", "low", "high"]  # fmt: skip
SYMBOLS = list("+-*/()=,.:;{}") + ["\\boxed{"] + CODES  # a code ("*+") is one token
SPLIT = r"\\boxed\{|[-+*/]{2}|\d+|[A-Za-z]+|[^\sA-Za-z\d]"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %} {% endif %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
    "<|im_end|>{% endfor %}{% if add_generation_prompt %} <|im_start|> assistant{% endif %}"
)


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from npr.tokens import add_tag_tokens

    words = list(dict.fromkeys(WORDS + (NPR_INSTRUCTION + " " + SEQ_INSTRUCTION).split()))
    words = [w for w in words if not w.isdigit() and w not in SYMBOLS]
    vocab_list = SPECIALS + list(TAGS) + [str(i) for i in range(MAX_NUMBER + 1)] + SYMBOLS + words
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(SPLIT), behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    # single ids that survive decode(skip_special_tokens=True), like the tags of npr.tokens
    add_tag_tokens(fast)
    fast.chat_template = CHAT_TEMPLATE
    return fast
