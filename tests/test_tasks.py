"""Tasks: every task behind one interface (load / prompt / grade); nothing downstream branches on one."""

from __future__ import annotations

import pytest

from npr.data import DataError, load_benchmark
from npr.tasks import TASKS, get_task, grade, prompt_ids, user_message


def test_each_task_prompts_and_grades_through_the_interface():
    math = {"grader": "math", "problem": "What is 2 + 2?", "answer": "4"}
    choice = {"grader": "choice", "problem": "Pick.\nA. one\nB. two", "answer": "B", "options": ["one", "two"]}
    cd = {"grader": "countdown", "problem": "use 2 3 4 to make 10", "numbers": [2, 3, 4], "target": 10, "answer": ""}
    assert "<guideline>" in user_message(math) and "step by step" in user_message(math, parallel=False)
    assert user_message(choice).endswith("in \\boxed{}.")
    assert user_message(cd).endswith("use 2 3 4 to make 10") and "parallel" in user_message(cd)
    assert "step by step" in user_message(cd, parallel=False)
    assert grade(math, "so \\boxed{4}") and not grade(math, "\\boxed{5}")
    assert grade(choice, "\\boxed{B}") and not grade(choice, "\\boxed{A}")
    assert grade(cd, "\\boxed{ 2 * 3 + 4 }") and not grade(cd, "\\boxed{ 2 * 3 * 4 }")
    assert not grade(cd, "\\boxed{ 10 }")  # the numbers must be used, each once


def test_generated_task_loads_through_its_task():
    rows = load_benchmark("countdown:validation:2", 5)
    assert len(rows) == 5 and {r["grader"] for r in rows} == {"countdown"} and {r["level"] for r in rows} == {2}
    assert rows == get_task("countdown").load(["validation", "2"], 5)
    with pytest.raises(DataError, match="levels must be among"):
        load_benchmark("countdown:train:9")
    with pytest.raises(DataError, match="unknown benchmark"):
        load_benchmark("aime25:extra")


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown task .*'poetry'"):
        grade({"grader": "poetry", "answer": "x"}, "x")
    assert set(TASKS) == {"math", "choice", "countdown"}


def test_prompt_ids_use_the_chat_template():
    from npr.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    rec = load_benchmark("countdown", 1)[0]
    ids = prompt_ids(tok, rec)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|> user") and text.endswith("assistant") and rec["problem"] in text
    assert prompt_ids(tok, rec, parallel=False) != ids
