"""The pipeline through the real-model code path: a random Qwen3-shaped model with a BPE
tokenizer that lacks the tags, every stage for a couple of steps, resumable, with a report."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import make_model, make_tokenizer

from npr import grammar
from npr.pipeline import ROWS, load_pipeline, run_pipeline
from npr.report import tree_text

PROBLEMS = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    tok = make_tokenizer()
    model = make_model("qwen3", len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(root / "hf-model")
    tok.save_pretrained(root / "hf-model")
    (root / "math.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    data = f"toy={root / 'math.jsonl'}"
    rl = ["rollout.n=2", "rollout.prompts_per_step=2", "rollout.max_tokens=12", "run.steps=2", "data.size=4",
          f"data.source={data}", "rollout.kv_cache_gb=0.05", "model.dtype=float32", "algo.max_resample=0"]  # fmt: skip
    plan = {
        "out": str(root / "run"),
        "base": str(root / "hf-model"),
        "dtype": "float32",  # bf16 matmuls are slow on CPU
        "stage1": {"config": "stage1.yaml", "overrides": rl},
        "distill": {"data": data, "limit": 4, "tries": 2, "keep": 1, "max_tokens": 12},
        "stage2": {
            "config": "stage2.yaml",
            "overrides": [
                "sft.steps=2",
                "sft.batch_size=2",
                "optim.warmup_steps=0",
                "model.dtype=float32",
                "model.fsdp=false",
            ],  # fmt: skip
        },
        "stage3": {"config": "stage3.yaml", "overrides": rl},
        "eval": {"bench": data, "limit": 2, "n": 1, "max_tokens": 12, "kv_cache_gb": 0.05},
    }
    # the shipped Qwen3-4B stage configs, so their settings are exercised (paths are set by the pipeline)
    from npr.cli import CONFIGS

    for s in ("stage1", "stage2", "stage3"):
        (root / f"{s}.yaml").write_text((CONFIGS / "qwen3-4b-instruct" / f"{s}.yaml").read_text())
    (root / "pipeline.yaml").write_text(yaml.safe_dump(plan))
    return root


def _craft_examples(run, tok_dir):
    """A random model answers nothing correctly: add accepted examples as a good Stage-1 model would."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    from npr.data import load_benchmark

    with (run / "distill" / "examples.jsonl").open("a") as f:
        for p in load_benchmark(f"toy={run.parent / 'math.jsonl'}"):
            text = grammar.build([(["add them", "count up"], ["the sum", "count"], "both agree")],
                                 f"so \\boxed{{{p['answer']}}}")  # fmt: skip
            f.write(json.dumps({"id": p["id"], "record": p, "response": text, "plans": [2]}) + "\n")
    assert tok is not None


def test_every_stage_runs_on_a_real_checkpoint_and_resumes(setup):
    plan, root = load_pipeline(setup / "pipeline.yaml")
    run = setup / "run"
    for stage in ("base", "stage1", "distill"):
        run_pipeline(plan, root, progress=False, only=stage)
    from transformers import AutoTokenizer

    from npr.tags import tag_ids
    from npr.train.loop import TrainingError

    assert tag_ids(AutoTokenizer.from_pretrained(run / "base"))  # the tags were added to the base
    stats = json.loads((run / "distill" / "stats.json").read_text())
    assert stats["problems"] == 4 and stats["tries"] >= 4
    if stats["examples"] == 0:
        with pytest.raises((ValueError, TrainingError), match="no examples"):
            run_pipeline(plan, root, progress=False, only="stage2")
        _craft_examples(run, run / "base")
    report = run_pipeline(plan, root, progress=False)  # stage2, stage3, eval, report; earlier stages skipped
    m1 = [json.loads(x) for x in (run / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert len(m1) == 2  # Stage 1 was not redone
    assert (run / "stage2" / "checkpoints" / "latest.json").exists()
    # Stage 2 and the SR baseline's SFT warm up the base model, as the authors' release does; the
    # Stage-1 model only wrote their data
    for sft in (run / "stage2", run / "sr" / "sft"):
        assert yaml.safe_load((sft / "config.yaml").read_text())["model"]["path"] == str(run / "base")
    assert len((run / "stage3" / "metrics.jsonl").read_text().splitlines()) == 2
    # the SR baseline: sequential SFT on the same examples, then RL with sequential rollouts
    assert (run / "sr" / "sft" / "checkpoints" / "latest.json").exists()
    sr = [json.loads(x) for x in (run / "sr" / "metrics.jsonl").read_text().splitlines()]
    assert len(sr) == 2 and all(m["parallel_trigger_rate"] == 0 for m in sr)
    assert yaml.safe_load((run / "sr" / "config.yaml").read_text())["rollout"]["mode"] == "sequential"
    stages = {(r["stage"], r["mode"]) for r in report["rows"]}
    assert stages == {(s, m) for s, rows in ROWS.items() for m in rows}
    assert {r["stage"] for r in report["rows"]} == {"base", "stage1", "stage2", "stage3", "sr"}
    md = (run / "report.md").read_text()
    assert "| stage | decoding |" in md and (run / "report.json").exists() and (run / "curves_stage1.png").exists()
    times = json.loads((run / "times.json").read_text())
    assert set(times) >= {"base", "stage1", "distill", "stage2", "stage3", "sr", "eval", "report"}


def test_tree_text_draws_blocks_and_parallel_steps():
    text = grammar.build([(["a", "b"], ["one", "two"], "same")], "\\boxed{3}")
    tree = tree_text(text)
    assert "block 1: 2 plans" in tree and tree.count("║ parallel") == 2 and "answer: \\boxed{3}" in tree


def test_shipped_pipelines_load():
    from npr.cli import CONFIGS

    for f in sorted(CONFIGS.glob("*/pipeline.yaml")):
        plan, root = load_pipeline(f)
        for s in (plan.stage1, plan.stage2, plan.stage3):
            assert (root / s.config).is_file(), (f, s.config)
    assert {f.parent.name for f in CONFIGS.glob("*/pipeline.yaml")} == {"tiny", "qwen3-4b-instruct"}


def test_bad_pipeline_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_pipeline(tmp_path / "none.yaml")
    (tmp_path / "p.yaml").write_text("stage1:\n  confg: x\n")
    with pytest.raises(ValueError, match=r"p.yaml.stage1: unknown key 'confg'"):
        load_pipeline(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text("stage2_from: stage3\n")
    with pytest.raises(ValueError, match=r"p.yaml: stage2_from: expected base or stage1, got 'stage3'"):
        load_pipeline(tmp_path / "p.yaml")
