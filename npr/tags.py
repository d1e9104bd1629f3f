"""The eight tags of the Map-Process-Reduce schema (docs/design.md §2)."""

from __future__ import annotations

NAMES = ("guideline", "plan", "step", "takeaway")
OPEN = {name: f"<{name}>" for name in NAMES}
CLOSE = {name: f"</{name}>" for name in NAMES}
TAGS: tuple[str, ...] = tuple(t for name in NAMES for t in (OPEN[name], CLOSE[name]))

GUIDELINE, GUIDELINE_END = OPEN["guideline"], CLOSE["guideline"]
PLAN, PLAN_END = OPEN["plan"], CLOSE["plan"]
STEP, STEP_END = OPEN["step"], CLOSE["step"]
TAKEAWAY, TAKEAWAY_END = OPEN["takeaway"], CLOSE["takeaway"]


def missing_tags(tokenizer) -> list[str]:
    """The tags the tokenizer has no single token for."""
    vocab = tokenizer.get_vocab()
    return [t for t in TAGS if t not in vocab]


def tag_ids(tokenizer) -> dict[str, int]:
    """Map each tag to its single token id; error if the tokenizer lacks one."""
    vocab = tokenizer.get_vocab()  # once: a 152k vocabulary's dict costs milliseconds, and callers are per example
    if any(t not in vocab for t in TAGS):
        raise ValueError(
            f"tokenizer has no single token for {', '.join(missing_tags(tokenizer))}; "
            "call npr.tokens.add_npr_tokens(tokenizer, model) first"
        )
    return {t: vocab[t] for t in TAGS}


# The schema as a state machine over tags: phase -> {legal tag: next phase}.
# "steps" is the phase between steps (after </guideline> or a </step>).
NEXT_PHASE: dict[str, dict[str, str]] = {
    "out": {GUIDELINE: "guideline"},
    "guideline": {PLAN: "plan", GUIDELINE_END: "steps"},
    "plan": {PLAN_END: "guideline"},
    "steps": {STEP: "step", TAKEAWAY: "takeaway"},
    "step": {STEP_END: "steps"},
    "takeaway": {TAKEAWAY_END: "out"},
}
