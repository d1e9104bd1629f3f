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
        ("4 + 3", [3, 4], 7),  # the numbers out of their given order
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
    route it names checks, and every other outer value is compared with the target (low / high);
    a step depends only on the problem and its own plan (what makes it blind-safe)."""
    rng = random.Random(3)
    for level in countdown.LEVELS:
        for _ in range(100):
            p = countdown.make_problem(level, rng)
            found = []
            for grouping in countdown.GROUPINGS:
                for outer in countdown.OPS:
                    text, code = corpus.work(p["numbers"], grouping, outer, p["target"])
                    assert text.startswith(f"need {p['target']} :")
                    assert text.endswith(f"yes {code}") if code else text.endswith(". no")
                    assert text.count("yes") == (code is not None)
                    for part in text.split(" ; "):
                        words = part.split()
                        if "=" in words[-3:-1] and words[-1] in ("low", "high"):
                            value = int(words[-2])
                            assert (value < p["target"]) == (words[-1] == "low") and value != p["target"]
                    if code:
                        expr = corpus.answer(p, grouping, code)
                        assert check(expr, p["numbers"], p["target"]), (p, expr)
                        found.append(expr)
            assert found, p
            assert corpus.sequential_solution(p, random.Random(0)) is not None


def test_blocks_try_the_last_pair_only_when_the_first_fails():
    seen_retry = False
    for p in countdown.split("validation", 200):
        blocks = corpus.parallel_blocks(p)
        expected = [[f"{op} {g}" for op in "+-*/"] for g in countdown.GROUPINGS[: len(blocks)]]
        assert [plans for plans, *_ in blocks] == expected
        assert all(b[3] is None and b[2].startswith("none") for b in blocks[:-1])
        assert blocks[-1][3] is not None and check(blocks[-1][3], p["numbers"], p["target"])
        code = blocks[-1][2].split()[0]
        assert code in corpus.CODES and f"yes {code}" in " ".join(blocks[-1][1])
        seen_retry |= len(blocks) > 1
    assert seen_retry


def test_codes_are_single_tokens():
    tok = build_tokenizer()
    for code in corpus.CODES:
        assert len(tok.encode(f"yes {code} reaches", add_special_tokens=False)) == 3
    assert len(tok.encode("( 5 * 4 ) + 3", add_special_tokens=False)) == 7  # single symbols stay apart


def test_base_reads_some_clean_parallel_answers_in_their_topology():
    from npr.topology import layout
    from npr.world.base import Recipe, encode_examples

    tok = build_tokenizer()
    data = encode_examples(tok, Recipe(examples=400))
    tags = tag_ids(tok)
    parallel = [(ids, n) for ids, n, par in data if par]
    assert 0.1 * len(data) < len(parallel) < 0.4 * len(data)  # npr_share x clean_rate x topology_share
    for ids, n in parallel:
        assert max(layout(ids, tags, n).block) >= 0  # laid out in blocks: steps blind to their siblings
    none = encode_examples(tok, Recipe(examples=400, topology_share=0.0))
    assert not any(par for *_, par in none)


def test_base_weights_the_takeaway_verdict_in_the_loss():
    from npr.tags import TAKEAWAY
    from npr.world.base import Recipe, _batches, encode_examples

    tok = build_tokenizer()
    recipe = Recipe(examples=200, batch_size=8, takeaway_weight=7.0)
    tags = tag_ids(tok)
    ids, _, mask = next(_batches(encode_examples(tok, recipe), recipe, tags, tok.pad_token_id))
    verdict = ids[:, :-1] == tags[TAKEAWAY]  # the prediction made at <takeaway>: the code or "none"
    assert verdict.any()
    assert (mask[verdict] == 7.0).all()
    assert set(mask[~verdict].unique().tolist()) <= {0.0, 1.0}  # every other response token weighs 1
