"""The grammar on a corpus of realistic responses and on random trees (hypothesis)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npr.grammar import WORST_SCORE, build, canonical, canonical_pieces, last_boxed, parse, parse_ids
from npr.tags import TAGS, tag_ids
from npr.tokens import encode_pieces

GOOD_MULTILINE = r"""Let me set up the problem carefully.

<guideline>
<plan>1: Compute $\sum_{k=1}^{n} k$ with the pairing trick.
Check the parity of n separately.</plan>
<plan>2: Prove the closed form by induction on $n$.</plan>
</guideline>
<step>1: Pair $k$ with $n+1-k$: each pair sums to $n+1$ and there are $n/2$ pairs,
so the sum is $\frac{n(n+1)}{2}$.</step>
<step>2: Base case $n=1$: $1 = \frac{1 \cdot 2}{2}$. Step: add $n+1$ to both sides.</step>
<takeaway>Both arguments give $\frac{n(n+1)}{2}$.</takeaway>

Now for $n = 100$:
<guideline>
<plan>1: Substitute directly.</plan>
</guideline>
<step>1: $\frac{100 \cdot 101}{2} = 5050$.</step>
<takeaway>The value is 5050.</takeaway>
Therefore the answer is $\boxed{5050}$."""

GOOD_COMPACT = (
    "<guideline><plan>1: Try x=2.</plan><plan>2: Try x=3.</plan><plan>3: Solve symbolically.</plan></guideline>"
    "<step>1: 2^2-5*2+6=0 works.</step><step>2: 9-15+6=0 works.</step><step>3: (x-2)(x-3)=0.</step>"
    "<takeaway>Roots 2 and 3.</takeaway>The roots are \\boxed{\\{2, 3\\}}"
)

# (name, response, valid, violation kinds that must be reported)
CORPUS = [
    ("multiline", GOOD_MULTILINE, True, set()),
    ("compact", GOOD_COMPACT, True, set()),
    ("nested_boxed", GOOD_COMPACT.replace("\\{2, 3\\}", "\\frac{\\sqrt{2}}{\\left(3\\right)}"), True, set()),
    ("no_block", "We compute directly: 2+3 = 5, so \\boxed{5}.", False, {"no_block"}),
    ("empty", "", False, {"no_block", "no_answer"}),
    ("count_mismatch", GOOD_COMPACT.replace("<step>3: (x-2)(x-3)=0.</step>", ""), False, {"count_mismatch"}),
    ("missing_takeaway", GOOD_COMPACT.replace("<takeaway>Roots 2 and 3.</takeaway>", ""), False, {"missing_takeaway"}),
    ("cut_in_step", GOOD_MULTILINE[: GOOD_MULTILINE.index("Base case")], False, {"truncated", "no_answer"}),
    ("cut_in_plan", GOOD_COMPACT[:40], False, {"truncated"}),
    ("stray_close", GOOD_COMPACT.replace("</guideline>", "</guideline></plan>"), False, {"stray_tag"}),
    ("label_order", GOOD_COMPACT.replace("<step>2: 9", "<step>3: 9"), False, {"label"}),
    ("label_missing", GOOD_COMPACT.replace("<plan>2: Try", "<plan>Try"), False, {"label"}),
    ("empty_step", GOOD_COMPACT.replace("<step>2: 9-15+6=0 works.</step>", "<step>2:</step>"), False, {"empty"}),
    ("short_takeaway", GOOD_COMPACT.replace("Roots 2 and 3.", "ok"[:1]), False, {"too_short"}),
    ("glue", GOOD_COMPACT.replace("</step><step>2", "</step> and then <step>2"), False, {"glue"}),
    ("no_answer", GOOD_COMPACT.replace("\\boxed{\\{2, 3\\}}", "2 and 3"), False, {"no_answer"}),
    ("empty_answer", GOOD_COMPACT.replace("\\boxed{\\{2, 3\\}}", "\\boxed{ }"), False, {"no_answer"}),
    (
        "nested_block",
        GOOD_COMPACT.replace("(x-2)(x-3)=0.", "<guideline><plan>1: sub</plan></guideline>"),
        False,
        {"unclosed"},
    ),
    ("unclosed_guideline", GOOD_COMPACT.replace("</guideline>", ""), False, {"unclosed"}),
    ("plan_outside", "<plan>1: hm</plan> \\boxed{1}", False, {"unexpected_tag", "stray_tag", "no_block"}),
]


@pytest.mark.parametrize("name, text, valid, kinds", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus(name, text, valid, kinds):
    r = parse(text)
    assert r.valid == valid, [v.message for v in r.violations]
    assert kinds <= {v.kind for v in r.violations}
    assert (r.format_score == 0.0) == valid
    assert -2.0 < r.format_score <= 0.0
    for v in r.violations:
        assert 0 <= v.position <= len(text) and str(v.position) in v.message or v.kind in ("no_block", "no_answer")


def test_structure_and_answer_of_a_valid_response():
    r = parse(GOOD_MULTILINE)
    assert [(len(b.plans), len(b.steps)) for b in r.blocks] == [(2, 2), (1, 1)]
    assert r.blocks[0].plans[0].body.startswith("Compute") and "parity" in r.blocks[0].plans[0].body
    assert [s.label for s in r.blocks[0].steps] == [1, 2]
    assert r.blocks[1].takeaway.body == "The value is 5050."
    assert r.answer == "5050"
    assert r.texts[1].strip() == "Now for $n = 100$:"


def test_score_ordering():
    score = {name: parse(text).format_score for name, text, *_ in CORPUS}
    worst = score["no_block"]
    assert worst == WORST_SCORE and all(s >= worst for s in score.values())
    for severe in ("count_mismatch", "missing_takeaway", "cut_in_step"):
        for mild in ("empty_step", "short_takeaway", "glue"):
            assert score[severe] < score[mild] < 0.0, (severe, mild)
    assert score["no_block"] < min(s for n, s in score.items() if n not in ("no_block", "empty", "plan_outside"))


def test_canonical_form_removes_glue_only_inside_blocks():
    r = parse(GOOD_MULTILINE)
    c = canonical(r)
    assert "</guideline><step>" in c and "</step><step>" in c and "</step><takeaway>" in c
    assert "</plan><plan>" in c and "<guideline><plan>" in c
    assert "Let me set up the problem carefully.\n\n<guideline>" in c  # text outside blocks is kept
    again = parse(c)
    assert again.valid and canonical(again) == c and again.answer == r.answer


def test_last_boxed():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{a}{b}}") == r"\frac{a}{b}"
    assert last_boxed(r"\boxed{2} and a cut \boxed{\frac{1}{") == "2"
    assert last_boxed("no answer") is None


def test_token_ids_parse_like_text(tokenizer):
    ids = tag_ids(tokenizer)
    for name, text, _, _ in CORPUS:
        tokens = encode_pieces(tokenizer, re.split(f"({'|'.join(map(re.escape, TAGS))})", text))
        r = parse_ids(tokens, ids, tokenizer.decode)
        t = parse(text)
        assert r.valid == t.valid and r.answer == t.answer, name
        assert [v.kind for v in r.violations] == [v.kind for v in t.violations], name
        assert all(0 <= v.position <= len(tokens) for v in r.violations)


# ---- property-based --------------------------------------------------------------------------

WORDS = st.sampled_from(["x", "2+3=5", r"$\frac{1}{2}$", "then", "n\nm", "sum", "(a, b)", "check", "ok.", "="])
BODY = st.lists(WORDS, min_size=1, max_size=6).map(" ".join).filter(lambda s: len(s.strip()) >= 2)
OUTSIDE = st.sampled_from(["", "Let me think.\n", "\n", "Next:\n\n"])


@st.composite
def trees(draw):
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.integers(1, 4))
        blocks.append(
            (draw(st.lists(BODY, min_size=k, max_size=k)), draw(st.lists(BODY, min_size=k, max_size=k)), draw(BODY))
        )
    texts = [draw(OUTSIDE) for _ in blocks]
    answer = draw(st.sampled_from(["5", r"\frac{1}{2}", r"\{1, {2}\}", "x^{2^{3}}"]))
    return blocks, texts, f"\nSo the answer is \\boxed{{{answer}}}.", answer


@settings(max_examples=150, deadline=None)
@given(trees())
def test_round_trip(tree):
    blocks, texts, final, answer = tree
    text = build(blocks, final, texts)
    r = parse(text)
    assert r.valid, [v.message for v in r.violations]
    assert r.answer == answer
    assert [([p.body for p in b.plans], [s.body for s in b.steps], b.takeaway.body) for b in r.blocks] == [
        (list(p), list(s), t) for p, s, t in blocks
    ]
    assert canonical(r) == text
    # whitespace and newlines around the tags inside a block parse to the same canonical form
    loose = re.sub(r"(</?(?:plan|step)>|</guideline>|<takeaway>)", "\n\\1 \n", text)
    assert parse(loose).valid and canonical(parse(loose)) == text


def _corrupt(text, kind, data):
    tags = [m for m in re.finditer("|".join(map(re.escape, TAGS)), text)]
    m = data.draw(st.sampled_from(tags))
    if kind == "delete":
        return text[: m.start()] + text[m.end() :]
    if kind == "duplicate":
        return text[: m.end()] + m.group() + text[m.end() :]
    if kind == "truncate":
        end = text.rindex("}") + 1  # anything cut before the answer closes is incomplete
        return text[: data.draw(st.integers(0, end - 1))]
    if kind == "relabel":
        labels = [x for x in re.finditer(r"<(plan|step)>(\d+):", text)]
        x = data.draw(st.sampled_from(labels))
        return text[: x.start(2)] + str(int(x.group(2)) + 1) + text[x.end(2) :]
    if kind == "drop_step":
        steps = [x for x in re.finditer(r"<step>.*?</step>", text, re.S)]
        x = data.draw(st.sampled_from(steps))
        return text[: x.start()] + text[x.end() :]
    raise AssertionError(kind)


@settings(max_examples=200, deadline=None)
@given(trees(), st.sampled_from(["delete", "duplicate", "truncate", "relabel", "drop_step"]), st.data())
def test_corruptions_are_never_scored_zero(tree, kind, data):
    blocks, texts, final, _ = tree
    bad = _corrupt(build(blocks, final, texts), kind, data)
    r = parse(bad)
    assert not r.valid and -2.0 < r.format_score < 0.0


def test_canonical_pieces_are_tags_and_texts():
    pieces = canonical_pieces(parse(GOOD_COMPACT))
    assert pieces[0] == "<guideline>" and pieces[1] == "<plan>" and pieces[2] == "1: Try x=2."
    assert "".join(pieces) == GOOD_COMPACT
