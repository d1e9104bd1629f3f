"""Stage 2: rejection sampling (accept/reject, canonical form, resume, dedupe) and parallel SFT."""

from __future__ import annotations

import json
import random
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model, torchrun

from npr import grammar
from npr.modeling import topology_forward
from npr.tags import tag_ids
from npr.tasks import prompt_ids
from npr.tokens import encode_pieces
from npr.topology import collate
from npr.train.config import load_config
from npr.train.distill import DistillConfig, judge, run_distill
from npr.train.sft import causal, load_examples, pack, sft_batch, sft_loss, train_sft
from npr.world import countdown
from npr.world.corpus import parallel_solution
from npr.world.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def problems(n: int, seed: int = 0) -> list[dict]:
    return countdown.split("train", n, seed=seed)


def solution(problem: dict, seed: int) -> str:
    """A correct, well-formed answer; different seeds give different texts (the world's own is unique)."""
    text = parallel_solution(problem, random.Random(seed))
    head, tail = text.rsplit(" </takeaway>", 1)
    return f"{head}{' .' * seed} </takeaway>{tail}"


def wrong(text: str) -> str:
    return re.sub(r"\\boxed\{[^}]*\}", r"\\boxed{ 999 }", text)


def test_judge_accepts_and_rejects_crafted_responses(tok):
    p = problems(1)[0]
    good = solution(p, 1)
    assert judge(p, good, tok)[0] is None
    assert judge(p, wrong(good), tok)[0] == "incorrect"
    assert judge(p, good.replace("</takeaway>", "", 1), tok)[0] == "malformed"
    assert judge(p, "the answer is \\boxed{ 3 }", tok)[0] == "malformed"  # no block: not the schema
    # Glue between the tags of a block is dropped: the accepted ids are the canonical ones.
    glued = good.replace("</guideline>", "</guideline> \n ", 1).replace("</step>", "</step> ", 1)
    reason, ids, resp = judge(p, glued, tok)
    assert reason is None and grammar.canonical(resp) == grammar.canonical(grammar.parse(good))
    assert ids == encode_pieces(tok, grammar.canonical_pieces(grammar.parse(good)))


class ScriptedLLM:
    """Answers the j-th request for a problem with script[id][j] (sampling settings are checked)."""

    def __init__(self, tokenizer, probs: list[dict], script: dict):
        self.tokenizer, self.script, self.calls, self.used = tokenizer, script, 0, {}
        self.by_prompt = {tuple(prompt_ids(tokenizer, p)): p["id"] for p in probs}

    def generate(self, prompts, params):
        self.calls += 1
        out = []
        for ids, sp in zip(prompts, params):
            assert sp.mode == "sequential" and sp.temperature == 1.0 and not sp.enforce_structure
            pid = self.by_prompt[tuple(ids)]
            j = self.used.get(pid, 0)
            self.used[pid] = j + 1
            out.append(SimpleNamespace(text=self.script[pid][j]))
        return out


def _scripted(tok, probs, script):
    return ScriptedLLM(tok, probs, script)


def test_rejection_sampler_keeps_correct_wellformed_canonical_examples(tok, tmp_path):
    ps = problems(4)
    a, b, c, d = ps
    good_a = solution(a, 1)
    script = {
        a["id"]: [wrong(good_a), good_a, solution(a, 2), solution(a, 3)],  # accepted at try 2, then keep=1 stops
        b["id"]: [wrong(solution(b, 1))] * 4,  # never correct
        c["id"]: [solution(c, 5), solution(c, 5), solution(c, 6), solution(c, 7)],  # duplicate of an accepted one
        d["id"]: ["no structure \\boxed{ 1 }", solution(d, 1).replace("</takeaway>", "", 1), "x", "y"],
    }
    cfg = DistillConfig(tries=4, keep=2, per_round=2, chunk=2)
    stats = run_distill(_scripted(tok, ps, script), ps, tmp_path, cfg, progress=False)
    ex = [json.loads(x) for x in (tmp_path / "examples.jsonl").read_text().splitlines()]
    att = {x["id"]: x for x in map(json.loads, (tmp_path / "attempts.jsonl").read_text().splitlines())}
    assert [e["id"] for e in ex].count(a["id"]) == 2 and att[a["id"]]["tries"] == 4
    assert b["id"] not in {e["id"] for e in ex} and att[b["id"]]["reasons"] == {"incorrect": 4}
    assert att[c["id"]]["tries"] == 4 and att[c["id"]]["reasons"].get("duplicate") == 1
    assert [e["id"] for e in ex].count(c["id"]) == 2
    assert att[d["id"]]["reasons"] == {"malformed": 4}
    assert stats["examples"] == 4 and stats["tries"] == 16 and stats["acceptance_rate"] == pytest.approx(4 / 16)
    tags = tag_ids(tok)
    for e in ex:  # canonical round trip, ids of the canonical pieces, prompt ids of the problem
        resp = grammar.parse(e["response"])
        assert resp.valid and grammar.canonical(resp) == e["response"]
        assert e["response_ids"] == encode_pieces(tok, grammar.canonical_pieces(resp))
        assert e["prompt_ids"] == prompt_ids(tok, e["record"])
        assert e["plans"] == [len(blk.plans) for blk in resp.blocks] and tags["<step>"] in e["response_ids"]
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["tag_ids"] == tags and saved["problems"] == 4


