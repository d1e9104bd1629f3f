"""Parse, validate, score and canonicalise Map-Process-Reduce responses (docs/design.md §2).

A response is read as a stream of events (tags and the text between them), from
characters or from token ids, so the same state machine serves both. Errors never
stop the parse: each is recorded as a `Violation` with its position (a character
offset for text, a token index for ids) and the parser recovers, so a user sees
every reason a response failed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from npr.tags import (
    CLOSE,
    GUIDELINE,
    GUIDELINE_END,
    NEXT_PHASE,
    PLAN,
    PLAN_END,
    STEP,
    STEP_END,
    TAGS,
    TAKEAWAY,
    TAKEAWAY_END,
)

# Penalty of each violation kind; the format score is driven by the worst one.
SEVERITY: dict[str, float] = {
    "no_block": 1.9,  # no block at all: the worst outcome
    "truncated": 1.5,  # cut off inside a block
    "count_mismatch": 1.5,  # steps != plans
    "missing_takeaway": 1.5,
    "no_plans": 1.5,
    "unclosed": 1.25,  # a tag closed implicitly by a later one
    "unexpected_tag": 1.25,
    "stray_tag": 1.0,
    "label": 1.0,  # "i:" labels not 1..k in order
    "no_answer": 1.0,  # no \boxed{} after the last block
    "empty": 0.5,
    "too_short": 0.25,
    "glue": 0.25,  # text between the tags of one block
}
WORST_SCORE = -SEVERITY["no_block"]
_CAP = 1.8  # any response with at least one block scores above WORST_SCORE

TAG_RE = re.compile("|".join(re.escape(t) for t in TAGS))
LABEL_RE = re.compile(r"\s*(\d+)\s*:")


@dataclass(frozen=True)
class Violation:
    kind: str
    message: str
    position: int

    def as_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "position": self.position}


@dataclass
class Piece:
    """A plan, step or takeaway: `label` is i of "i:" (None for a takeaway or when missing)."""

    label: int | None
    body: str
    start: int  # position of the opening tag
    end: int  # position just past the closing tag (or where the piece was cut)


@dataclass
class Block:
    start: int
    plans: list[Piece] = field(default_factory=list)
    steps: list[Piece] = field(default_factory=list)
    takeaway: Piece | None = None
    end: int = -1
    complete: bool = False  # reached </takeaway>


@dataclass
class Response:
    blocks: list[Block]
    texts: list[str]  # text outside blocks: texts[i] precedes blocks[i]; texts[-1] follows the last
    violations: list[Violation]
    answer: str | None  # content of the last \boxed{} after the last block

    @property
    def valid(self) -> bool:
        return not self.violations

    @property
    def format_score(self) -> float:
        return format_score(self.violations)

    def summary(self) -> dict:
        """The JSON shape printed by `npr check --json`."""
        return {
            "valid": self.valid,
            "format_score": self.format_score,
            "blocks": [{"plans": len(b.plans), "steps": len(b.steps)} for b in self.blocks],
            "violations": [v.as_dict() for v in self.violations],
            "answer": self.answer,
        }


def format_score(violations: Sequence[Violation]) -> float:
    """Stage-1 format reward: 0.0 when valid, else a penalty in (-2, 0) graded by the worst violation."""
    if not violations:
        return 0.0
    worst = max(SEVERITY[v.kind] for v in violations)
    if worst >= SEVERITY["no_block"]:
        return WORST_SCORE
    return -min(_CAP, worst + 0.05 * (len(violations) - 1))


def last_boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}` in `text`, braces nested; None if absent or unbalanced."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced (cut off): try an earlier one
    return None


# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    tag: str | None  # None for text
    text: str
    start: int
    end: int


def _text_events(text: str) -> list[_Event]:
    events, pos = [], 0
    for m in TAG_RE.finditer(text):
        if m.start() > pos:
            events.append(_Event(None, text[pos : m.start()], pos, m.start()))
        events.append(_Event(m.group(), m.group(), m.start(), m.end()))
        pos = m.end()
    if pos < len(text):
        events.append(_Event(None, text[pos:], pos, len(text)))
    return events


def _id_events(ids: Sequence[int], tag_of: dict[int, str], decode: Callable[[list[int]], str]) -> list[_Event]:
    events, run = [], 0
    for i, t in enumerate(ids):
        if t in tag_of:
            if i > run:
                events.append(_Event(None, decode(list(ids[run:i])), run, i))
            events.append(_Event(tag_of[t], tag_of[t], i, i + 1))
            run = i + 1
    if run < len(ids):
        events.append(_Event(None, decode(list(ids[run:])), run, len(ids)))
    return events


# ---- the state machine ----------------------------------------------------------------------

# phase -> (the tag that closes it, the phase it leads to): used to close implicitly
_CLOSER = {
    "plan": (PLAN_END, "guideline"),
    "guideline": (GUIDELINE_END, "steps"),
    "step": (STEP_END, "steps"),
    "takeaway": (TAKEAWAY_END, "out"),
    "steps": (TAKEAWAY, "out"),  # leaving the steps without a takeaway
}


class _Parser:
    def __init__(self, min_chars: int):
        self.min_chars = min_chars
        self.blocks: list[Block] = []
        self.texts: list[str] = []
        self.violations: list[Violation] = []
        self.phase = "out"
        self.outside: list[str] = []
        self.piece: list[str] = []
        self.piece_start = 0
        self.pending: list[_Event] = []  # text after a step: glue, or the final text if no takeaway follows

    def flag(self, kind: str, message: str, position: int) -> None:
        self.violations.append(Violation(kind, message, position))

    def feed(self, ev: _Event) -> None:
        if ev.tag is None:
            self.text(ev)
            return
        chain, phase = [], self.phase
        if ev.tag in NEXT_PHASE[phase]:
            self.flush_pending(as_glue=True)
        while ev.tag not in NEXT_PHASE[phase]:
            if phase not in _CLOSER:  # legal nowhere from here: ignore the tag
                if ev.tag.startswith("</"):
                    self.flag("stray_tag", f"stray {ev.tag} at {ev.start}", ev.start)
                else:
                    self.flag("unexpected_tag", f"unexpected {ev.tag} {_where(self.phase)} at {ev.start}", ev.start)
                return
            chain.append(phase)
            phase = _CLOSER[phase][1]
        for p in chain:  # close implicitly what the tag shows to be finished
            if p == "steps":
                self.flag("missing_takeaway", f"block ends without <takeaway> at {ev.start}", ev.start)
                self.end_block(ev.start)
                self.phase = "out"
                self.flush_pending(as_glue=False)
            else:
                closer = _CLOSER[p][0]
                self.flag("unclosed", f"<{p}> not closed with {closer} before {ev.tag} at {ev.start}", ev.start)
                self.transition(closer, ev.start, ev.start)
        self.transition(ev.tag, ev.start, ev.end)

    def text(self, ev: _Event) -> None:
        if self.phase == "out":
            self.outside.append(ev.text)
        elif self.phase in ("plan", "step", "takeaway"):
            self.piece.append(ev.text)
        elif self.phase == "steps":
            self.pending.append(ev)
        elif ev.text.strip():
            self.flag("glue", f"text between the tags of a block ({_where(self.phase)}) at {ev.start}", ev.start)

    def flush_pending(self, as_glue: bool) -> None:
        for ev in self.pending:
            if not as_glue:
                self.outside.append(ev.text)
            elif ev.text.strip():
                self.flag("glue", f"text between the tags of a block ({_where(self.phase)}) at {ev.start}", ev.start)
        self.pending = []

    def transition(self, tag: str, start: int, end: int) -> None:
        block = self.blocks[-1] if self.blocks else None
        if tag == GUIDELINE:
            self.texts.append("".join(self.outside))
            self.outside = []
            self.blocks.append(Block(start=start))
        elif tag in (PLAN, STEP, TAKEAWAY):
            self.piece, self.piece_start = [], start
        elif tag == PLAN_END:
            block.plans.append(self.close_piece("plan", end, len(block.plans) + 1))
        elif tag == STEP_END:
            block.steps.append(self.close_piece("step", end, len(block.steps) + 1))
        elif tag == GUIDELINE_END and not block.plans:
            self.flag("no_plans", f"<guideline> without any <plan> at {block.start}", block.start)
        elif tag == TAKEAWAY_END:
            block.takeaway = self.close_piece("takeaway", end, None)
            self.end_block(end)
        self.phase = NEXT_PHASE[self.phase][tag]

    def close_piece(self, kind: str, end: int, expected: int | None) -> Piece:
        raw, start = "".join(self.piece), self.piece_start
        label, body = None, raw.strip()
        if expected is not None:
            m = LABEL_RE.match(raw)
            if m:
                label, body = int(m.group(1)), raw[m.end() :].strip()
            if label != expected:
                got = "no label" if label is None else f'"{label}:"'
                self.flag("label", f'<{kind}> at {start} should start with "{expected}:", got {got}', start)
        if not body:
            self.flag("empty", f"empty <{kind}> at {start}", start)
        elif len(body) < self.min_chars:
            self.flag("too_short", f"<{kind}> at {start} is too short ({len(body)} chars)", start)
        return Piece(label, body, start, end)

    def end_block(self, end: int) -> None:
        block = self.blocks[-1]
        block.end, block.complete = end, block.takeaway is not None
        if block.plans and len(block.steps) != len(block.plans):
            self.flag(
                "count_mismatch",
                f"block at {block.start} has {len(block.plans)} plans but {len(block.steps)} steps",
                block.start,
            )

    def finish(self, end: int, require_block: bool, require_answer: bool) -> Response:
        if self.phase == "steps" and "".join(e.text for e in self.pending).strip():
            at = self.pending[0].start  # text after the steps: the block simply lacks its takeaway
            self.flag("missing_takeaway", f"block ends without <takeaway> at {at}", at)
            self.end_block(at)
            self.phase = "out"
            self.flush_pending(as_glue=False)
        if self.phase != "out":
            self.flag("truncated", f"response ends {_where(self.phase)} (cut off mid-block) at {end}", end)
            if self.phase in ("plan", "step", "takeaway"):
                self.transition(CLOSE[self.phase], end, end)  # keep the partial piece
            block = self.blocks[-1]
            block.end, block.complete = end, False
        self.texts.append("".join(self.outside))
        if require_block and not self.blocks:
            self.flag("no_block", "no <guideline> block in the response", 0)
        answer = last_boxed(self.texts[-1])
        if require_answer and answer is None:
            self.flag("no_answer", "no \\boxed{} answer after the last block", end)
        elif require_answer and not answer.strip():
            self.flag("no_answer", "an empty \\boxed{} after the last block", end)
        return Response(self.blocks, self.texts, self.violations, answer)


def _where(phase: str) -> str:
    return {"out": "outside a block", "steps": "among the steps of a block"}.get(phase, f"inside <{phase}>")


def _run(events: list[_Event], end: int, require_block: bool, require_answer: bool, min_chars: int):
    p = _Parser(min_chars)
    for ev in events:
        p.feed(ev)
    return p.finish(end, require_block, require_answer)


def parse(text: str, *, require_block: bool = True, require_answer: bool = True, min_chars: int = 2) -> Response:
    """Parse a response given as text; positions are character offsets."""
    return _run(_text_events(text), len(text), require_block, require_answer, min_chars)


def parse_ids(
    ids: Sequence[int],
    tag_ids: dict[str, int],
    decode: Callable[[list[int]], str],
    *,
    require_block: bool = True,
    require_answer: bool = True,
    min_chars: int = 2,
) -> Response:
    """Parse a response given as token ids (tags are single ids); positions are token indices."""
    tag_of = {i: t for t, i in tag_ids.items()}
    return _run(_id_events(ids, tag_of, decode), len(ids), require_block, require_answer, min_chars)


# ---- canonical form ------------------------------------------------------------------------


# Text the engine forces after `<step>` at a fork ({i}: the step's label) and after `<takeaway>` at
# a join. "canonical" is this project's layout; "paper" the layout of the authors' checkpoints.
# Training data is encoded in the layout the model will be decoded in (canonical_pieces).
LAYOUTS = {"canonical": ("{i}:", ""), "paper": ("\n{i}:", "\n")}


def _labelled(label: int | None, body: str, opening: str = "{i}:") -> str:
    if label is None:
        return body
    head = opening.replace("{i}", str(label))
    return f"{head} {body}" if body else head


def canonical_pieces(resp: Response, layout: str = "canonical") -> list[str]:
    """The response as a list of tags and texts in canonical order (no glue inside blocks).

    Encoding each piece separately and joining the ids gives the canonical token sequence. A step
    opens with the layout's fork text and a takeaway with its join text, as the engine forces them
    ("canonical": `1: body`, `body`; "paper": `\\n1: body`, `\\nbody`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    fork, join = LAYOUTS[layout]
    out: list[str] = []
    for text, block in zip(resp.texts, resp.blocks):
        out += [text] if text else []
        out.append(GUIDELINE)
        for p in block.plans:
            out += [PLAN, _labelled(p.label, p.body), PLAN_END]
        out.append(GUIDELINE_END)
        for s in block.steps:
            out += [STEP, _labelled(s.label, s.body, fork), STEP_END]
        if block.takeaway is not None:
            out += [TAKEAWAY, join + block.takeaway.body, TAKEAWAY_END]
    out += [resp.texts[-1]] if resp.texts[-1] else []
    return [p for p in out if p]


def canonical(resp: Response) -> str:
    """Serialize with no glue between the tags of a block (docs/design.md §2)."""
    return "".join(canonical_pieces(resp))


def build(blocks: Sequence[tuple[Sequence[str], Sequence[str], str]], answer_text: str, texts=None) -> str:
    """Write a canonical response from (plans, steps, takeaway) bodies; labels are added.

    `texts` optionally gives the text before each block (len(blocks) entries).
    """
    texts = list(texts) if texts is not None else [""] * len(blocks)
    bs = [
        Block(
            start=0,
            plans=[Piece(i + 1, p, 0, 0) for i, p in enumerate(plans)],
            steps=[Piece(i + 1, s, 0, 0) for i, s in enumerate(steps)],
            takeaway=Piece(None, take, 0, 0),
        )
        for plans, steps, take in blocks
    ]
    return canonical(Response(bs, texts + [answer_text], [], None))
