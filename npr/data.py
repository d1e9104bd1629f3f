"""Problem sets: load JSON, JSONL, Parquet or Hugging Face datasets into one record shape.

A record is {"id", "problem", "answer", "grader", ...}: `grader` names the record's task
(npr/tasks.py: "math", "choice" with "options", or "countdown"). Field names are detected (problem/question/ORZ prompt;
answer/final_answer) or given. Every error names the file, the record and the field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PROBLEM_FIELDS = ("problem", "question", "prompt", "input")
ANSWER_FIELDS = ("answer", "final_answer", "solution_answer", "target")


class DataError(ValueError):
    pass


def benchmarks_dir() -> Path:
    """Where the benchmark files are: $NPR_BENCHMARKS when set, else the copies shipped in the package
    (npr/benchmarks, sources and licences in its SOURCES.md)."""
    env = os.environ.get("NPR_BENCHMARKS")
    return Path(env) if env else Path(__file__).resolve().parent / "benchmarks"


def _read_text(path: Path) -> str:
    """A text file, gzip-compressed when its name ends in .gz (how GPQA ships: not in plain text)."""
    if path.suffix == ".gz":
        import gzip

        try:
            data = gzip.decompress(path.read_bytes())
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
    else:
        data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .json (list or {"data": [...]}), .jsonl, .parquet file or a saved HF dataset dir."""
    path = Path(path)
    if not path.exists():
        hint = " (set NPR_BENCHMARKS to a folder that has it)" if os.environ.get("NPR_BENCHMARKS") else ""
        raise DataError(f"{path}: no such file{hint}")
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    try:
        if path.is_dir():
            from datasets import load_from_disk

            ds = load_from_disk(str(path))
            ds = ds[next(iter(ds))] if hasattr(ds, "keys") else ds
            return [dict(r) for r in ds]
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(_read_text(path).splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
            return rows
        if suffix == ".json":
            try:
                data = json.loads(_read_text(path))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a list of records, got {type(data).__name__}")
            return data
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except ImportError as e:
        raise DataError(f"{path}: reading it needs {e.name} (pip install {e.name})") from None
    raise DataError(
        f"{path}: unknown format {path.suffix!r} (use .json, .jsonl, .parquet, .json.gz, .jsonl.gz or a dataset dir)"
    )


def _text(value, where: str) -> str:
    if isinstance(value, list):  # ORZ conversation: [{"from": "user", "value": ...}, ...]
        turns = [t for t in value if isinstance(t, dict) and t.get("from", t.get("role")) in ("user", "human")]
        if not turns:
            raise DataError(f"{where}: conversation has no user turn")
        value = turns[0].get("value", turns[0].get("content"))
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: expected text, got {type(value).__name__}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _pick(row: dict, given: str | None, candidates, where: str) -> tuple[str, object]:
    if given:
        if given not in row:
            raise DataError(f"{where}: missing field {given!r}")
        return given, row[given]
    for f in candidates:
        if f in row:
            return f, row[f]
    raise DataError(
        f"{where}: none of the fields {', '.join(candidates)} (name one with --problem-field/--answer-field)"
    )


def records(
    path: str | Path,
    grader: str = "math",
    problem_field: str | None = None,
    answer_field: str | None = None,
    name: str | None = None,
) -> list[dict]:
    """Load a file into problem records for `grader`."""
    name = name or Path(path).stem
    out, seen = [], {}
    for i, row in enumerate(read_rows(path)):
        where = f"{path}: record {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        pf, pv = _pick(row, problem_field, PROBLEM_FIELDS, where)
        af, av = _pick(row, answer_field, ANSWER_FIELDS, where)
        rec = {
            "id": f"{name}-{row.get('id', row.get('problem_idx', i))}",
            "problem": _text(pv, f"{where}, field {pf!r}"),
        }
        if grader == "choice":
            # options as the question letters them ("A. ..."), else the "options" field
            listed = _lettered_options(rec["problem"])
            options = listed if len(listed) >= 2 else row.get("options")
            if not isinstance(options, list) or not options:
                raise DataError(f"{where}: field 'options' must be a non-empty list")
            letter = av[0] if isinstance(av, list) and av else av
            if not isinstance(letter, str) or len(letter.strip()) != 1:
                raise DataError(f"{where}, field {af!r}: expected an option letter, got {av!r}")
            rec |= {"answer": letter.strip().upper(), "options": [str(o) for o in options]}
        else:
            rec["answer"] = _text(av, f"{where}, field {af!r}")
        rec["grader"] = grader
        if rec["id"] in seen:  # metrics group samples by id, and a resume would skip the second
            raise DataError(f"{where}: id {rec['id']!r} is also record {seen[rec['id']]}'s; ids must be unique")
        seen[rec["id"]] = i
        out.append(rec)
    return out


def _lettered_options(text: str) -> list[str]:
    """The last run of options "A. ...", "B. ...", ... in a question, each with the lines that
    continue it up to the next option (a synthesis route of numbered steps is one option)."""
    heads = list(re.finditer(r"^([A-Z])\. ", text, re.MULTILINE))
    starts = [i for i, m in enumerate(heads) if m.group(1) == "A"]
    if not starts:
        return []
    run: list[re.Match] = []
    for m in heads[starts[-1] :]:
        if ord(m.group(1)) - ord("A") != len(run):
            break
        run.append(m)
    after = starts[-1] + len(run)  # the first head past the run, if any
    ends = [m.start() for m in run[1:]] + [heads[after].start() if after < len(heads) else len(text)]
    return [text[m.end() : end].strip() for m, end in zip(run, ends)]


@dataclass(frozen=True)
class Benchmark:
    files: tuple[str, ...]
    grader: str = "math"
    fields: dict = field(default_factory=dict)


BENCHMARKS = {
    "aime24": Benchmark(("aime24_orz_format.json",)),
    "aime25": Benchmark(("aime25-I.jsonl", "aime25-II.jsonl")),
    "amc23": Benchmark(("amc23.json",)),
    "hmmt25": Benchmark(("hmmt_feb_2025.json",)),
    "math500": Benchmark(("math500.json",)),
    "gpqa": Benchmark(("gpqa_diamond.json.gz",), grader="choice"),
    "countdown": Benchmark((), grader="countdown"),  # generated by its task (the default world): no files
}


def load_benchmark(
    name: str, limit: int | None = None, problem_field: str | None = None, answer_field: str | None = None
) -> list[dict]:
    """Problems of a registered benchmark, of `NAME=PATH` (a file of your own; field names may be
    given; `NAME:choice=PATH` grades it as multiple choice) or of `hf:DATASET[:SPLIT]` (a Hugging
    Face hub dataset, when online)."""
    fields = {"problem_field": problem_field, "answer_field": answer_field}
    if name.startswith("hf:"):
        rows = _hub(name[3:], **fields)
    elif "=" in name:  # NAME=PATH, or NAME:GRADER=PATH for another task than math (e.g. choice)
        name, path = name.split("=", 1)
        name, _, grader = name.partition(":")
        if grader not in ("", "math", "choice"):
            raise DataError(f"{name}:{grader}={path}: the grader must be math or choice, got {grader!r}")
        rows = records(path, grader or "math", name=name, **fields)
    elif name.split(":")[0] not in BENCHMARKS or (":" in name and BENCHMARKS[name.split(":")[0]].files):
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (or NAME=PATH, hf:DATASET)")
    elif BENCHMARKS[name.split(":")[0]].files == ():  # a generated task, e.g. countdown:train:1,2
        from npr.tasks import get_task

        head, *args = name.split(":")
        try:
            rows = get_task(BENCHMARKS[head].grader).load(args, limit)
        except ValueError as e:
            raise DataError(f"{name!r}: {e}") from None
    else:
        b = BENCHMARKS[name]
        rows = []
        for f in b.files:
            stem = Path(f).stem if len(b.files) > 1 else name
            path = benchmarks_dir() / f
            if not path.exists() and path.suffix == ".gz" and path.with_suffix("").exists():
                path = path.with_suffix("")  # an NPR_BENCHMARKS folder may hold it uncompressed
            rows += records(path, b.grader, name=stem, **b.fields)
    return rows[:limit] if limit else rows


def _hub(spec: str, **fields) -> list[dict]:
    import tempfile

    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(
            "hub datasets need the `datasets` package (pip install 'native-parallel-reasoner[hf]')"
        ) from None
    name, _, split = spec.partition(":")
    ds = load_dataset(name, split=split or "test")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.jsonl"
        path.write_text("".join(json.dumps(dict(r), default=str) + "\n" for r in ds))
        return records(path, name=name.split("/")[-1], **fields)


def read_appended(path: Path) -> list[dict]:
    """The records of a JSONL file a run appends to; a line cut by a crash is skipped (redone)."""
    return _records(path.read_bytes()) if path.exists() else []


def _records(raw: bytes) -> list[dict]:
    out = []
    for line in raw.splitlines():  # bytes: a cut may split a character of the last line
        try:
            out.append(json.loads(line.decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return out


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` at once: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # else a power cut can leave the new name on an empty file
    tmp.replace(path)


def write_records(path: Path, rows: list[dict]) -> None:
    """Rewrite an appended JSONL file with `rows` (atomically), e.g. to drop records a resume redoes."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def rank_part(path: Path, rank: int, world: int) -> Path:
    """The file rank `rank` appends `path`'s records to under torchrun (`path` itself in one
    process): no two processes append to one file, and rank 0 merges the parts (`merge_parts`)."""
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _parts(path: Path) -> list[Path]:
    """`path`'s rank parts, in rank order."""
    name = re.compile(rf"{re.escape(path.stem)}\.rank(\d+){re.escape(path.suffix)}")
    ranked = [(int(m[1]), p) for p in path.parent.glob(f"{path.stem}.rank*") if (m := name.fullmatch(p.name))]
    return [p for _, p in sorted(ranked)]


def merge_parts(path: Path, key, keep=None, order=None) -> list[dict]:
    """`path`'s records and those of its ranks' parts, in one file again: each `key` once (the
    first: a crash between writing the merged file and deleting the parts leaves both), those
    `keep` rejects and lines a crash cut left out, sorted by `order` when given (so a resumed or
    sharded run's file reads as one uninterrupted process would have written it). Rewritten
    atomically when anything changed, then the parts deleted. One process (rank 0) calls it while
    no rank appends."""
    parts = _parts(path)
    raw = path.read_bytes() if path.exists() else b""
    rows, seen = [], set()
    for r in _records(raw) + [r for p in parts for r in read_appended(p)]:
        if (keep is None or keep(r)) and key(r) not in seen:
            seen.add(key(r))
            rows.append(r)
    merged = sorted(rows, key=order) if order is not None else rows
    if parts or merged != rows or len(rows) != len(raw.splitlines()) or (raw and not raw.endswith(b"\n")):
        write_records(path, merged)
    for p in parts:
        p.unlink()
    return merged