def distill_script(ps: list[dict]) -> dict:
    """Per problem: wrong, then two distinct correct answers, or never correct (every third)."""
    return {p["id"]: [wrong(solution(p, 1))] * 3 if i % 3 == 2 else [wrong(solution(p, 1)), solution(p, 1),
            solution(p, 2)] for i, p in enumerate(ps)}  # fmt: skip


DISTILL_WORKER = """
import sys
from pathlib import Path
from test_sft import ScriptedLLM, distill_script, problems
from npr.train import distributed
from npr.train.distill import DistillConfig, run_distill
from npr.world.tokenizer import build_tokenizer
if __name__ == "__main__":  # the grader's process (spawned) imports this file again
    distributed.init()
    tok, ps = build_tokenizer(), problems(7)
    run_distill(ScriptedLLM(tok, ps, distill_script(ps)), ps, Path(sys.argv[1]), DistillConfig(tries=3, keep=2,
                per_round=1, chunk=1), progress=False)
"""


def test_distill_under_torchrun_writes_what_one_process_writes(tok, tmp_path):
    """Two ranks share the problems, append to files of their own and rank 0 merges them in problem
    order; a run cut with parts left behind resumes in one process with nothing lost or doubled."""
    import os
    import subprocess
    from pathlib import Path

    ps = problems(7)
    cfg = DistillConfig(tries=3, keep=2, per_round=1, chunk=1)
    one = run_distill(_scripted(tok, ps, distill_script(ps)), ps, tmp_path / "one", cfg, progress=False)
    (tmp_path / "worker.py").write_text(DISTILL_WORKER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), OMP_NUM_THREADS="1")
    r = subprocess.run([*torchrun(2), str(tmp_path / "worker.py"), str(tmp_path / "two")], env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    read = lambda folder, name: [json.loads(x) for x in (folder / name).read_text().splitlines()]  # noqa: E731
    for name in ("examples.jsonl", "attempts.jsonl"):
        assert read(tmp_path / "two", name) == read(tmp_path / "one", name)
    assert json.loads((tmp_path / "two" / "stats.json").read_text()) == json.loads(
        (tmp_path / "one" / "stats.json").read_text()) and one["examples"] == 10  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["attempts.jsonl", "examples.jsonl", "stats.json"]
    # Cut: rank 1 had written part of its share (its last line torn), and rank 0's part had been
    # merged into the main file but not yet deleted (a crash between the two). The resumed run in
    # one process redoes the rest and writes the files of an uninterrupted run, in problem order.
    ex, att = read(tmp_path / "one", "examples.jsonl"), read(tmp_path / "one", "attempts.jsonl")
    cut = tmp_path / "cut"
    cut.mkdir()
    mine = lambda rows, rank: [x for x in rows if [p["id"] for p in ps].index(x["id"]) % 2 == rank]  # noqa: E731
    lines = lambda rows: "".join(json.dumps(x) + "\n" for x in rows)  # noqa: E731
    (cut / "examples.jsonl").write_text(lines(mine(ex, 0)[:2]))
    (cut / "examples.rank0.jsonl").write_text(lines(mine(ex, 0)[:4]))
    (cut / "attempts.rank0.jsonl").write_text(lines(mine(att, 0)[:3]))
    (cut / "examples.rank1.jsonl").write_text(lines(mine(ex, 1)[:2]) + json.dumps(mine(ex, 1)[2])[:40])
    (cut / "attempts.rank1.jsonl").write_text(lines(mine(att, 1)[:1]))
    run_distill(_scripted(tok, ps, distill_script(ps)), ps, cut, cfg, progress=False)
    assert read(cut, "examples.jsonl") == ex and read(cut, "attempts.jsonl") == att
    assert not list(cut.glob("*.rank*"))


def test_rejection_sampler_resumes_without_duplicates(tok, tmp_path):
    ps = problems(3)
    script = {p["id"]: [solution(p, 1), solution(p, 2)] for p in ps}
    cfg = DistillConfig(tries=2, keep=1, per_round=1, chunk=1)
    run_distill(_scripted(tok, ps, script), ps, tmp_path, cfg, progress=False)
    before = (tmp_path / "examples.jsonl").read_text()
    llm = _scripted(tok, ps, script)
    run_distill(llm, ps, tmp_path, cfg, progress=False)  # everything done: nothing sampled
    assert llm.calls == 0 and (tmp_path / "examples.jsonl").read_text() == before
    # A crash after the examples of the last problem were written but before it was marked done.
    lines = (tmp_path / "attempts.jsonl").read_text().splitlines()
    (tmp_path / "attempts.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:7])
    run_distill(_scripted(tok, ps, script), ps, tmp_path, cfg, progress=False)
    ex = [json.loads(x) for x in (tmp_path / "examples.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in ex) == sorted(p["id"] for p in ps)
    # A crash in the middle of writing the last example: its line is cut, its problem not marked done.
    lines = (tmp_path / "examples.jsonl").read_text().splitlines()
    (tmp_path / "examples.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])
    tried = (tmp_path / "attempts.jsonl").read_text().splitlines()
    (tmp_path / "attempts.jsonl").write_text("\n".join(tried[:-1]) + "\n")
    run_distill(_scripted(tok, ps, script), ps, tmp_path, cfg, progress=False)
    ex = [json.loads(x) for x in (tmp_path / "examples.jsonl").read_text().splitlines()]  # every line whole
    assert sorted(e["id"] for e in ex) == sorted(p["id"] for p in ps)


def _examples(tok, n: int = 5) -> list[tuple[list[int], int]]:
    out = []
    for p in problems(n, seed=3):
        resp = grammar.parse(solution(p, 7))
        prompt = prompt_ids(tok, p)
        out.append((prompt + encode_pieces(tok, grammar.canonical_pieces(resp)), len(prompt)))
    return out


def test_sft_loss_of_a_batch_is_the_sum_of_single_example_losses(tok):
    model = make_model("qwen3", len(tok), attn="eager")
    tags = tag_ids(tok)
    ex = _examples(tok)
    single = []
    for ids, n in ex:  # one at a time, straight from the topology forward
        t = torch.tensor([ids])
        _, topo = collate([(ids, n)], tags)
        logp = torch.log_softmax(topology_forward(model, t, topo).logits[0, :-1].float(), -1)
        single.append(-logp[n - 1 :].gather(-1, t[0, n:, None]).sum())
    expected = torch.stack(single).sum()
    with torch.no_grad():
        padded = sft_loss(model, *sft_batch(pack(ex, False, 0), tags, 0, False))
        packed_rows = pack(ex, True, 2 * max(len(i) for i, _ in ex))
        assert any(len(r) > 1 for r in packed_rows)
        packed = sft_loss(model, *sft_batch(packed_rows, tags, 0, False))
    torch.testing.assert_close(padded, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(packed, expected, rtol=1e-4, atol=1e-3)


def test_only_response_tokens_carry_loss_and_sequential_is_causal(tok):
    tags = tag_ids(tok)
    ex = _examples(tok, 3)
    ids, topo, mask = sft_batch(pack(ex, True, 10_000), tags, 0, False)
    at = 0
    for seq, n in ex:
        assert mask[0, at : at + n - 1].sum() == 0  # predicting prompt tokens: no loss
        assert mask[0, at + n - 1 : at + len(seq) - 1].all()  # every response token is predicted with loss
        at += len(seq)
    assert mask.sum() == sum(len(s) - n for s, n in ex)
    # Parallel: the steps of a block share positions; sequential: positions 0..L-1 and a causal mask.
    seq_ids, n = ex[0]
    _, topo_par = collate([(seq_ids, n)], tags)
    _, topo_seq = collate([(seq_ids, causal(len(seq_ids)))], tags)
    assert topo_par.position_ids.max() < len(seq_ids) - 1 and (topo_par.block >= 0).any()
    assert topo_seq.position_ids[0].tolist() == list(range(len(seq_ids))) and (topo_seq.block < 0).all()
    model = make_model("qwen3", len(tok))
    t = torch.tensor([seq_ids])
    with torch.no_grad():
        loss = sft_loss(model, *sft_batch([[ex[0]]], tags, 0, True))
        labels = t.clone()
        labels[0, :n] = -100
        ref = model(input_ids=t, labels=labels).loss * (len(seq_ids) - n)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def distilled(tok, tmp_path_factory):
    """A tiny model folder and a distilled folder made by the scripted sampler."""
    root = tmp_path_factory.mktemp("sft")
    model = make_model("qwen3", len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    ps = problems(12, seed=5)
    script = {p["id"]: [solution(p, 1)] for p in ps}
    run_distill(_scripted(tok, ps, script), ps, root / "data", DistillConfig(tries=1, keep=1), progress=False)
    return root


def test_sft_run_lowers_the_loss_and_resumes_exactly(distilled, tmp_path):
    from safetensors.torch import load_file

    over = [f"model.path={distilled / 'model'}", f"data.source={distilled / 'data'}", "sft.batch_size=4",
            "sft.epochs=3", "optim.lr=3e-3", "optim.schedule=cosine", "optim.lr_min=1e-3", "optim.micro_batch=2",
            "run.save_every=3", "sft.packing=true", "sft.max_length=300"]  # fmt: skip
    full = train_sft(load_config(None, over + [f"run.out={tmp_path / 'full'}"]), progress=False)
    m = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 9 and full["step"] == 9
    assert m[-1]["loss"] < 0.7 * m[0]["loss"], [x["loss"] for x in m]
    assert m[-1]["lr"] == pytest.approx(1e-3, rel=1e-6) and m[0]["lr"] > m[-1]["lr"]
    train_sft(load_config(None, over + [f"run.out={tmp_path / 'cut'}", "sft.steps=9", "run.save_every=3"]),
              progress=False)  # fmt: skip
    # cut after step 3 (drop the later checkpoints), then resume to the end
    cut = tmp_path / "cut"
    for later in (cut / "checkpoints").glob("step-*"):
        if later.name != "step-000003":
            shutil.rmtree(later)
    train_sft(load_config(None, over + [f"run.out={cut}"]), resume=True, progress=False)
    a = load_file(tmp_path / "full" / "checkpoints" / "step-000009" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "step-000009" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_adds_missing_tags_and_reencodes(distilled, tmp_path):
    """A base tokenizer without the tags: they are added, the examples re-encoded from their text."""
    from conftest import make_tokenizer

    from npr.engine import load

    bare = make_tokenizer()
    model = make_model("qwen3", len(bare))
    model.save_pretrained(tmp_path / "bare")
    bare.save_pretrained(tmp_path / "bare")
    assert "<step>" not in bare.get_vocab()
    over = [f"model.path={tmp_path / 'bare'}", f"data.source={distilled / 'data'}", "sft.steps=1",
            "sft.batch_size=2", f"run.out={tmp_path / 'run'}"]  # fmt: skip
    train_sft(load_config(None, over), progress=False)
    lm, t2 = load(tmp_path / "run", device="cpu")  # a run folder resolves to its latest checkpoint
    tags = tag_ids(t2)
    assert lm.get_input_embeddings().weight.shape[0] >= len(t2) and max(tags.values()) < len(t2)
    ex = load_examples(distilled / "data", t2)
    assert any(tags["<guideline>"] in ids for ids, _ in ex)


def test_bad_sft_data_names_the_line(distilled, tok, tmp_path):
    lines = (distilled / "data" / "examples.jsonl").read_text().splitlines()
    (tmp_path / "examples.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"examples.jsonl:2"):
        load_examples(tmp_path / "examples.jsonl", tok)
    with pytest.raises(ValueError, match="npr distill"):
        load_examples(tmp_path / "none", tok)


def test_examples_are_encoded_in_the_layout_they_are_decoded_in(tokenizer, tmp_path):
    """--layout paper (the authors' checkpoints): Stage 2 trains `<step>\\n1: ...` and `<takeaway>\\n...`,
    what the engine forces in that layout, and masks those openings with sft.mask_forced."""
    from npr.train.sft import engine_forced

    text = grammar.build([(["add", "times"], ["two plus one", "two times one"], "so three")], "\\boxed{3}")
    resp = grammar.parse(text)
    canonical, paper = grammar.canonical_pieces(resp), grammar.canonical_pieces(resp, "paper")
    assert canonical[canonical.index("<step>") + 1] == "1: two plus one"
    assert paper[paper.index("<step>") + 1] == "\n1: two plus one"
    assert paper[paper.index("<takeaway>") + 1] == "\nso three"
    tags = tag_ids(tokenizer)
    record = {"id": "p", "problem": "what is 2 + 1?", "answer": "3", "grader": "math"}
    stored = encode_pieces(tokenizer, canonical)
    line = {"id": "p", "record": record, "prompt_ids": prompt_ids(tokenizer, record), "response": text,
            "response_ids": stored, "layout": "canonical"}  # fmt: skip
    (tmp_path / "examples.jsonl").write_text(json.dumps(line) + "\n")
    (tmp_path / "stats.json").write_text(json.dumps({"tag_ids": tags}))
    ((ids, n),) = load_examples(tmp_path, tokenizer)
    assert ids[n:] == stored  # stored ids reused in their own layout
    ((ids, n),) = load_examples(tmp_path, tokenizer, layout="paper")
    assert ids[n:] == encode_pieces(tokenizer, paper)  # encoded again for another
    at = engine_forced(tokenizer, tags, "paper")(ids, n)
    assert tokenizer.decode([ids[p] for p in at]) == "<step>\n1:<step>\n2:<takeaway>\n"
    assert tokenizer.decode([ids[p] for p in engine_forced(tokenizer, tags)(ids, n)]) == "<step><step><takeaway>"
