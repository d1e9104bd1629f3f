"""Rough edges a new user hits: hub ids, prompts built like eval's, one-line errors, one display."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import torchrun

from npr.engine import SamplingParams

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
    from npr.pipeline import _stage_config, distill_config, load_pipeline

    (tmp_path / "paper.txt").write_text("Reason in parallel: {problem}")
    (tmp_path / "rl.yaml").write_text("rollout:\n  mode: parallel\n")
    (tmp_path / "p.yaml").write_text("base: world\nprompt_file: paper.txt\nlayout: paper\nstage3:\n  config: rl.yaml\n")
    plan, root = load_pipeline(tmp_path / "p.yaml")
    assert plan.prompt_file == str(tmp_path / "paper.txt")
    cfg = _stage_config(plan, plan.stage3, root, [])
    assert cfg.data.prompt_file == str(tmp_path / "paper.txt") and cfg.rollout.layout == "paper"
    assert distill_config(plan).layout == "paper"  # Stage 2's data is encoded in the layout it decodes in
    (tmp_path / "bad.yaml").write_text("base: world\nlayout: mine\n")
    with pytest.raises(ValueError, match="unknown layout"):
        load_pipeline(tmp_path / "bad.yaml")


def test_a_checkpoint_without_the_tags_gets_them_on_load(tmp_path, capsys):
    """A hub model never trained with NPR: `load` adds the tags as training does, and says so."""
    from conftest import make_model, make_tokenizer

    from npr.engine import LLM, load
    from npr.tags import TAGS, tag_ids

    tok = make_tokenizer()
    make_model("qwen3", len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, again = load(tmp_path, device="cpu")
    ids = tag_ids(again)
    assert "added them" in capsys.readouterr().err
    assert model.get_input_embeddings().weight.shape[0] == len(again) > max(ids.values())
    assert LLM(model, again).generate([again.encode("the plan")], SamplingParams(max_tokens=4))[0].token_ids
    kept, _ = load(tmp_path, device="cpu", add_tags=False)  # the trainer adds them itself (LoRA refuses)
    assert kept.get_input_embeddings().weight.shape[0] == len(tok) and all(t not in tok.get_vocab() for t in TAGS)
    r = npr("generate", "--model", str(tmp_path), "--prompt", "the plan", "--max-tokens", "4", "--json")
    assert r.returncode == 0 and "added them" in r.stderr, r.stderr


def test_a_base_checkpoint_stops_at_the_templates_turn_end(tiny_dir):
    """Qwen3 base: EOS <|endoftext|>, but prompted through the chat template it ends with <|im_end|>."""
    from transformers import AutoTokenizer

    from npr.engine.engine import stop_ids, turn_end
    from npr.world.tokenizer import build_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|endoftext|>" and turn_end(tok) == im_end
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    assert stop_ids(model, tok, len(tok)) == (tok.eos_token_id, im_end)
    world = build_tokenizer()  # its template ends a turn with its EOS: nothing new
    assert stop_ids(model, world, len(world)) == (world.eos_token_id,)
    tok.chat_template = "{{ raise_exception('no assistant turns') }}"  # a template that refuses: no extra id
    assert turn_end(tok) is None


def test_hybrid_thinking_templates_are_prompted_without_thinking(tiny_dir):
    """Qwen3's hybrid templates write an empty think block when enable_thinking is false."""
    from transformers import AutoTokenizer

    from npr.prompts import chat_ids

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = QWEN_STYLE_TEMPLATE + (
        "{% if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
        "<think>\n\n</think>\n\n{% endif %}"
    )
    assert tok.decode(chat_ids(tok, "2 + 3?")).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_trust_remote_code_fetches_the_models_code_from_the_hub(monkeypatch, tmp_path):
    import huggingface_hub

    from npr.engine import engine

    asked = []

    def fake(name, allow_patterns, local_files_only=False):
        asked.append(allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    engine._from_hub_cache("org/model")
    engine._from_hub_cache("org/model", code=True)
    assert "*.py" not in asked[0] and "*.py" in asked[1]


def test_eval_under_torchrun_draws_the_samples_of_one_process(tiny_dir, tmp_path):
    """Two ranks share the samples (per-sample seeds), append to files of their own, and rank 0
    merges them and writes the results: the same samples and accuracy as one process."""
    # batches of 4 of each mode's 12 samples: 6 batches, dealt to the ranks in turn
    args = ["eval", "--model", str(tiny_dir), "--bench", "countdown", "--limit", "3", "-n", "4", "--max-tokens",
            "24", "--compare-sequential", "--batch", "4"]  # fmt: skip
    one = npr(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    ranks = [*torchrun(2), "-m", "npr"]
    two = subprocess.run([*ranks, *args, "--out", str(tmp_path / "two")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("# NPR evaluation") == 1  # rank 0 reports

    def samples(folder):  # in the order one process writes them
        rows = [json.loads(x) for x in (folder / "samples.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("wall_time", "batch_seconds")} for r in rows]

    assert samples(tmp_path / "two") == samples(tmp_path / "one") and len(samples(tmp_path / "one")) == 24
    res = [json.loads((tmp_path / f / "results.json").read_text())["benchmarks"]["countdown"] for f in ("one", "two")]
    for mode in ("parallel", "sequential"):
        assert res[0][mode]["avg@k"] == res[1][mode]["avg@k"] and res[1][mode]["wall_time_s"] > 0
    assert not list((tmp_path / "two").glob("*.rank*")) and not list((tmp_path / "two").glob(".*rank*"))
    # rank 0's refusal (another evaluation's folder) stops both ranks, neither waits in a collective
    other = [*(("20" if a == "24" else a) for a in args), "--out", str(tmp_path / "two")]  # --max-tokens 20
    r = subprocess.run([*ranks, *other], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert r.returncode != 0 and r.stderr.count("holds results of another evaluation") >= 2, r.stderr[-3000:]
