"""Per-request decoding settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from npr.grammar import LAYOUTS

# The sampling default of every command and server that decodes: the paper's evaluation setting.
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 1.0, 0.7
FINISH_REASONS = ("stop", "length", "path_length", "invalid_schema", "repetition", "aborted")
BUDGET_STOPS = ("length", "path_length")  # the answer ran out of its token or latency budget
# Temperatures below this decode greedily: dividing fp32 logits by a subnormal one overflows to
# inf (argmax then takes the first positive id, top-p meets inf - inf), by 0 it gives 0/0 = NaN.
GREEDY_BELOW = 1e-5
MODES = ("parallel", "sequential")


@dataclass
class SamplingParams:
    """How one request is decoded.

    `max_tokens` bounds the tokens generated over all branches together, `max_path_tokens`
    the critical path (None: same as max_tokens). Log-probs are recorded from the model's
    untempered distribution, the one the trainer recomputes.
    """

    mode: str = "parallel"
    temperature: float = 1.0  # below GREEDY_BELOW: 0 (greedy)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    max_tokens: int = 1024
    max_path_tokens: int | None = None
    repetition_penalty: float = 1.02  # applied inside steps only (paper: 1.02)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the EOS ids of the tokenizer and generation config
    enforce_structure: bool = True  # mask tag tokens that would break the schema
    max_plans: int = 8
    repetition_limit: int = 8  # finish with "repetition" after this many repeats of a short pattern (>= 64 tokens)
    fork_text: str = LAYOUTS["canonical"][0]  # forced after <step>; must hold {i}
    join_text: str = LAYOUTS["canonical"][1]  # forced after <takeaway>

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_tokens < 1 or self.max_plans < 1:
            raise ValueError("top_k must be >= 0, max_tokens and max_plans >= 1")
        if self.max_path_tokens is not None and self.max_path_tokens < 1:
            raise ValueError("max_path_tokens must be >= 1")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        if "{i}" not in self.fork_text:
            raise ValueError(f"fork_text must hold the label placeholder {{i}}, got {self.fork_text!r}")

    @property
    def path_budget(self) -> int:
        return self.max_tokens if self.max_path_tokens is None else self.max_path_tokens


def layout_texts(name: str) -> dict[str, str]:
    """SamplingParams fields (fork_text, join_text) of a named layout."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; choose from {', '.join(LAYOUTS)}")
    fork, join = LAYOUTS[name]
    return {"fork_text": fork, "join_text": join}
