"""The instructions models are prompted with, and the chat-template wrapper (tasks build the messages)."""

from __future__ import annotations

NPR_INSTRUCTION = """Solve the problem by reasoning in parallel. Use this structure, repeated as often as needed:
<guideline><plan>1: a short plan</plan><plan>2: another plan</plan>...</guideline>
<step>1: carry out plan 1 on its own</step><step>2: carry out plan 2 on its own</step>...
<takeaway>compare the steps and draw the conclusion</takeaway>
Write each step as if you could not see the other steps. End with the final answer in \\boxed{}."""

STEP_INSTRUCTION = "Solve the problem step by step. End with the final answer in \\boxed{}."
CHOICE_SUFFIX = "Put the letter of the correct option in \\boxed{}."


def chat_ids(tokenizer, message: str | list[dict]) -> list[int]:
    """Token ids of a user turn, or of a conversation ([{role, content}, ...]): the chat template
    (with the assistant cue) when the tokenizer has one, else the contents one after another.

    A template's thinking switch is off (`enable_thinking=False`; templates without one ignore
    it): the schema is the model's reasoning, and hybrid Qwen3 checkpoints otherwise open with a
    free-text <think> block that can spend the whole budget before the first <guideline>. The
    authors' non-thinking NPR models were trained on this prompt."""
    turns = [{"role": "user", "content": message}] if isinstance(message, str) else message
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode("\n\n".join(t["content"] for t in turns))
