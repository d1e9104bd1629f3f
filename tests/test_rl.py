"""The RL loop: config handling, a run whose reward rises, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_model, torchrun

from npr import rewards
from npr.train.config import load_config
from npr.train.loop import Stream as Prompts
from npr.train.rl import train_rl
from npr.world.tokenizer import build_tokenizer


def test_config_yaml_and_overrides(tmp_path):
    cfg = load_config("configs/tiny/stage1.yaml", ["optim.lr=1e-6", "rollout.n=4", "run.out=/x"])
    assert cfg.optim.lr == 1e-6 and cfg.rollout.n == 4 and cfg.run.out == "/x" and cfg.algo.clip_high == 0.28
    from pathlib import Path

    for f in sorted(Path("configs").glob("*/stage*.yaml")):  # every shipped config parses with its types
        c = load_config(f)
        assert isinstance(c.optim.lr, float) and isinstance(c.run.steps, int), f
    with pytest.raises(ValueError, match="unknown key 'lrr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["lr=1"])
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "none.yaml")


def test_prompt_stream_is_seeded_and_resumable():
    probs = [{"id": i} for i in range(5)]
    a = Prompts(probs, 3)
    first = [p["id"] for p in a.take(12)]
    b = Prompts(probs, 3, position=7)
    assert [p["id"] for p in b.take(5)] == first[7:]
    assert sorted(first[:5]) == list(range(5))
    c = Prompts(probs, 3)
    c.take(2)
    c.position = 7  # as a resumed run restores it, after the stream has shuffled an epoch
    assert [p["id"] for p in c.take(5)] == first[7:]
    c.position = 1
    assert [p["id"] for p in c.take(3)] == first[1:4]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer()
    model = make_model("qwen3", len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def even(prompt, response, reference, metadata):
    """Fraction of even numbers: varies between any two random samples, so every group trains."""
    words = response.split()
    return sum(w.isdigit() and int(w) % 2 == 0 for w in words) / max(1, len(words))


def same_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float noise: all within 1e-3, and all but one in 1,000 within 1e-5."""
    diff = (a - b).abs()
    return bool(diff.max() <= 1e-3 and (diff > 1e-5).float().mean() <= 1e-3)


def _cfg(tiny_dir, out, steps, **kw):
    over = [f"model.path={tiny_dir}", f"run.out={out}", f"run.steps={steps}", "rollout.n=8",
            "rollout.prompts_per_step=4", "rollout.max_tokens=16", "optim.lr=0.02", "algo.reward=even",
            "data.size=50", "algo.dynamic_sampling=false", "algo.overlong_buffer=0", "run.save_every=1"]  # fmt: skip
    return load_config(None, over + [f"{k}={v}" for k, v in kw.items()])


def test_reward_rises_on_a_trivial_task(tiny_dir, tmp_path, monkeypatch):
    # "even" gives every group some signal; a rare-token reward would make the test a lottery
    monkeypatch.setitem(rewards.REWARDS, "even", even)
    train_rl(_cfg(tiny_dir, tmp_path / "run", 12), progress=False)
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 12 and all(np == np for np in (x["grad_norm"] for x in m))
    early, late = sum(x["reward_mean"] for x in m[:3]) / 3, sum(x["reward_mean"] for x in m[-3:]) / 3
    assert late > early + 0.05, (early, late)
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "samples.txt").read_text()


