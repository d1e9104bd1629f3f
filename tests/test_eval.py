"""Metrics on hand-made samples, and an end-to-end `npr eval` that resumes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from npr.metrics import pass_at_k, summarize


def s(pid, correct, **kw):
    base = dict(problem_id=pid, correct=correct, format_valid=True, parallel_blocks=1, wellformed_blocks=1,
                forked_wellformed_blocks=1, total_tokens=100, critical_path_tokens=50)  # fmt: skip
    return base | kw


def test_metrics_on_known_samples():
    samples = [
        s("a", True), s("a", False, format_valid=False, parallel_blocks=0, forked_wellformed_blocks=0),
        s("a", False), s("a", False),
        s("b", False, total_tokens=60, critical_path_tokens=60, parallel_blocks=0), s("b", False), s("b", False),
        s("b", False, wellformed_blocks=2),
        s("c", True, error="boom"),
    ]  # fmt: skip
    m = summarize(samples, wall_time=2.0)
    assert m["problems"] == 2 and m["samples"] == 8 and m["errors"] == 1 and m["k"] == 4
    assert m["avg@k"] == pytest.approx(1 / 8)
    assert m["best@k"] == pytest.approx(0.5)
    assert m["pass@1"] == pytest.approx((0.25 + 0) / 2)
    assert m["pass@2"] == pytest.approx((1 - 3 / 6) / 2)  # a: 1 - C(3,2)/C(4,2)
    assert m["pass@4"] == pytest.approx(0.5)
    assert m["format_valid_rate"] == pytest.approx(7 / 8)
    assert m["parallel_trigger_rate"] == pytest.approx(6 / 8)
    assert m["genuine_parallel_rate"] == pytest.approx(7 / 9)
    assert m["mean_total_tokens"] == pytest.approx((7 * 100 + 60) / 8)
    assert m["mean_critical_path_tokens"] == pytest.approx((7 * 50 + 60) / 8)
    assert m["token_parallelism"] == pytest.approx(760 / 410)
    assert m["tokens_per_s"] == pytest.approx(760 / 2.0)


def test_pass_at_k():
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 1, 5) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_eval_end_to_end_and_resume(tmp_path):
    from conftest import make_model

    from npr.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = make_model("qwen3", len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "ev"
    cmd = [sys.executable, "-m", "npr", "eval", "--model", str(tmp_path / "m"), "--bench", "countdown",
           "--limit", "3", "--n", "2", "--max-tokens", "40", "--out", str(out), "--compare-sequential"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for f in ("results.json", "samples.jsonl", "report.md", "accuracy.png", "tokens.png"):
        assert (out / f).exists(), f
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2 * 2
    rec = json.loads(lines[0])
    assert {"prompt", "response", "tree", "correct", "total_tokens", "critical_path_tokens"} <= set(rec)
    res = json.loads((out / "results.json").read_text())["benchmarks"]["countdown"]
    assert res["parallel"]["samples"] == 6 and res["sequential"]["parallel_trigger_rate"] == 0.0
    assert "speedup" in res and "| avg@k |" in (out / "report.md").read_text()
    # rerun: nothing left to do, nothing duplicated; a cut last line is redone
    (out / "samples.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    again = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines() if x.endswith("}")]
    assert len({(x["mode"], x["problem_id"], x["sample"]) for x in again}) == 12


def test_compared_sequential_decoding_is_not_held_to_the_latency_budget(tmp_path):
    """--compare-sequential --max-path-tokens: the budget is the parallel run's; the reference
    decodes the same work serially up to --max-tokens (else it would be cut at the budget)."""
    from conftest import make_model

    from npr.engine import LLM
    from npr.evaluate import run_eval
    from npr.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = make_model("qwen3", len(tok))  # random: it rarely stops before its budget
    llm = LLM(model, tok, num_pages=256)
    run_eval(llm, ["countdown"], tmp_path / "ev", 2, "parallel", 2, {"max_tokens": 40, "max_path_tokens": 10}, True)
    rows = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    par = [r for r in rows if r["mode"] == "parallel"]
    seq = [r for r in rows if r["mode"] == "sequential"]
    assert len(par) == len(seq) == 4
    assert max(r["critical_path_tokens"] for r in par) <= 10 < max(r["total_tokens"] for r in seq)


def test_eval_refuses_to_mix_models_or_settings_in_one_folder(tmp_path):
    """The issue's case: a second model into the same --out must not 'resume' the first one's results."""
    from conftest import make_model

    from npr.engine import LLM
    from npr.evaluate import run_eval
    from npr.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    llms = []
    for seed in (0, 1):
        model = make_model("qwen3", len(tok), seed=seed)
        model.config.eos_token_id = tok.eos_token_id
        llms.append(LLM(model, tok, num_pages=128))
    out, sampling = tmp_path / "X", {"max_tokens": 12}
    first = run_eval(llms[0], ["countdown"], out, 2, "sequential", 2, sampling)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["weights"] == first["provenance"]["weights"] and prov["sampling"]["max_tokens"] == 12
    with pytest.raises(ValueError, match="another evaluation .*weights"):
        run_eval(llms[1], ["countdown"], out, 2, "sequential", 2, sampling)
    with pytest.raises(ValueError, match="another evaluation .*sampling"):
        run_eval(llms[0], ["countdown"], out, 2, "sequential", 2, {"max_tokens": 13})
    before = (out / "samples.jsonl").read_text()
    assert run_eval(llms[0], ["countdown"], out, 2, "sequential", 2, sampling)["benchmarks"] == first["benchmarks"]
    assert (out / "samples.jsonl").read_text() == before  # same model and settings: resumed, nothing redone
    # a smaller --n and --limit into the same folder: summarised over its own plan, not the file
    small = run_eval(llms[0], ["countdown"], out, 1, "sequential", 1, sampling)["benchmarks"]["countdown"]["sequential"]
    whole = first["benchmarks"]["countdown"]["sequential"]
    assert (small["problems"], small["samples"], small["k"]) == (1, 1, 1)
    assert small["wall_time_s"] == pytest.approx(whole["wall_time_s"] / 4)  # its share of the chunk's time
    assert "| samples | 1 |" in (out / "report.md").read_text()
    (out / "timing.json").write_text("{}")  # an earlier version's wall times: stale once the samples are new
    second = run_eval(llms[1], ["countdown"], out, 2, "sequential", 2, sampling, overwrite=True)
    assert second["provenance"]["weights"] != prov["weights"]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4  # afresh, not appended
    assert not (out / "timing.json").exists()
