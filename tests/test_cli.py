"""The `npr` command line as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def npr(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "npr", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_check_exit_codes_and_json():
    good = npr("check", str(EXAMPLES / "good.txt"))
    assert good.returncode == 0 and good.stdout.startswith("valid")
    bad = npr("check", "--json", str(EXAMPLES / "bad.txt"))
    assert bad.returncode == 1
    out = json.loads(bad.stdout)
    assert set(out) == {"valid", "format_score", "blocks", "violations", "answer"}
    assert out["valid"] is False and -2 < out["format_score"] < 0
    assert out["blocks"] == [{"plans": 2, "steps": 1}] and out["answer"] == "12"
    assert {"missing_takeaway", "count_mismatch"} <= {v["kind"] for v in out["violations"]}
    assert all(set(v) == {"kind", "message", "position"} for v in out["violations"])


def test_check_reads_stdin():
    r = npr("check", "--json", "-", stdin="no tags here \\boxed{1}")
    assert r.returncode == 1
    assert json.loads(r.stdout)["violations"][0]["kind"] == "no_block"


def test_usage_errors_exit_2():
    missing = npr("check", "/nonexistent/response.txt")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert npr("check", "--bogus").returncode == 2


def test_help_lists_commands():
    r = npr("--help")
    assert r.returncode == 0 and "check" in r.stdout and "topology" in r.stdout


def test_topology_view():
    r = npr("topology", str(EXAMPLES / "tiny.txt"))
    assert r.returncode == 0
    rows = [line.split() for line in r.stdout.splitlines() if line[:4].strip().isdigit() and len(line.split()) == 4]
    steps = [(int(pos), seg) for _, pos, seg, tok in rows if tok == "<step>"]
    assert steps[0][0] == steps[1][0] and steps[0][1] == "0.0" and steps[1][1] == "0.1"
    assert "visibility" in r.stdout
    bad = npr("topology", "-", stdin="<guideline><step>1: x</step>")
    assert bad.returncode == 1 and "not executable" in bad.stdout


def test_generate_and_tree(tmp_path):
    from conftest import bias_tags, make_model, make_tokenizer

    from npr.tokens import add_npr_tokens

    tok = make_tokenizer()
    add_npr_tokens(tok)
    model = bias_tags(make_model("qwen3", len(tok)), tok, 4.0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    args = ["generate", "--model", str(tmp_path), "--prompt", "the plan is", "--seed", "3", "--max-tokens", "120"]
    r = npr(*args, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] in ("stop", "length", "path_length", "repetition")
    assert out["stats"]["total_tokens"] <= 120
    again = json.loads(npr(*args, "--json").stdout)
    assert again["text"] == out["text"]  # same seed, same output
    tree = npr(*args, "--tree")
    assert tree.returncode == 0 and "-- answer:" in tree.stdout
    if out["blocks"]:
        assert "branch tree:" in tree.stdout and "step 1" in tree.stdout
    seq = json.loads(npr(*args, "--json", "--mode", "sequential").stdout)
    assert seq["stats"]["branches"] == 0
    bad = npr("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_bench_engine_json():
    args = ("bench", "engine", "--config", "tiny", "--requests", "2", "--step-tokens", "8", "--blocks", "1", "--json")
    r = npr(*args, "--repeats", "1")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    keys = {"parallel_tps", "sequential_tps", "hf_generate_tps", "ideal_speedup", "speedup", "decode_speedup",
            "hf_schedule_speedup", "parity_max_abs_logprob_diff"}  # fmt: skip
    assert set(res) == keys
    assert res["ideal_speedup"] > 1.2 and res["parity_max_abs_logprob_diff"] <= 1e-4
    positive = ("parallel_tps", "sequential_tps", "hf_generate_tps", "speedup", "decode_speedup", "hf_schedule_speedup")
    assert all(res[k] > 0 for k in positive)
    bad = npr(*args, "--repeats", "0")
    assert bad.returncode == 2 and "--repeats must be at least 1" in bad.stderr


def test_bench_train_json_and_exact_lengths():
    from npr.bench import word_tokenizer
    from npr.bench.train import trajectory
    from npr.grammar import parse

    tok = word_tokenizer(512)
    for n in (300, 2048, 5000):
        prompt, completion = trajectory(tok, n)
        assert len(prompt + completion) == n
        assert parse(tok.decode(completion)).blocks  # a real parallel trajectory, not filler
    r = npr("bench", "train", "--config", "tiny", "--length", "300", "--length", "600", "--step", "papo", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["step"], x["length"]) for x in rows] == [("papo", 300), ("papo", 600)]
    assert all(x["peak_gib"] > 0 and x["step_s"] > 0 and x["checkpointing"] for x in rows)
    bad = npr("bench", "train", "--config", "tiny", "--step", "ppo")
    assert bad.returncode == 2 and "sft, papo" in bad.stderr


def test_bench_decode_bytes_and_json():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from npr.bench import SHAPES, random_model
    from npr.bench.decode import kv_bytes_per_token, weight_bytes

    untied = random_model("tiny")  # a step reads the head but only its rows of the input embedding
    every = sum(p.numel() for p in untied.parameters()) * 4
    assert weight_bytes(untied) == every - 512 * 64 * 4
    tied = Qwen3ForCausalLM(Qwen3Config(**{**SHAPES["tiny"], "tie_word_embeddings": True}))
    assert weight_bytes(tied) == sum(p.numel() for p in tied.parameters()) * 4 == every - 512 * 64 * 4
    assert kv_bytes_per_token(untied) == 2 * 2 * 2 * 16 * 4  # K and V x layers x kv heads x head dim x fp32

    r = npr("bench", "decode", "--batch", "1", "--batch", "3", "--prompt-tokens", "16", "--new-tokens", "4",
            "--page-size", "32", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["batch"] for x in rows] == [1, 3] and {x["page_size"] for x in rows} == {32}
    for x in rows:  # bytes: the weights plus each row's mean context (16 + 4 / 2 tokens)
        assert x["step_bytes"] == weight_bytes(untied) + x["batch"] * 18 * kv_bytes_per_token(untied)
        assert x["bound_s"] == x["step_bytes"] / x["copy_bandwidth"]
        assert 0 < x["engine_share"] == x["bound_s"] / x["engine_step_s"] and x["hf_share"] > 0
    bad = npr("bench", "decode", "--new-tokens", "1")
    assert bad.returncode == 2 and "--new-tokens" in bad.stderr


def test_hf_schedule_decodes_the_parallel_rows_of_each_phase():
    """The flat-HF baseline of `npr bench engine` runs the schedule it claims: the sequential
    pass one row per prompt for every token; the parallel pass the main runs one row per prompt,
    each block's steps `plans` rows per prompt, and after each join a cache of prefix + every
    step's tokens."""
    from npr.bench import hf_schedule_timer, random_model, runs_of, word_tokenizer, workload
    from npr.tags import tag_ids

    model, tok = random_model("tiny"), word_tokenizer(512)
    work = workload(tok, 2, 3, 5, 2, 7)
    runs = runs_of(*work[0], tag_ids(tok))
    assert len(runs) == 9  # main, 3 steps, main, 3 steps, main
    calls = []
    forward = model.forward

    def spy(*a, **kw):
        cache = kw.get("past_key_values")
        calls.append(((a[0] if a else kw["input_ids"]).shape[0], cache.get_seq_length() if cache is not None else 0))
        return forward(*a, **kw)

    model.forward = spy
    timed = hf_schedule_timer(model, [p for p, _ in work], runs, plans=3)
    calls.clear()
    seq_s, par_s = timed()
    assert seq_s > 0 and par_s > 0
    total = sum(map(len, runs))
    seq, par = calls[:total], calls[total:]
    assert seq == [(2, 7 + i) for i in range(total)]
    expect, context = [], 7
    for i in range(0, len(runs), 4):
        expect += [(2, context + j) for j in range(len(runs[i]))]
        context += len(runs[i])
        if i + 1 < len(runs):
            n = len(runs[i + 1])
            expect += [(6, context + j) for j in range(n)]
            context += 3 * n  # joined: the prefix once, then the three steps' tokens
    assert par == expect