def test_resume_gives_the_uninterrupted_weights(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setitem(rewards.REWARDS, "even", even)
    train_rl(_cfg(tiny_dir, tmp_path / "full", 3), progress=False)
    train_rl(_cfg(tiny_dir, tmp_path / "cut", 2), progress=False)
    # a crash after step 3 was logged but before its checkpoint: the resumed run redoes step 3
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "reward_mean": 9.0}) + "\n")
    with (tmp_path / "cut" / "samples.txt").open("a") as f:
        f.write("=== step 3 | lost | reward +9.00\nlost\n\n")
    with pytest.raises(ValueError, match="already holds a run .*--resume continues it"):
        train_rl(_cfg(tiny_dir, tmp_path / "cut", 3), progress=False)  # neither resume nor overwrite
    train_rl(_cfg(tiny_dir, tmp_path / "cut", 3), resume=True, progress=False)
    samples = (tmp_path / "cut" / "samples.txt").read_text()
    assert "lost" not in samples and samples.count("=== step 3 ") == samples.count("=== step 1 ") > 0
    a = load_file(tmp_path / "full" / "checkpoints" / "step-000003" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step-000003" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    cut = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "step_time")}  # noqa: E731
    assert [strip(x) for x in full] == [strip(x) for x in cut]  # step 3 once, the redone one
    train_rl(_cfg(tiny_dir, tmp_path / "cut", 1), overwrite=True, progress=False)  # starts afresh
    assert [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").glob("step-*")] == ["step-000001"]


def test_non_finite_loss_stops_with_a_clear_error(tiny_dir, tmp_path, monkeypatch):
    from npr.train.loop import TrainingError

    monkeypatch.setitem(rewards.REWARDS, "even", lambda *a: float("nan") if len(a[1]) % 2 else 1.0)
    with pytest.raises(TrainingError, match="non-finite"):
        train_rl(_cfg(tiny_dir, tmp_path / "nan", 3), progress=False)
    assert not (tmp_path / "nan" / "checkpoints" / "step-000001").exists()


def test_two_process_run_matches_one_process(tiny_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch gives the 1-process weights."""
    from pathlib import Path

    from safetensors.torch import load_file

    over = [f"model.path={tiny_dir}", "run.steps=2", "rollout.n=4", "rollout.prompts_per_step=4",
            "rollout.max_tokens=16", "optim.lr=0.02", "optim.micro_batch=4", "algo.reward=test_rl:even",
            "data.size=50", "algo.dynamic_sampling=true", "run.save_every=2"]  # fmt: skip
    _run(None, *over, f"run.out={tmp_path / 'one'}")
    _run(2, *over, f"run.out={tmp_path / 'two'}")
    a = load_file(tmp_path / "one" / "checkpoints" / "step-000002" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step-000002" / "model.safetensors")
    base = load_file(Path(tiny_dir) / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    for k in a:  # Adam turns reduction-order noise in near-zero gradients into rare larger moves
        assert same_weights(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["reward_mean"] for x in m1] == pytest.approx([x["reward_mean"] for x in m2])


def test_fsdp_two_process_resumed_run_matches_one_process(tiny_dir, tmp_path):
    """FSDP2 over 2 CPU ranks, cut after step 1 and resumed, gives the plain 1-process weights."""
    from pathlib import Path

    from safetensors.torch import load_file

    over = [f"model.path={tiny_dir}", "rollout.n=4", "rollout.prompts_per_step=3", "rollout.max_tokens=16",
            "optim.lr=0.02", "optim.micro_batch=4", "algo.reward=test_rl:even", "data.size=50",
            "algo.dynamic_sampling=false", "run.save_every=1"]  # fmt: skip
    _run(None, *over, "run.steps=2", f"run.out={tmp_path / 'one'}")
    fsdp = [*over, "model.fsdp=true", f"run.out={tmp_path / 'fsdp'}"]
    _run(2, *fsdp, "run.steps=1")
    _run(2, *fsdp, "run.steps=2", "--resume")
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-000002"
    a = load_file(tmp_path / "one" / "checkpoints" / "step-000002" / "model.safetensors")
    b = load_file(ckpt / "model.safetensors")
    base = load_file(Path(tiny_dir) / "model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    for k in a:  # Adam at lr 0.02 turns summation-order noise in near-zero gradients into ~1e-5 steps
        assert same_weights(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    m1, m2 = (
        [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "fsdp")
    )  # noqa: E501
    assert [x["grad_norm"] for x in m1] == pytest.approx([x["grad_norm"] for x in m2], rel=1e-4)  # summed, not averaged


def test_fsdp_bf16_keeps_fp32_masters_matches_one_process_and_resumes_exactly(tiny_dir, tmp_path):
    """model.dtype=bfloat16 under FSDP2: fp32 shards and Adam state, bf16 compute (MixedPrecisionPolicy),
    fp32 gradient reduction. The checkpoint is bf16 and equals what one process with fp32 masters gets;
    a run that saves and goes on, and one resumed from that save (fp32 masters restored, not the
    rounded weights), end with the same weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from npr.train.checkpoint import load_state

    # one process loads the weights in bf16, FSDP in fp32: start both from bf16-representable values
    start = tmp_path / "start"
    shutil.copytree(tiny_dir, start)
    w = load_file(start / "model.safetensors")
    save_file({k: v.to(torch.bfloat16).float() for k, v in w.items()}, start / "model.safetensors", {"format": "pt"})
    over = [f"model.path={start}", "model.dtype=bfloat16", "rollout.n=4", "rollout.prompts_per_step=2",
            "rollout.max_tokens=16", "optim.lr=1e-4", "optim.micro_batch=2", "algo.reward=test_rl:even",
            "data.size=50", "algo.dynamic_sampling=false", "run.save_every=1"]  # fmt: skip
    _run(None, *over, "run.steps=1", f"run.out={tmp_path / 'one'}")
    fsdp = [*over, "model.fsdp=true"]
    _run(2, *fsdp, "run.steps=2", f"run.out={tmp_path / 'fsdp'}")  # saves after step 1 and goes on
    _run(2, *fsdp, "run.steps=1", f"run.out={tmp_path / 'cut'}")
    _run(2, *fsdp, "run.steps=2", f"run.out={tmp_path / 'cut'}", "--resume")
    ckpt = {d: tmp_path / d / "checkpoints" for d in ("one", "fsdp", "cut")}
    a, b = (load_file(ckpt[d] / "step-000001" / "model.safetensors") for d in ("one", "fsdp"))
    base = load_file(start / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in b.values())
    assert json.loads((ckpt["fsdp"] / "step-000001" / "config.json").read_text())["dtype"] == "bfloat16"
    layers = [k for k in b if ".layers." in k]  # (embedding rows of unused tokens get no gradient)
    moved = sum(int((b[k] != base[k].to(torch.bfloat16)).sum()) for k in layers)
    assert moved > 0.1 * sum(b[k].numel() for k in layers)  # it trained
    state = load_state(ckpt["fsdp"] / "step-000001")["optimizer"]
    adam = [t for st in state["state"].values() for t in st.values() if t.numel() > 1]
    assert adam and all(t.dtype == torch.float32 for t in adam)  # fp32 optimiser state for the fp32 shards
    assert all(t.dtype == torch.float32 for t in state["master_weights"].values())
    differ = sum(int((a[k] != b[k]).sum()) for k in a)  # reduction order: a last-bit difference, rarely
    assert differ <= 1e-3 * sum(v.numel() for v in a.values()), differ
    c, d = (load_file(ckpt[x] / "step-000002" / "model.safetensors") for x in ("fsdp", "cut"))
    assert all(torch.equal(c[k], d[k]) for k in c)


def _run(procs: int | None, *args: str, ok: bool = True):
    """`npr train rl ARGS` in one process, or under torchrun with `procs` CPU ranks (that must succeed)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), OMP_NUM_THREADS="1")
    launch = [sys.executable] if procs is None else torchrun(procs)
    r = subprocess.run([*launch, "-m", "npr", "train", "rl", *args], env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0 or not ok, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_lora_checkpoint_holds_merged_weights_and_resumes_exactly(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from npr.engine import load
    from npr.train.config import ModelConfig
    from npr.train.policy import load_policy

    monkeypatch.setitem(rewards.REWARDS, "even", even)
    lora = {"model.lora_rank": 4, "model.lora_targets": "q_proj,v_proj,down_proj"}
    train_rl(_cfg(tiny_dir, tmp_path / "full", 2, **lora), progress=False)
    train_rl(_cfg(tiny_dir, tmp_path / "cut", 1, **lora), progress=False)
    train_rl(_cfg(tiny_dir, tmp_path / "cut", 2, **lora), resume=True, progress=False)
    a = load_file(tmp_path / "full" / "checkpoints" / "step-000002" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step-000002" / "model.safetensors")
    base = load_file(tiny_dir / "model.safetensors")
    assert a.keys() == base.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = {k for k in a if not torch.equal(a[k], base[k])}
    assert changed and all(any(t in k for t in ("q_proj", "v_proj", "down_proj")) for k in changed), changed
    # The merged checkpoint computes what the live LoRA model computes.
    policy = load_policy(ModelConfig(path=str(tiny_dir), lora_rank=4, lora_targets="q_proj,v_proj,down_proj"),
                         tmp_path / "full" / "checkpoints" / "step-000002")  # fmt: skip
    merged, _ = load(tmp_path / "full" / "checkpoints" / "step-000002", device="cpu")
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(policy.model(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)


def test_micro_batches_respect_the_sequence_and_token_budgets():
    from npr.train.config import OptimConfig
    from npr.train.loop import micro_batches

    lengths = [30, 5000, 40, 35, 20, 900, 25, 31]
    assert micro_batches(lengths, OptimConfig(micro_batch=3)) == [[0, 1, 2], [3, 4, 5], [6, 7]]  # no budget: in order
    parts = micro_batches(lengths, OptimConfig(micro_batch=4, micro_batch_tokens=1000))
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    assert [1] in parts  # the long one goes alone instead of padding others to 5,000 tokens
    for p in parts:
        assert len(p) <= 4 and (len(p) == 1 or len(p) * max(lengths[i] for i in p) <= 1000)


def test_every_mini_batch_trains_on_every_rank():
    """The paper setting's split (8 ranks, 16 groups of 16, 4 optimiser steps): each step holds a
    quarter of every rank's rollouts, each rollout goes to one step; at one rank, whole groups in order."""
    from npr.train.rl import mini_batch_parts

    groups, n, world, mini = 16, 16, 8, 4
    owners = [g % world for g in range(groups) for _ in range(n)]  # group g decodes on rank g % world
    part = mini_batch_parts(owners, mini)
    for j in range(mini):
        mine = [i for i, p in enumerate(part) if p == j]
        assert len(mine) == groups * n // mini and {owners[i] for i in mine} == set(range(world))
    part = mini_batch_parts([0] * 143, mini)  # one rank: runs in order, sizes within one
    assert part == sorted(part) and {part.count(j) for j in range(mini)} == {35, 36}


def test_mini_batches_recompute_old_logprobs_and_let_the_clip_act(tiny_dir, tmp_path, monkeypatch):
    """One rollout batch, two optimiser steps: the trainer's old log-probs equal the engine's (parity),
    and the second update sees a ratio away from 1, so clip-higher acts; with one step it cannot."""
    from npr.data import load_benchmark
    from npr.engine import LLM
    from npr.tags import tag_ids
    from npr.train.policy import load_policy
    from npr.train.rl import recompute_old_logprobs, rollouts

    monkeypatch.setitem(rewards.REWARDS, "even", even)
    for attention in ("default", "flex"):  # the trainer's kernel (FlexAttention on GPUs) against the engine's
        cfg = _cfg(tiny_dir, tmp_path / "parity", 1, **{"model.attention": attention})
        policy = load_policy(cfg.model)
        assert (policy.model.config._attn_implementation == "npr_flex") == (attention == "flex")
        llm = LLM(policy.model, policy.tokenizer, num_pages=256)
        probs = list(enumerate(load_benchmark(cfg.data.source, 2)))
        rolls = rollouts(llm, cfg, probs, 0, 0, even)
        recompute_old_logprobs(policy, cfg, [rolls], tag_ids(policy.tokenizer), policy.tokenizer.pad_token_id)
        for r in rolls:
            torch.testing.assert_close(r.old, torch.tensor(r.out.logprobs), atol=1e-4, rtol=0)

    from npr.train import rl

    recomputed = []  # part 0 trains against its own forward; only later parts are recomputed
    monkeypatch.setattr(rl, "recompute_old_logprobs", lambda p, c, parts, *a: recomputed.append(
                        [len(x) for x in parts]) or recompute_old_logprobs(p, c, parts, *a))  # fmt: skip
    clip = {}
    for mini in (1, 2):
        out = tmp_path / f"mini{mini}"
        train_rl(_cfg(tiny_dir, out, 1, **{"algo.loss": "dapo", "algo.mini_batches": mini}), progress=False)
        clip[mini] = json.loads((out / "metrics.jsonl").read_text())["clip_fraction"]
    assert clip[1] == 0.0 and clip[2] > 0.0, clip
    kept = json.loads((tmp_path / "mini2" / "metrics.jsonl").read_text())["kept_groups"] * 8  # rollout.n
    assert recomputed == [[kept - kept // 2]], (recomputed, kept)


def test_one_update_per_batch_takes_the_trainers_own_old_policy(tiny_dir, tmp_path, monkeypatch):
    """With one optimiser step per rollout batch the old log-probs are the trainer's forward itself:
    engine log-probs off by kernel noise (here 0.3 nats, as bf16 kernels can differ) must not let
    the clip act on the only update; the gap is logged instead."""
    from npr.train import rl

    monkeypatch.setitem(rewards.REWARDS, "even", even)
    make = rl.rollouts

    def noisy(*args, **kw):
        out = make(*args, **kw)
        for r in out:
            r.out.logprobs = [x - 0.3 for x in r.out.logprobs]
        return out

    monkeypatch.setattr(rl, "rollouts", noisy)
    out = tmp_path / "run"
    train_rl(_cfg(tiny_dir, out, 1, **{"algo.loss": "dapo"}), progress=False)
    m = json.loads((out / "metrics.jsonl").read_text())
    assert m["clip_fraction"] == 0.0 and abs(m["logprob_gap"] - 0.3) < 1e-3, m


def test_a_problem_drawn_twice_in_one_step_gets_different_rollouts(tiny_dir, tmp_path):
    from npr.data import load_benchmark
    from npr.engine import LLM
    from npr.train.policy import load_policy
    from npr.train.rl import rollouts

    cfg = _cfg(tiny_dir, tmp_path / "run", 1, **{"rollout.n": 2})
    policy = load_policy(cfg.model)
    llm = LLM(policy.model, policy.tokenizer, num_pages=256)
    p = load_benchmark(cfg.data.source, 1)[0]
    rolls = rollouts(llm, cfg, [(0, p), (1, p)], 0, 0, even)
    first, second = [r.out.token_ids for r in rolls if r.group == 0], [r.out.token_ids for r in rolls if r.group == 1]
    assert first != second
    again = rollouts(llm, cfg, [(0, p)], 0, 0, even)  # and a group's rollouts do not depend on the others
    assert [r.out.token_ids for r in again] == first


def test_kv_pool_sleeps_through_the_update(tiny_dir, tmp_path, monkeypatch):
    """The engine's KV pool holds no memory while the trainer updates, and is back for the next
    rollouts (the run's results are those of an engine that never slept: see the resume test)."""
    from npr.train import rl

    monkeypatch.setitem(rewards.REWARDS, "even", even)
    seen, step = [], rl.train_step

    def spy(policy, *args, **kw):
        seen.append(engines[0].pool.k.numel())
        return step(policy, *args, **kw)

    engines, make = [], rl.LLM
    monkeypatch.setattr(rl, "LLM", lambda *a, **kw: engines.append(make(*a, **kw)) or engines[-1])
    monkeypatch.setattr(rl, "train_step", spy)
    train_rl(_cfg(tiny_dir, tmp_path / "run", 2), progress=False)
    assert seen == [0, 0] and engines[0].pool.k.numel() == 0  # asleep at each update
    # and it wakes for the next generation with its full size
    completion = engines[0].generate([[5, 6, 7]], rl.SamplingParams(max_tokens=4, seed=1))[0]
    assert engines[0].pool.k.numel() > 0 and len(completion.token_ids) == 4


def test_checkpoints_are_pruned_to_the_newest_and_bad_run_settings_refused(tmp_path):
    import pytest

    from npr.train import checkpoint
    from npr.train.config import load_config

    root = tmp_path / "checkpoints"
    for step in (5, 10, 100, 1000):  # name order must be step order past a change of digits
        (root / f"step-{step:06d}").mkdir(parents=True)
        (root / f"step-{step:06d}" / checkpoint.STATE).write_text("x")
    (root / "latest.json").write_text('{"step": 1000, "path": "step-001000"}')
    checkpoint.prune(tmp_path, 0)
    assert len(list(root.glob("step-*"))) == 4  # 0 keeps all
    checkpoint.prune(tmp_path, 2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000100", "step-001000"]
    assert checkpoint.latest(tmp_path) == root / "step-001000"
    with pytest.raises(ValueError, match="run.save_every must be >= 1"):
        load_config(None, ["run.save_every=0"])
    with pytest.raises(ValueError, match="run.keep_checkpoints"):
        load_config(None, ["run.keep_checkpoints=-1"])


def test_latest_checkpoint_needs_no_pointer_and_skips_torn_folders(tmp_path):
    """A lost or stale latest.json (a crash between a folder's rename and the pointer's update)
    must not read as "no checkpoint": a fresh start would clear every checkpoint the run has.
    The engine reads a run folder the same way (`--model RUN`), needing only the weights."""
    from npr.engine.engine import resolve_model_dir
    from npr.train import checkpoint

    class Saves:  # the model and tokenizer: what `save` asks of them
        def save_pretrained(self, folder, state_dict=None):
            (Path(folder) / "model.safetensors").write_text("weights")
            (Path(folder) / "config.json").write_text("{}")

    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, Saves(), Saves(), {"step": step})
    root = tmp_path / "checkpoints"
    (root / "step-000009 copy").mkdir()
    torch.save({}, root / "step-000009 copy" / checkpoint.STATE)  # a user's copy: not a step-N name
    checkpoint.save(tmp_path, 4, Saves(), Saves(), {"step": 4})
    checkpoint.prune(tmp_path, 3)  # the copy neither counts among the newest nor is deleted
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002", "step-000003", "step-000004",
                                                           "step-000009 copy"]  # fmt: skip
    shutil.rmtree(root / "step-000004")
    assert checkpoint.latest(tmp_path) == root / "step-000003"
    (root / "latest.json").unlink()
    assert checkpoint.latest(tmp_path) == root / "step-000003" == resolve_model_dir(tmp_path)
    (root / "latest.json").write_text(json.dumps({"step": 1, "path": "step-000001"}))
    assert checkpoint.latest(tmp_path) == root / "step-000003" == resolve_model_dir(tmp_path)
    (root / "step-000003" / checkpoint.STATE).unlink()  # nothing to resume from; the weights still load
    assert resolve_model_dir(tmp_path) == root / "step-000003"
    (root / ".tmp-step-000004").mkdir()
    torch.save({}, root / ".tmp-step-000004" / checkpoint.STATE)  # half-written: not named step-N yet
    assert checkpoint.latest(tmp_path) == root / "step-000002"
    checkpoint.save(tmp_path, 2, Saves(), Saves(), {"step": 22})  # a step written again replaces it whole
    assert checkpoint.load_state(root / "step-000002")["step"] == 22
    assert not list(root.glob(".old-*")) and checkpoint.latest(tmp_path) == root / "step-000002"


def nan_on_rank1(prompt, response, reference, metadata):
    """NaN rewards for rank 1's rollouts only: one rank's loss goes non-finite, the other's not."""
    import os

    return float("nan") if os.environ.get("RANK") == "1" else even(prompt, response, reference, metadata)


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tiny_dir, tmp_path):
    """The check is summed over ranks after the backward passes: both ranks stop with the error
    (one rank raising alone left the other in a collective: across nodes, until the timeout)."""
    over = [f"model.path={tiny_dir}", "run.steps=1", "rollout.n=4", "rollout.prompts_per_step=4",
            "rollout.max_tokens=16", "algo.reward=test_rl:nan_on_rank1", "data.size=50",
            "algo.dynamic_sampling=false", f"run.out={tmp_path / 'nan'}"]  # fmt: skip
    r = _run(2, *over, ok=False)
    assert r.returncode != 0 and r.stderr.count("error: non-finite loss in") == 2, r.stderr[-3000:]
    assert not (tmp_path / "nan" / "checkpoints" / "step-000001").exists()


def test_the_run_folder_must_be_one_filesystem_for_every_rank(tmp_path, monkeypatch):
    """Several nodes with disks of their own: ranks that cannot read rank 0's files stop at once
    (they would resume from nothing, or hang waiting for a checkpoint they never see)."""
    import torch.distributed as dist

    from npr.train import distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        distributed.check_shared(tmp_path)  # the 2-process tests pass it with a shared folder
        assert list(tmp_path.iterdir()) == []  # no mark left behind
        assert distributed.from_rank0(["step-3"]) == ["step-3"]
        monkeypatch.setattr(distributed, "gather", lambda items: items + [False])  # rank 1 on another disk
        with pytest.raises(ValueError, match=r"ranks \[1\] do not see rank 0's files"):
            distributed.check_shared(tmp_path)
    finally:
        dist.destroy_process_group()
