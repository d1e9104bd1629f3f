"""The default world: Countdown generation and checking, its tokenizer, the base recipe."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npr import grammar
from npr.tags import TAGS, tag_ids
from npr.world import corpus, countdown
from npr.world.countdown import ExpressionError, check, evaluate
from npr.world.tokenizer import build_tokenizer


def test_splits_are_deterministic_and_disjoint():
    a, b = countdown.split("train", 300), countdown.split("train", 300)
    assert a == b
    assert countdown.split("train", 300, seed=1) != a
    test = countdown.split("test", 300)
    assert not {p["problem"] for p in test} & {p["problem"] for p in a}
    assert {p["level"] for p in a} == {1, 2, 3}
    for p in a + test:
        assert set(p) >= {"problem", "answer", "numbers", "target", "level", "id"}
    with pytest.raises(ValueError, match="unknown split"):
        countdown.split("dev", 3)


def test_reference_answers_are_accepted():
    for level in countdown.LEVELS:
        rng = random.Random(level)
        for _ in range(200):
            p = countdown.make_problem(level, rng)
            assert check(p["answer"], p["numbers"], p["target"]), p


@pytest.mark.parametrize(
    "expr, numbers, target",
    [
        ("3 + 4", [3, 4], 8),  # wrong value
        ("3 + 3", [3, 4], 6),  # reused number, missing number
        ("3 + 4", [3, 4, 5], 7),  # a number left unused
        ("3 + 4 + 5", [3, 4], 12),  # a number not given
        ("(3 + 4", [3, 4], 7),  # malformed
        ("3 + * 4", [3, 4], 7),
        ("3 ** 4", [3, 4], 81),
        ("__import__('os')", [3], 3),
        ("4 / 0", [4, 0], 0),
        ("99999999999 - 99999999999 + 3", [99999999999, 99999999999, 3], 3),  # huge numbers
        ("(" * 200 + "3" + ")" * 200, [3], 3),  # deep nesting
        ("9*" * 300 + "9", [9] * 301, 9),  # too long
        (None, [3], 3),
        ("", [3], 3),
    ],
)
def test_corrupted_answers_are_rejected(expr, numbers, target):
    assert not check(expr, numbers, target)


def test_no_hang_on_huge_products():
    expr = " * ".join(["999999999"] * 40)
    with pytest.raises(ExpressionError):
        evaluate(expr)
    assert evaluate("(7 - 1) / 4")[0] * 4 == 6


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/() x", max_size=60))
def test_checker_never_crashes(expr):
    assert check(expr, [1, 2, 3], 6) in (True, False)


def test_tokenizer_round_trips_text_with_tags(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tag_ids(tok)
    assert len(set(ids.values())) == 8
    rng = random.Random(0)
    for p in countdown.split("train", 50):
        for text in (corpus.sequential_solution(p, rng), corpus.parallel_solution(p, rng)):
            enc = tok.encode(text, add_special_tokens=False)
            assert tok.unk_token_id not in enc
            assert tok.decode(enc) == text
            assert sum(t in ids.values() for t in enc) == sum(text.count(t) for t in TAGS)
    chat = tok.apply_chat_template([{"role": "user", "content": "use 1 2 3 to make 6"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert tok.decode(tok.encode(chat, add_special_tokens=False)) == chat


def test_clean_parallel_solutions_are_valid_and_correct():
    rng = random.Random(1)
    for p in countdown.split("validation", 100):
        text = corpus.parallel_solution(p, rng)
        r = grammar.parse(text)
        assert r.valid, [v.message for v in r.violations]
        assert check(r.answer, p["numbers"], p["target"])
        for m in corpus.MISTAKES:
            bad = grammar.parse(corpus.parallel_solution(p, random.Random(2), mistake=m))
            assert check(bad.answer, p["numbers"], p["target"])
            assert not bad.valid or m == "missing_step"  # nothing to drop from a one-step block


def test_micro_recipe_trains_saves_and_caches(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npr.engine import LLM, SamplingParams
    from npr.world.base import Recipe, build_base

    recipe = Recipe(examples=300, steps=25, batch_size=16, warmup=5)
    out = tmp_path / "base"
    path, rep, reused = build_base(out, recipe, progress=False)
    assert not reused and rep["loss_last"] < rep["loss_first"] - 1.0
    assert (path / "model.safetensors").exists() and not (tmp_path / "base.tmp").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen3ForCausalLM" and tag_ids(tok)
    out1 = LLM(model, tok, num_pages=64).generate(["use 1 2 3 to make 6"], SamplingParams(max_tokens=20, seed=0))
    assert out1[0].finish_reason in ("stop", "length", "repetition")
    from npr.world.base import measure_base

    rep = measure_base(path, problems=4, k=2)  # what `npr base` prints (and caches)
    assert {"NPR prompt, sequential", "step-by-step prompt", "level 4, step-by-step"} <= rep.keys()
    assert all(0 <= r["avg@k"] <= r["best@k"] <= 1 for r in rep.values()) and rep["level 1, step-by-step"]["k"] == 8
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    _, _, reused = build_base(out, recipe, progress=False)
    assert reused and (path / "model.safetensors").stat().st_mtime_ns == stamp
    _, _, reused = build_base(out, recipe, rebuild=True, progress=False)
    assert not reused


def test_search_is_complete_and_honest():
    """Every generated problem is solved by the written search; a step says "yes" exactly when the
    expression it writes checks; a step depends only on its own plan (what makes it blind-safe)."""
    rng = random.Random(3)
    for level in countdown.LEVELS:
        for _ in range(100):
            p = countdown.make_problem(level, rng)
            moves = corpus.first_moves(p["numbers"])
            assert len({(m.x, m.op, m.y) for m in moves}) == len(moves)
            results = [corpus.work(m, p["target"]) for m in moves]
            assert any(expr for _, expr in results), p
            for text, expr in results:
                assert text.endswith(f"yes : {expr}") if expr else text.endswith(". no")
                assert expr is None or check(expr, p["numbers"], p["target"])
            assert corpus.sequential_solution(p, random.Random(0)) is not None


def test_blocks_try_new_first_moves_until_one_works():
    rng = random.Random(4)
    seen_retry = False
    for p in countdown.split("validation", 200):
        blocks = corpus.parallel_blocks(p, rng)
        tried = [plan for plans, *_ in blocks for plan in plans]
        assert len(tried) == len(set(tried))  # no first move is tried twice
        assert all(b[3] is None and b[2].startswith("none") for b in blocks[:-1])
        assert blocks[-1][3] is not None and check(blocks[-1][3], p["numbers"], p["target"])
        seen_retry |= len(blocks) > 1
    assert seen_retry
