"""The tag state machine the engine decodes under (docs/design.md §4: structure is enforced).

Each branch carries a `TagState`. With enforcement on, `allowed` names the tags (and
whether text and end-of-sequence are allowed) so the sampler can mask the rest: a
schema violation cannot be sampled. With it off, `advance` reports what is illegal
and the engine ends the request with `invalid_schema` (parallel mode) or lets it run
(sequential mode, where Stage 1 must be free to write malformed output).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from npr.tags import (
    GUIDELINE,
    GUIDELINE_END,
    NEXT_PHASE,
    PLAN,
    STEP,
    STEP_END,
    TAKEAWAY,
    TAKEAWAY_END,
)


@dataclass(frozen=True)
class Allowed:
    tags: frozenset[str]
    text: bool
    eos: bool


@dataclass
class TagState:
    phase: str = "out"
    plans: int = 0
    steps: int = 0  # steps written in this block (sequential mode)

    def allowed(self, max_plans: int, block_ok: bool) -> Allowed:
        return _allowed(self.phase, self.plans < max_plans, self.plans > 0, self.steps < self.plans, block_ok)

    def legal(self, tag: str) -> bool:
        if tag not in NEXT_PHASE[self.phase]:
            return False
        if tag == GUIDELINE_END:
            return self.plans > 0
        if tag == STEP:
            return self.steps < self.plans
        if tag == TAKEAWAY:
            return self.steps == self.plans
        return True

    def advance(self, tag: str) -> None:
        """Move past a legal tag (callers check `legal` first)."""
        if tag == GUIDELINE:
            self.plans = self.steps = 0
        elif tag == PLAN:
            self.plans += 1
        elif tag == STEP:
            self.steps += 1
        self.phase = NEXT_PHASE[self.phase][tag]


@cache
def _allowed(phase: str, more_plans: bool, has_plans: bool, more_steps: bool, block_ok: bool) -> Allowed:
    if phase == "out":
        return Allowed(frozenset({GUIDELINE} if block_ok else ()), True, True)
    if phase == "guideline":
        tags = ({PLAN} if more_plans else set()) | ({GUIDELINE_END} if has_plans else set())
        return Allowed(frozenset(tags), False, False)
    if phase == "steps":
        return Allowed(frozenset({STEP} if more_steps else {TAKEAWAY}), False, False)
    closer = {"plan": "</plan>", "step": STEP_END, "takeaway": TAKEAWAY_END}[phase]
    return Allowed(frozenset({closer}), True, False)
