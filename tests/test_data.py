"""Loaders on every shipped benchmark and on broken files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npr.data import BENCHMARKS, DataError, load_benchmark, records

SIZES = {"aime24": 30, "aime25": 30, "amc23": 40, "hmmt25": 30, "math500": 500, "gpqa": 198}


@pytest.mark.parametrize("name", list(SIZES))
def test_shipped_benchmarks_load(name):
    rows = load_benchmark(name)
    assert len(rows) == SIZES[name]
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["problem"].strip() and str(r["answer"]).strip() and r["grader"] == BENCHMARKS[name].grader
    if name == "gpqa":
        assert all(r["answer"] in "ABCD" and len(r["options"]) == 4 for r in rows)
    assert load_benchmark(name, limit=3) == rows[:3]


def test_benchmarks_ship_inside_the_package(tmp_path, monkeypatch):
    import gzip
    import shutil

    import npr
    from npr.data import benchmarks_dir

    monkeypatch.delenv("NPR_BENCHMARKS", raising=False)
    shipped = benchmarks_dir()
    assert shipped.parent == Path(npr.__file__).parent  # not ../shared: users do not have it
    assert {f for b in BENCHMARKS.values() for f in b.files} <= {p.name for p in shipped.iterdir()}
    assert "GPQA" in (shipped / "SOURCES.md").read_text()
    raw = (shipped / "gpqa_diamond.json.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and b"question" not in raw  # not readable as plain text
    # NPR_BENCHMARKS overrides the folder, and may hold GPQA uncompressed
    (tmp_path / "gpqa_diamond.json").write_bytes(gzip.decompress(raw))
    shutil.copy(shipped / "amc23.json", tmp_path)
    monkeypatch.setenv("NPR_BENCHMARKS", str(tmp_path))
    assert len(load_benchmark("gpqa")) == SIZES["gpqa"] and len(load_benchmark("amc23")) == SIZES["amc23"]
    with pytest.raises(DataError, match="math500.json: no such file .*NPR_BENCHMARKS"):
        load_benchmark("math500")


def test_countdown_and_user_files(tmp_path):
    assert len(load_benchmark("countdown", 5)) == 5
    assert {p["level"] for p in load_benchmark("countdown:train:1,2", 20)} == {1, 2}
    assert {p["level"] for p in load_benchmark("countdown:test", 20)} == {1, 2, 3}
    with pytest.raises(DataError, match="levels must be among"):
        load_benchmark("countdown:train:9")
    p = tmp_path / "mine.jsonl"
    p.write_text('{"q": "1+1?", "a": 2}\n{"q": "2+2?", "a": 4.0}\n')
    rows = records(p, problem_field="q", answer_field="a")
    assert [r["answer"] for r in rows] == ["2", "4"]
    (tmp_path / "ok.json").write_text(json.dumps([{"question": "x?", "answer": "1"}]))
    assert load_benchmark(f"mine={tmp_path / 'ok.json'}")[0]["id"] == "mine-0"
    assert load_benchmark(f"mine={p}", None, "q", "a")[1]["problem"] == "2+2?"
    # a multiple-choice file of one's own: NAME:choice=PATH, graded by option letter or text
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"question": "Which?\\nA. red\\nB. blue", "answer": "B"}\n')
    row = load_benchmark(f"quiz:choice={mc}")[0]
    assert row["grader"] == "choice" and row["options"] == ["red", "blue"] and row["id"] == "quiz-0"
    from npr.tasks import grade

    assert grade(row, "\\boxed{B}") and grade(row, "the answer is blue") and not grade(row, "\\boxed{A}")
    assert load_benchmark(f"quiz={mc}")[0]["grader"] == "math"
    with pytest.raises(DataError, match="grader must be math or choice"):
        load_benchmark(f"quiz:essay={mc}")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "a?", "answer": "1"}, {"problem": "b?", "answer": "2"}]), path)
    assert [r["answer"] for r in records(path)] == ["1", "2"]


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        (None, ".json", "no such file"),
        ("[{", ".json", "not valid JSON"),
        ('{"a": 1}', ".json", "expected a list"),
        ('{"problem": "x", "answer": "1"}\nnot json\n', ".jsonl", "line 2 is not valid JSON"),
        ('[{"problem": "x"}]', ".json", "record 0: none of the fields answer"),
        ('[{"problem": "x", "answer": "1"}, {"problem": ["?"], "answer": "2"}]', ".json", "record 1, field 'problem'"),
        ('[{"problem": {"a": 1}, "answer": "2"}]', ".json", "expected text, got dict"),
        ("[3]", ".json", "record 0: expected an object"),
        ("a,b", ".csv", "unknown format"),
        ("[1]", ".json.gz", "not a readable gzip file"),
    ],
)
def test_broken_files_name_file_record_and_field(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        records(path)
    assert str(path) in str(e.value)


def test_missing_named_field_and_unknown_benchmark(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"problem": "x", "answer": "1"}]))
    with pytest.raises(DataError, match="record 0: missing field 'ans'"):
        records(p, answer_field="ans")
    with pytest.raises(DataError, match="unknown benchmark 'nope'"):
        load_benchmark("nope")


def test_unreadable_text_duplicate_ids_and_cut_characters(tmp_path):
    """A file that is not UTF-8 and a file with one id twice are refused naming the file; a line a
    crash cut inside a character is skipped, not a failed resume."""
    from npr.data import merge_parts, read_appended

    bad = tmp_path / "utf16.jsonl"
    bad.write_bytes('{"problem": "x", "answer": "1"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match="not UTF-8") as e:
        records(bad)
    assert str(bad) in str(e.value)
    twice = tmp_path / "mine.jsonl"
    twice.write_text('{"id": 1, "problem": "1+1", "answer": "2"}\n{"id": 1, "problem": "2+2", "answer": "4"}\n')
    with pytest.raises(DataError, match="record 1: id 'mine-1' is also record 0's"):
        records(twice)
    cut = tmp_path / "samples.jsonl"
    cut.write_bytes(b'{"a": 1}\n' + '{"text": "\u03c0\u22483.14"}'.encode()[:11])  # ends inside "pi"
    assert read_appended(cut) == [{"a": 1}]
    assert merge_parts(cut, key=str) == [{"a": 1}] and cut.read_bytes() == b'{"a": 1}\n'
