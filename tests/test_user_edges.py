"""Rough edges a new user hits: hub ids, prompts built like eval's, one-line errors, one display."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

QWEN_STYLE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def npr(*args, env=None):
    full = {**os.environ, "COLUMNS": "300", **(env or {})}
    return subprocess.run([sys.executable, "-m", "npr", *args], capture_output=True, text=True, timeout=120, env=full)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import make_model, make_tokenizer

    from npr.tokens import add_npr_tokens

    path = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_STYLE_TEMPLATE
    add_npr_tokens(tok)
    make_model("qwen3", len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hub_id_resolves_through_the_local_cache(tiny_dir, tmp_path):
    import shutil

    snap = tmp_path / "hub" / "models--tiny-org--tiny-model" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_dir, snap)
    (tmp_path / "hub" / "models--tiny-org--tiny-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-model" / "refs" / "main").write_text("0123abcd")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = ["--prompt", "the plan", "--max-tokens", "8", "--seed", "1", "--json"]
    hub = npr("generate", "--model", "tiny-org/tiny-model", *args, env=env)
    assert hub.returncode == 0, hub.stderr
    local = npr("generate", "--model", str(tiny_dir), *args, env=env)
    assert json.loads(hub.stdout)["text"] == json.loads(local.stdout)["text"]  # the same model
    missing = npr("generate", "--model", "tiny-org/absent", *args, env=env)
    assert missing.returncode == 2 and "local Hugging Face cache" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_generate_builds_the_prompt_as_eval_does(tiny_dir):
    from transformers import AutoTokenizer

    from npr.tasks import prompt_ids

    args = ["generate", "--model", str(tiny_dir), "--prompt", "what is 2 + 3?", "--max-tokens", "4", "--json"]
    out = json.loads(npr(*args).stdout)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert out["prompt_ids"] == prompt_ids(tok, {"problem": "what is 2 + 3?", "grader": "math"})
    assert "in parallel" in tok.decode(out["prompt_ids"]) and "<|im_start|>" in tok.decode(out["prompt_ids"])
    raw = json.loads(npr(*args, "--raw").stdout)
    assert raw["prompt_ids"] == tok.encode("what is 2 + 3?")
    bad = npr(*args, "--task", "poetry")
    assert bad.returncode == 2 and "unknown task" in bad.stderr


def test_one_line_errors(tmp_path, tiny_dir):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model:\n  path: runs/base\n rollout: [1, 2\n")
    r = npr("train", "rl", "--config", str(cfg))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if "broken.yaml" in line]
    assert lines and "invalid YAML" in lines[0] and "line" in lines[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    r = npr("generate", "--model", str(empty), "--prompt", "x")
    assert r.returncode == 2 and "no model here" in r.stderr
    assert "sentencepiece" not in r.stderr and "Traceback" not in r.stderr


def test_no_third_party_progress_bars(tiny_dir, tmp_path, capfd):
    r = npr("generate", "--model", str(tiny_dir), "--prompt", "x", "--max-tokens", "2")
    assert r.returncode == 0 and "Loading weights" not in r.stderr and "it/s" not in r.stderr
    from transformers import AutoModelForCausalLM

    from npr.progress import quiet_libraries

    quiet_libraries()
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(tmp_path / "copy")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err


def test_prompt_file_replaces_the_instruction(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from npr.tasks import read_prompt_file, user_message

    rec = {"problem": "what is 2 + 3?", "grader": "math"}
    assert user_message(dict(rec, instruction="Think in branches.\n{problem}\nGo.")) == (
        "Think in branches.\nwhat is 2 + 3?\nGo."
    )
    assert user_message(dict(rec, instruction="Think in branches.")) == "Think in branches.\n\nwhat is 2 + 3?"
    assert user_message(dict(rec, instruction="Think."), parallel=False) == user_message(rec, parallel=False)
    with pytest.raises(ValueError, match="prompt file not found"):
        read_prompt_file(tmp_path / "absent.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_prompt_file(tmp_path / "empty.txt")

    (tmp_path / "paper.txt").write_text("You reason in parallel, as trained.\n\n{problem}")
    args = ["generate", "--model", str(tiny_dir), "--prompt", "what is 2 + 3?", "--max-tokens", "4", "--json"]
    out = json.loads(npr(*args, "--prompt-file", str(tmp_path / "paper.txt"), "--layout", "paper").stdout)
    text = AutoTokenizer.from_pretrained(tiny_dir).decode(out["prompt_ids"])
    assert "You reason in parallel, as trained." in text and "in parallel. Use this structure" not in text
    bad = npr(*args, "--layout", "mine")
    assert bad.returncode == 2 and "unknown layout" in bad.stderr


def test_pipeline_prompt_file_and_layout_reach_every_stage(tmp_path):
    from npr.pipeline import _stage_config, load_pipeline

    (tmp_path / "paper.txt").write_text("Reason in parallel: {problem}")
    (tmp_path / "rl.yaml").write_text("rollout:\n  mode: parallel\n")
    (tmp_path / "p.yaml").write_text("base: world\nprompt_file: paper.txt\nlayout: paper\nstage3:\n  config: rl.yaml\n")
    plan, root = load_pipeline(tmp_path / "p.yaml")
    assert plan.prompt_file == str(tmp_path / "paper.txt")
    cfg = _stage_config(plan, plan.stage3, root, [])
    assert cfg.data.prompt_file == str(tmp_path / "paper.txt") and cfg.rollout.layout == "paper"
    (tmp_path / "bad.yaml").write_text("base: world\nlayout: mine\n")
    with pytest.raises(ValueError, match="unknown layout"):
        load_pipeline(tmp_path / "bad.yaml")
