"""The engine against Hugging Face `generate`, the trainer-side topology, and its own invariants."""

from __future__ import annotations

import pytest
import torch
from conftest import bias_tags, make_model, make_tokenizer

from npr import grammar
from npr.engine import FINISH_REASONS, LLM, SamplingParams
from npr.modeling import token_logprobs, topology_forward
from npr.tags import TAGS, tag_ids
from npr.tokens import add_npr_tokens
from npr.topology import collate, executable, layout

PROMPTS = ["the plan is", "x + y = z so", "Let us try small cases first", "1: 2: 3:"]


@pytest.fixture(scope="module")
def tok():
    t = make_tokenizer()
    add_npr_tokens(t)
    return t


@pytest.fixture(scope="module")
def biased(tok):
    return bias_tags(make_model("qwen3", len(tok)), tok, 4.0)


def greedy(**kw):
    base = dict(temperature=0, max_tokens=24, repetition_penalty=1.0, enforce_structure=False, repetition_limit=1000)
    return SamplingParams(**(base | kw))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_sequential_greedy_equals_hf_generate(tok, family):
    model = make_model(family, len(tok))
    llm = LLM(model, tok, num_pages=64, page_size=4)
    outs = llm.generate(PROMPTS, greedy(mode="sequential"))
    for p, o in zip(PROMPTS, outs):
        ids = torch.tensor([tok.encode(p)])
        ref = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        ref = ref[0, ids.shape[1] :].tolist()
        assert o.token_ids == ref[: len(o.token_ids)]
        assert o.finish_reason == ("length" if len(ref) == 24 and tok.eos_token_id not in ref else "stop")
    assert llm.pool.free_pages == llm.pool.num_pages


def check_parity(model, tok, outs, atol=1e-4):
    tags = add_npr_tokens(tok)
    worst = 0.0
    for o in outs:
        full = o.prompt_ids + o.token_ids
        n = len(o.prompt_ids)
        if executable(full, tags, n) is None:  # complete: the engine's layout is the trainer's
            assert layout(full, tags, n) == o.layout
        ids, topo = collate([(full, o.layout)], tags)
        with torch.no_grad():
            lp = token_logprobs(topology_forward(model, ids, topo).logits, ids)[0, n - 1 :]
        sampled = ~torch.tensor(o.forced, dtype=torch.bool)
        if sampled.any():
            worst = max(worst, (lp - torch.tensor(o.logprobs))[sampled].abs().max().item())
    assert worst <= atol
    return worst


def test_parallel_logprobs_equal_trainer_logprobs(tok, biased):
    llm = LLM(biased, tok, num_pages=512, page_size=4)
    outs = llm.generate(PROMPTS * 2, SamplingParams(max_tokens=200, seed=5))
    assert sum(o.stats["parallel_blocks"] for o in outs) >= 4  # the test exercises real forks
    check_parity(biased, tok, outs)
    for o in outs:  # forced tokens are exactly <step> + "i:" and <takeaway>
        forced = [t for t, f in zip(o.token_ids, o.forced) if f]
        tags = add_npr_tokens(tok)
        assert forced.count(tags["<step>"]) == o.stats["branches"]
        assert all(t in (tags["<step>"], tags["<takeaway>"]) or t not in tags.values() for t in forced)
        for b in o.blocks:
            assert len(b["branches"]) == b["plans"]
            for i, (s, e) in enumerate(b["branches"]):
                text = tok.decode(o.token_ids[s + 1 : e])
                assert text.startswith(f"{i + 1}:")
    assert llm.pool.free_pages == llm.pool.num_pages


def test_paper_layout_forces_its_text_and_keeps_parity(tok, biased):
    """Checkpoints trained on the authors' layout (a newline after the tags) decode in parallel too."""
    from npr.engine.params import layout_texts

    llm = LLM(biased, tok, num_pages=512, page_size=4)
    outs = llm.generate(PROMPTS * 2, SamplingParams(max_tokens=200, seed=5, **layout_texts("paper")))
    assert sum(o.stats["parallel_blocks"] for o in outs) >= 4
    check_parity(biased, tok, outs)
    tags = add_npr_tokens(tok)
    newline = tok.encode("\n", add_special_tokens=False)
    joins = 0
    for o in outs:
        for b in o.blocks:
            for i, (s, e) in enumerate(b["branches"]):
                assert o.token_ids[s] == tags["<step>"] and tok.decode(o.token_ids[s + 1 : e]).startswith(f"\n{i + 1}:")
        for i, t in enumerate(o.token_ids):
            if t == tags["<takeaway>"]:
                joins += 1
                assert o.forced[i] and o.token_ids[i + 1 : i + 1 + len(newline)] == newline
                assert all(o.forced[i + 1 : i + 1 + len(newline)])
        parsed = grammar.parse(o.text)
        assert all(p.label == j + 1 for blk in parsed.blocks for j, p in enumerate(blk.steps))
    assert joins >= 1
    with pytest.raises(ValueError, match="placeholder"):
        SamplingParams(fork_text="step:")
    with pytest.raises(ValueError, match="unknown layout"):
        layout_texts("mine")
    assert llm.pool.free_pages == llm.pool.num_pages


def test_branches_run_concurrently(tok, biased):
    """Sibling steps advance in the same forward passes: the critical path is shorter than the total."""
    llm = LLM(biased, tok, num_pages=512, page_size=4)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=200, seed=11))
    multi = [o for o in outs if o.stats["parallel_blocks"]]
    assert multi
    for o in multi:
        assert o.stats["critical_path_tokens"] < o.stats["total_tokens"]


def test_sleeping_engine_frees_its_pool_and_wakes_to_the_same_answers(tok, biased):
    llm = LLM(biased, tok, num_pages=512, page_size=4)
    sp = SamplingParams(max_tokens=120, seed=7, temperature=0.9)
    before = llm.generate(PROMPTS, sp)
    size = llm.pool.k.numel()
    assert min(len(b) for b in llm.pool._gathered) > 0  # the sdpa path kept its gather buffers
    assert any(llm.runner._stage)  # and staged copies of its decode steps
    llm.sleep()
    assert llm.pool.k.numel() == llm.pool.v.numel() == 0 and llm.table.slots.shape[1] <= 256
    assert max(len(b) for b in llm.pool._gathered) == 0
    assert not llm.pool._staged and not any(llm.runner._stage)  # no staged copy outlives the pool's memory
    after = llm.generate(PROMPTS, sp)  # wakes by itself
    assert llm.pool.k.numel() == size and llm.pool.free_pages == 512
    assert [o.token_ids for o in before] == [o.token_ids for o in after]
    assert [o.logprobs for o in before] == [o.logprobs for o in after]
    llm.add_request(PROMPTS[0], sp)
    with pytest.raises(RuntimeError, match="in flight"):
        llm.sleep()


def test_same_seed_same_output_whatever_the_batch(tok, biased):
    llm = LLM(biased, tok, num_pages=512, page_size=4)
    sp = SamplingParams(max_tokens=120, seed=7, temperature=0.9, top_p=0.95, top_k=50)
    alone = llm.generate([PROMPTS[0]], sp)[0]
    crowd = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [SamplingParams(max_tokens=60, seed=1), sp, sp])[1]
    assert alone.token_ids == crowd.token_ids and alone.finish_reason == crowd.finish_reason
    other = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=120, seed=8, temperature=0.9))[0]
    assert other.token_ids != alone.token_ids


def test_tiny_pool_preempts_and_matches_large_pool(tok, biased):
    sp = [SamplingParams(max_tokens=80, seed=s) for s in range(8)]
    big = LLM(biased, tok, num_pages=1024, page_size=4).generate(PROMPTS * 2, sp)
    small = LLM(biased, tok, num_pages=40, page_size=4)
    got = small.generate(PROMPTS * 2, sp)
    assert sum(o.stats["preemptions"] for o in got) > 0  # the pool really was too small
    for a, b in zip(big, got):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    assert small.pool.free_pages == small.pool.num_pages and not small.pool.live


def test_a_preempted_request_resumes_with_the_tokens_it_had_chosen(tok, biased, monkeypatch):
    """After a preemption a request writes again the tokens it had chosen (a stream may have sent
    them), then samples on, even when the logits differ the second time, as bf16 GPU kernels do
    with another batch: here the output head changes at every preemption."""
    import copy

    from npr.engine.request import Request

    model = copy.deepcopy(biased)
    llm = LLM(model, tok, num_pages=40, page_size=4)
    before, reset = {}, Request.reset

    def preempt(req):
        before.setdefault(req.id, {r.index: list(r.tokens[r.offset :]) for r in req.runs})
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)  # other tokens from now on, had it to sample them
        reset(req)

    monkeypatch.setattr(Request, "reset", preempt)
    ids = [llm.add_request(p, SamplingParams(max_tokens=80, seed=s)) for s, p in enumerate(PROMPTS * 2)]
    while llm.has_work():
        llm.step()
    assert before  # the pool really was too small
    for i in ids:
        runs = {r.index: r.tokens[r.offset :] for r in llm.finished[i].runs}
        for index, toks in before.get(i, {}).items():
            assert runs[index][: len(toks)] == toks, (i, index)
    assert any(sum(map(len, b.values())) for b in before.values())  # some had tokens to keep
    assert llm.pool.free_pages == llm.pool.num_pages


def test_a_preempted_request_writes_its_tokens_back_in_chunks(tok, biased, monkeypatch):
    """Coming back after a preemption, a request computes the tokens it had decoded a chunk at a
    time (up to each next tag), not one a step, and ends as it would have without the preemption,
    log-probs included (those of the tokens written back are the ones recorded the first time)."""
    from npr.engine.request import Request

    sp = [SamplingParams(max_tokens=160, seed=s, max_plans=2) for s in range(6)]
    prompts = (PROMPTS * 2)[:6]
    big = LLM(biased, tok, num_pages=1024, page_size=4).generate(prompts, sp)
    llm = LLM(biased, tok, num_pages=48, page_size=4)
    reset, back = Request.reset, {}  # request id -> [tokens to write back, tags among them, steps taken]

    def preempt(req):
        toks = [t for r in req.runs for t in r.tokens[r.offset :]]
        back[req.id] = [len(toks), sum(t in llm.scheduler.tag_of for t in toks), None]
        reset(req)

    monkeypatch.setattr(Request, "reset", preempt)
    ids = [llm.add_request(p, s) for p, s in zip(prompts, sp)]
    while llm.has_work():
        llm.step()
        for r in llm.scheduler.running:  # count the steps until it holds its tokens again
            if r.id in back and back[r.id][2] is None:
                back[r.id][2] = 0
            if r.id in back and r.total < back[r.id][0]:
                back[r.id][2] += 1
    long = [b for b in back.values() if b[0] >= 40]
    assert long  # the pool was too small for requests of some length
    for n, tags, steps in long:  # about a step per tag (each is sampled); not one per token
        assert steps <= tags + 4 < n, (n, tags, steps)
    for i, a in zip(ids, big):
        o = llm.completion(i)
        assert o.token_ids == a.token_ids and o.finish_reason == a.finish_reason
        assert max(abs(x - y) for x, y in zip(o.logprobs, a.logprobs)) < 1e-4


def test_pool_too_small_for_one_request_aborts_cleanly(tok, biased):
    llm = LLM(biased, tok, num_pages=3, page_size=2)
    o = llm.generate(["Let us try small cases first and compare both results"], SamplingParams(seed=0))[0]
    assert o.finish_reason == "aborted" and "KV pool" in o.error
    assert llm.pool.free_pages == llm.pool.num_pages


@pytest.mark.parametrize("max_tokens, max_path", [(40, None), (200, 30), (13, 13), (90, 25)])
def test_budgets_are_never_exceeded(tok, biased, max_tokens, max_path):
    llm = LLM(biased, tok, num_pages=512, page_size=4)
    sp = SamplingParams(max_tokens=max_tokens, max_path_tokens=max_path, seed=3)
    for o in llm.generate(PROMPTS * 2, sp):
        assert len(o.token_ids) == o.stats["total_tokens"] <= max_tokens
        assert o.stats["critical_path_tokens"] <= (max_path or max_tokens)
        assert o.finish_reason in FINISH_REASONS


def test_critical_path_is_the_longest_branch_path(tok, biased):
    llm = LLM(biased, tok, num_pages=512, page_size=4)
    for o in llm.generate(PROMPTS, SamplingParams(max_tokens=150, seed=2)):
        path = len(o.token_ids) - sum(e - s for b in o.blocks for s, e in b["branches"])
        path += sum(max(e - s for s, e in b["branches"]) for b in o.blocks)
        assert o.stats["critical_path_tokens"] == path


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_structure_never_crashes(tok, seed):
    g = torch.Generator().manual_seed(seed)
    bias = {t: float(torch.rand((), generator=g) * 8) for t in TAGS}
    model = bias_tags(make_model("qwen3", len(tok), seed=seed), tok, bias)
    llm = LLM(model, tok, num_pages=256, page_size=4)
    tags = add_npr_tokens(tok)
    for mode in ("parallel", "sequential"):
        for enforce in (True, False):
            sp = SamplingParams(mode=mode, enforce_structure=enforce, max_tokens=100, seed=seed, max_plans=3)
            for o in llm.generate(PROMPTS, sp):
                assert o.finish_reason in FINISH_REASONS
                r = grammar.parse_ids(o.token_ids, tags, tok.decode)  # the grammar can judge it
                assert -2.0 < r.format_score <= 0.0
                if enforce and o.finish_reason == "stop":
                    assert executable(o.token_ids, tags) is None, o.text
                    assert all(len(b.plans) <= 3 for b in r.blocks)
                if mode == "parallel" and not enforce and o.finish_reason == "invalid_schema":
                    assert o.error
    assert llm.pool.free_pages == llm.pool.num_pages


def test_unsupported_model_is_a_clear_error(tok):
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration.*encoder-decoder"):
        LLM(model, tok, num_pages=8)
    sliding = make_model("qwen3", len(tok))
    sliding.config.use_sliding_window, sliding.config.sliding_window = True, 8
    with pytest.raises(ValueError, match="sliding-window"):
        LLM(sliding, tok, num_pages=8)


def test_engine_attention_is_set_for_its_forward_only(tok, biased):
    """The runner sets its attention implementation around each forward and puts the model's back,
    on a plain config (its dict, directly) and on one with sub-configs (through their setter)."""
    from transformers import LlavaConfig

    from npr.engine.runner import _set_attention

    seen = []
    forward = biased.base_model.forward

    def spy(*a, **kw):
        seen.append(biased.config._attn_implementation)
        return forward(*a, **kw)

    biased.base_model.forward = spy
    try:
        before = biased.config._attn_implementation
        LLM(biased, tok, num_pages=64).generate(PROMPTS[:1], SamplingParams(max_tokens=8, seed=0))
    finally:
        del biased.base_model.forward
    assert seen and set(seen) == {"npr_paged"}
    assert biased.config._attn_implementation == before != "npr_paged"
    composite = LlavaConfig()
    composite._attn_implementation = "sdpa"
    assert _set_attention(composite, "npr_paged") == "sdpa"
    assert [getattr(composite, k)._attn_implementation for k in ("text_config", "vision_config")] == ["npr_paged"] * 2
    _set_attention(composite, "sdpa")
    assert [getattr(composite, k)._attn_implementation for k in ("text_config", "vision_config")] == ["sdpa"] * 2


def test_bad_params_are_clear_errors():
    with pytest.raises(ValueError, match="mode"):
        SamplingParams(mode="tree")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_stop_strings_ids_and_repetition(tok):
    model = make_model("qwen3", len(tok))
    llm = LLM(model, tok, num_pages=128, page_size=4)
    free = llm.generate([PROMPTS[2]], greedy(mode="sequential", max_tokens=30))[0]
    assert len(free.token_ids) >= 10
    stop_id = free.token_ids[6]
    by_id = llm.generate([PROMPTS[2]], greedy(mode="sequential", stop_token_ids=[stop_id]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    # the generation config's EOS ids stop an answer too (Qwen3 chat models list two; ids past the
    # vocabulary, as a config built in code may name, are left out)
    model.generation_config.eos_token_id = [tok.eos_token_id, stop_id, 10**6]
    listed = LLM(model, tok, num_pages=128, page_size=4)
    assert listed.scheduler.eos == (tok.eos_token_id, stop_id)
    assert listed.generate([PROMPTS[2]], greedy(mode="sequential"))[0].token_ids == by_id.token_ids
    word = tok.decode(free.token_ids[5:7])
    by_text = llm.generate([PROMPTS[2]], greedy(mode="sequential", stop=[word]))[0]
    assert by_text.finish_reason == "stop" and word in by_text.text and len(by_text.token_ids) <= 7
    # one ordinary token made overwhelmingly likely: the engine ends the loop itself
    loop = bias_tags(make_model("qwen3", len(tok)), tok, 0.0)
    with torch.no_grad():
        loop.get_output_embeddings().bias[tok.encode(" the", add_special_tokens=False)[0]] = 50.0
    out = LLM(loop, tok, num_pages=128).generate([PROMPTS[0]], SamplingParams(max_tokens=200, seed=0))[0]
    assert out.finish_reason == "repetition" and len(out.token_ids) < 80  # a loop of one token: 64


def test_repetition_needs_a_long_loop_not_a_long_number():
    """Qwen's tokenizer writes a number a digit a token: 10**8 is eight repeats of "0", not a loop."""
    from types import SimpleNamespace

    from npr.engine.scheduler import MIN_REPEAT_SPAN, _repeating

    def repeats(tokens, limit=8):
        return _repeating(SimpleNamespace(tokens=[97, 98, 99] + tokens, offset=3), limit)  # 3 prompt tokens

    assert not repeats([1] + [0] * 8) and not repeats([5, 1, 6] * 8)  # 100000000; eight 1s in a list
    assert repeats([0] * MIN_REPEAT_SPAN) and not repeats([4] + [0] * (MIN_REPEAT_SPAN - 1))
    assert repeats([7, 1, 6] * 22) and not repeats([7, 1, 6] * 21)  # 66 tokens; 63
    sixteen = list(range(10, 26))
    assert repeats(sixteen * 8) and not repeats([0] + sixteen * 7)  # a long pattern: `limit` repeats
    assert repeats([3] * 100, limit=100) and not repeats([3] * 99, limit=100)
    assert not repeats([0] * 70 + [1])


def test_forks_count_against_max_num_seqs(tok, biased):
    """Branches never outnumber max_num_seqs, and the tokens are those of an unbounded engine."""
    sp = [SamplingParams(max_tokens=120, seed=s, max_plans=3) for s in range(8)]
    free = LLM(biased, tok, num_pages=1024, page_size=4).generate(PROMPTS * 2, sp)
    assert max(b["plans"] for o in free for b in o.blocks) == 3  # forks of 3 really happen
    llm = LLM(biased, tok, num_pages=1024, page_size=4, max_num_seqs=4)
    for p, s in zip(PROMPTS * 2, sp):
        llm.add_request(p, s)
    peak = 0
    while llm.has_work():
        llm.step()
        peak = max(peak, llm.scheduler.live())
    assert peak <= 4
    got = [llm.completion(i) for i in range(8)]
    for a, b in zip(free, got):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    assert llm.pool.free_pages == llm.pool.num_pages and len(llm.table.free) == llm.table.rows


def test_decoding_branches_are_left_out_only_for_flushed_rows(tok, biased):
    """At the tightest legal budget (max_batch_tokens = max_num_seqs) a decoding branch misses a step
    only when that step also computes the last token of branches that just ended (a fork's parent,
    a finished step), and then with all its request's decoding branches, so siblings stay in step;
    a budget below max_num_seqs, which would leave the same branches out step after step, is a
    clear error."""
    for seqs in (4, 5):  # at 5 the old cut split a block's siblings within 321 steps
        steps = _left_out(LLM(biased, tok, num_pages=1024, page_size=4, max_num_seqs=seqs, max_batch_tokens=seqs))
        assert all(flushed > 0 for left_out, flushed, _ in steps if left_out)
        assert not any(split for *_, split in steps)
        assert sum(left_out == 0 for left_out, *_ in steps) > 0.9 * len(steps)
    with pytest.raises(ValueError, match=r"max_batch_tokens \(3\) must be at least max_num_seqs \(4\)"):
        LLM(biased, tok, num_pages=64, max_num_seqs=4, max_batch_tokens=3)


def _left_out(llm: LLM) -> list[tuple[int, int, bool]]:
    """Per step of eight requests with forks: (decoding branches left out, flushed rows computed,
    whether part of a request's decoding branches was left out)."""
    sched, steps = llm.scheduler, []
    schedule = sched.schedule

    def checked():
        # decoding: one token to compute, as every live branch of its request (a request coming back
        # from a preemption computes chunks of its earlier tokens, as a prompt does)
        decoding = {b for r in sched.running for b in r.branches if not b.done and b.pending == 1
                    and all(c.pending <= 1 for c in r.branches if not c.done)}  # fmt: skip
        work = schedule()
        out = decoding - {b for b, _ in work}
        split = any(b.req is c.req for b in out for c in decoding - out)  # part of a request left out
        steps.append((len(out), sum(b.done for b, _ in work), split))
        return work

    sched.schedule = checked
    out = llm.generate(PROMPTS * 2, [SamplingParams(max_tokens=120, seed=s, max_plans=3) for s in range(8)])
    assert max(b["plans"] for o in out for b in o.blocks) == 3  # forks and joins really happen
    return steps


def test_long_prompts_prefill_in_chunks(tok, biased):
    prompt = " ".join(["Let us try small cases first and compare"] * 8)
    sp = SamplingParams(max_tokens=40, seed=4)
    whole = LLM(biased, tok, num_pages=512, page_size=4).generate([prompt, PROMPTS[0]], sp)
    llm = LLM(biased, tok, num_pages=512, page_size=4, max_batch_tokens=16, max_num_seqs=16)
    sizes = []
    forward = llm.runner.forward
    llm.runner.forward = lambda work, *a, **k: sizes.append(sum(n for _, n in work)) or forward(work, *a, **k)
    chunked = llm.generate([prompt, PROMPTS[0]], sp)
    assert len(tok.encode(prompt)) > 40 and max(sizes) <= 16
    for a, b in zip(whole, chunked):
        assert a.token_ids == b.token_ids
    check_parity(biased, tok, chunked)
    alone = llm.generate([prompt], sp)[0]  # its first steps are prompt chunks alone: no row samples
    assert alone.token_ids == whole[0].token_ids


def test_preempted_requests_wait_for_a_finish_before_coming_back(tok, biased):
    """No thrash: a preempted request is admitted again only after some request has finished."""
    llm = LLM(biased, tok, num_pages=40, page_size=4)
    for s in range(8):
        llm.add_request(PROMPTS[s % 4], SamplingParams(max_tokens=80, seed=s))
    sched, preempted_at, seen = llm.scheduler, {}, {}
    while llm.has_work():
        running, done = {r.id for r in sched.running}, len(sched.finished)
        llm.step()
        for r in sched.running:
            if r.id not in running and r.id in preempted_at:  # came back
                assert done > preempted_at[r.id] or not running - {r.id}, r.id
        for r in sched.waiting:
            if r.preemptions > seen.get(r.id, 0):
                preempted_at[r.id], seen[r.id] = done, r.preemptions
    assert preempted_at  # the pool really was too small
    assert llm.pool.free_pages == llm.pool.num_pages


def test_context_rows_always_list_the_branch_context(tok, biased):
    """After every step, each branch's table rows hold exactly its context's slots and pages."""
    llm = LLM(biased, tok, num_pages=256, page_size=4)
    for s in range(6):
        llm.add_request(PROMPTS[s % 4], SamplingParams(max_tokens=100, seed=s))
    forks = 0
    while llm.has_work():
        llm.step()
        for r in llm.scheduler.running:
            forks = max(forks, len(r.blocks))
            for b in r.branches:
                if b.sources:  # forked or joined this step: laid out at the next forward
                    continue
                segs = [x.seg for x in b.context]
                done = [x.computed for x in b.context[:-1]] + [b.run.computed]
                want = [s for seg, n in zip(segs, done) for s in seg.slots(0, n, 4)]
                assert llm.table.slots[b.row, : b.length].tolist() == want
                pages = [p for seg in segs for p in seg.pages]
                assert llm.table.pages[b.row, : llm.table.npages[b.row]].tolist() == pages
    assert forks


def block_sparse_flex(q, k, v, block_mask, scale, enable_gqa, seen: list, kernel_options=None):
    """FlexAttention as the fused GPU kernel computes it: a listed block is masked by mask_mod, a
    listed full block is read whole without mask_mod, an unlisted block is hidden (eager
    FlexAttention ignores the lists and evaluates mask_mod over the whole key sequence). Checks
    that both views agree, and that the key tile divides a block, as inductor's kernel requires
    (its default tile for 16-bit heads up to 128 wide is 64 keys on A100/H100), then attends;
    `seen` collects (partial, full) blocks per call."""
    from torch.nn.attention.flex_attention import create_mask

    (g, heads, n, _), slots = q.shape, k.shape[2]
    qs, ks = block_mask.BLOCK_SIZE
    tile = (kernel_options or {}).get("BLOCK_N", 64)
    assert ks % tile == 0, f"a {ks}-key block is not a multiple of the kernel's {tile}-key tile"
    kind = torch.zeros(g, n, slots, dtype=torch.int8)  # 0 unlisted, 1 partial, 2 full
    counts, lists = [], block_mask.as_tuple()
    for code, (num, idx) in ((1, lists[2:4]), (2, lists[4:6])):
        counts.append(int(num.sum()))
        for b, qb in ((b, qb) for b in range(g) for qb in range(num.shape[-1])):
            for j in idx[b, 0, qb, : num[b, 0, qb]].tolist():
                block = kind[b, qb * qs : (qb + 1) * qs, j * ks : (j + 1) * ks]
                assert not block.any(), "a page listed twice"
                block.fill_(code)
    by_mask_mod = create_mask(block_mask.mask_mod, g, 1, n, slots)[:, 0]
    visible = (kind == 2) | ((kind == 1) & by_mask_mod)
    assert torch.equal(visible, by_mask_mod), "the page lists disagree with mask_mod"
    seen.append(counts)
    if enable_gqa:
        k, v = (x.repeat_interleave(heads // x.shape[1], 1) for x in (k, v))
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible[:, None], -torch.inf)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_flex_key_tile_divides_every_page_size(head_dim, dtype):
    from npr.engine.attention import flex_tile

    for page in (16, 32, 64, 128, 256):
        tile = flex_tile(page, head_dim, dtype)["BLOCK_N"]
        assert page % tile == 0 and tile >= 16  # Triton's dot needs 16 keys at least


def test_flex_kernel_reads_the_pool_like_sdpa(tok, biased, monkeypatch):
    """The GPU kernel (FlexAttention over pool pages, with its block lists honoured as the fused
    kernel does) gives the SDPA reference's tokens and log-probs, through forks, joins, chunked
    prompts, preemptions and sibling steps attending as one group."""
    from npr.engine import attention, runner

    prompts = PROMPTS + [" ".join(["Let us try small cases first"] * 6)]
    sp = [SamplingParams(max_tokens=90, seed=s) for s in range(len(prompts))]
    ref = LLM(biased, tok, num_pages=256, page_size=16, attention="sdpa").generate(prompts, sp)
    seen, grouped = [], []
    monkeypatch.setattr(attention, "flex_kernel", lambda: lambda *a, **kw: block_sparse_flex(*a, **kw, seen=seen))
    shared_bucket = runner.ModelRunner._flex_shared_bucket
    monkeypatch.setattr(
        runner.ModelRunner, "_flex_shared_bucket", lambda self, *a: grouped.append(a) or shared_bucket(self, *a)
    )
    flex = LLM(biased, tok, num_pages=24, page_size=16, attention="flex", max_batch_tokens=24, max_num_seqs=24)
    got = flex.generate(prompts, sp)
    assert sum(o.stats["parallel_blocks"] for o in got) >= 2 and grouped
    assert all(sum(kind) > 0 for kind in zip(*seen))  # both partial and whole pages were listed
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    check_parity(biased, tok, got)
    assert flex.pool.free_pages == flex.pool.num_pages
    with pytest.raises(ValueError, match="page size"):
        LLM(biased, tok, num_pages=8, page_size=4, attention="flex")
    # replayed trajectories of two blocks with 40-token steps: sibling steps fill pages of their own
    from npr.bench import runs_of, workload

    work = workload(tok, 3, plans=3, step_tokens=40, blocks=2, prompt_tokens=20)
    replay = [runs_of(p, c, tag_ids(tok)) for p, c in work]
    sp = SamplingParams(max_tokens=10**4, enforce_structure=False, repetition_limit=10**6)
    prompts = [p for p, _ in work]
    long_ref, long_got = (
        LLM(biased, tok, num_pages=128, page_size=16, attention=kernel).generate(prompts, sp, replay=replay)
        for kernel in ("sdpa", "flex")
    )
    for (_, c), a, b in zip(work, long_ref, long_got):
        assert a.token_ids == b.token_ids == c and a.stats["parallel_blocks"] == 2
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    check_parity(biased, tok, long_got)


def test_compiled_flex_kernel_stays_within_a_few_graphs(tok, biased, monkeypatch):
    """On GPUs the flex kernel is compiled with dynamic shapes, and every step changes its sizes
    (rows, chunk lengths, pages per row). Past dynamo's recompile limit it would fall back to
    eager FlexAttention, whose scores over the whole pool are gigabytes: the graphs must stay few
    (dynamo only specialises sizes 0 and 1), over forks, joins, chunked prompts and preemptions.
    Compiled here with dynamo's eager backend, which counts graphs without generating code."""
    from torch._dynamo.utils import counters

    from npr import modeling

    prompts = PROMPTS + [" ".join(["Let us try small cases first"] * 6)]
    sp = [SamplingParams(max_tokens=90, seed=s) for s in range(len(prompts))]
    eager = LLM(
        biased, tok, num_pages=24, page_size=16, attention="flex", max_batch_tokens=24, max_num_seqs=24
    ).generate(prompts, sp)
    monkeypatch.setattr(modeling, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    llm = LLM(biased, tok, num_pages=24, page_size=16, attention="flex", max_batch_tokens=24, max_num_seqs=24)
    got = llm.generate(prompts, sp)
    first = counters["stats"]["unique_graphs"]
    more = llm.generate(prompts, [SamplingParams(max_tokens=120, seed=s + 10) for s in range(len(prompts))])
    assert sum(o.stats["parallel_blocks"] for o in got + more) >= 4
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]
    graphs = counters["stats"]["unique_graphs"]
    assert 1 < first <= graphs <= 16 < torch._dynamo.config.recompile_limit, dict(counters["stats"])
    torch._dynamo.reset()


def test_sibling_steps_share_their_prefix_gather(tok, biased, monkeypatch):
    """Steps of one block decoding (or computing a fork's forced openings) attend as one group
    over their prefix gathered once (sdpa path): the same tokens and log-probs as attending
    branch by branch."""
    from npr.engine import runner

    prompts = [" ".join(["Let us try small cases first"] * 4)] * 3 + PROMPTS
    sp = [SamplingParams(max_tokens=120, seed=s) for s in range(len(prompts))]
    calls = []
    shared_bucket = runner.ModelRunner._shared_bucket
    monkeypatch.setattr(
        runner.ModelRunner, "_shared_bucket", lambda self, *a: calls.append(a) or shared_bucket(self, *a)
    )
    grouped = LLM(biased, tok, num_pages=256, page_size=4).generate(prompts, sp)
    assert calls and sum(o.stats["parallel_blocks"] for o in grouped) >= 2
    tokens_each = {first[blocks[0][1][0] + 1] - first[blocks[0][1][0]] for blocks, first, *_ in calls}
    assert 1 in tokens_each and max(tokens_each) > 1  # decode steps and forks' openings both grouped
    monkeypatch.setattr(runner, "_share", lambda *a: False)
    alone = LLM(biased, tok, num_pages=256, page_size=4).generate(prompts, sp)
    for a, b in zip(grouped, alone):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    check_parity(biased, tok, grouped)


def _hidden_syncs(llm: LLM, n: int, tok) -> float:
    """Device->host synchronisations per step that are not the sampler's one transfer: reads of a
    tensor's value (item, int, float), data-dependent shapes (nonzero, boolean indexing) and
    repeat_interleave without its output size (a GPU reads the repeats' sum back)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    data_dependent = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}

    class Count(TorchDispatchMode):
        hits = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            indices = args[1] if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) else []
            if func in data_dependent or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                Count.hits += 1
            if func is aten.repeat_interleave.Tensor and (kwargs or {}).get("output_size") is None:
                Count.hits += 1
            return func(*args, **(kwargs or {}))

    for s in range(n):
        llm.add_request(PROMPTS[s % 4], SamplingParams(max_tokens=60, seed=s, top_p=0.9, top_k=20))
    steps = 0
    with Count():
        while llm.has_work():
            llm.step()
            steps += 1
    return Count.hits / steps


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_no_hidden_device_syncs_per_step(tok, biased, kernel, monkeypatch):
    from npr.engine import sampler

    monkeypatch.setattr(sampler, "reads_are_free", lambda t: False)  # count as on a GPU: no CPU-only reads
    if kernel == "flex":  # the kernel itself is one compiled op on GPUs; here its metadata path is under test
        from npr.engine import attention

        monkeypatch.setattr(attention, "flex_kernel", lambda: lambda q, k, v, **kw: torch.zeros_like(q))
    few = _hidden_syncs(LLM(biased, tok, num_pages=512, page_size=16, attention=kernel), 2, tok)
    many = _hidden_syncs(LLM(biased, tok, num_pages=512, page_size=16, attention=kernel), 12, tok)
    assert few == 0 and many == 0, (few, many)


@pytest.mark.parametrize("pages", [40, 512])
def test_steady_decode_steps_schedule_what_the_general_path_would(tok, biased, pages, monkeypatch):
    """A pure decode step reuses the last step's work (Scheduler._steady) until an event changes
    the branches: the same tokens, reasons and log-probs as rebuilding the work every step, with
    forks, joins, arrivals, an abort and (in the small pool) preemptions."""
    from npr.bench import staggered
    from npr.engine.scheduler import Scheduler

    prompts = PROMPTS * 2
    params = [SamplingParams(max_tokens=90, seed=s, temperature=0.8, max_plans=3) for s in range(8)]
    arrive, general = [0, 0, 3, 9, 9, 20, 31, 40], Scheduler.schedule
    hits = []

    def counted(self):
        hits.append(self._steady is not None)
        return general(self)

    monkeypatch.setattr(Scheduler, "schedule", counted)
    cached = staggered(LLM(biased, tok, num_pages=pages, page_size=4), prompts, params, arrive, victim=2, kill=25)

    def rebuilt(self):
        self._steady = None
        return general(self)

    monkeypatch.setattr(Scheduler, "schedule", rebuilt)
    llm = LLM(biased, tok, num_pages=pages, page_size=4)
    fresh = staggered(llm, prompts, params, arrive, victim=2, kill=25)
    assert sum(hits) > len(hits) // 4 and not all(hits)  # both paths ran
    assert any(o and o.stats["parallel_blocks"] for o in fresh)
    if pages == 40:
        assert any(o and o.stats["preemptions"] for o in fresh)
    for a, b in zip(cached, fresh):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.token_ids, a.finish_reason, a.logprobs) == (b.token_ids, b.finish_reason, b.logprobs)
    assert llm.pool.free_pages == llm.pool.num_pages and not llm.pool.live


@pytest.mark.parametrize("case", ["mixed", "long"])
def test_staged_decode_contexts_attend_as_gathered_ones(tok, biased, case, monkeypatch):
    """A run of pure decode steps keeps its contexts in contiguous copies (attention.Staged) and
    appends each step's keys and values to them instead of gathering out of the pool: the same
    tokens and log-probs as gathering every step. "mixed": both modes, uneven lengths (the
    masked path), sibling steps attending as one group, forks, joins, arrivals and an abort;
    "long": runs that outgrow their copy."""
    from npr.bench import staggered
    from npr.engine import kv_pool
    from npr.engine.runner import ModelRunner

    prompts = PROMPTS * 2  # four prompt lengths: the rows' lengths differ
    if case == "mixed":
        modes = ["parallel", "sequential"] * 4
        params = [
            SamplingParams(mode=m, max_tokens=120, seed=s, temperature=0.8, max_plans=3) for s, m in enumerate(modes)
        ]
        arrive, victim, kill = [0, 0, 3, 9, 9, 20, 31, 40], 2, 25
    else:
        params = [
            greedy(mode="sequential", max_tokens=70, temperature=0.8, seed=s, stop_token_ids=[]) for s in range(8)
        ]
        arrive, victim, kill = [0] * 8, -1, -1
    buckets, seen = ModelRunner._buckets, []

    def counted(self, *args):
        batch = buckets(self, *args)
        for bk in batch.buckets:  # (stage, a fresh copy, appended to, siblings as one group)
            st = bk.staged
            seen.append((args[-1], st is not None and st.fill is not None, st is not None and st.at is not None,
                         st is not None and bk.queries.shape[1] > 1))  # fmt: skip
        return batch

    def run():
        llm = LLM(biased, tok, num_pages=512, page_size=4)
        return staggered(llm, prompts, params, arrive, victim=victim, kill=kill)

    monkeypatch.setattr(ModelRunner, "_buckets", counted)
    kept = run()
    starts, appends = sum(s[1] for s in seen), sum(s[2] for s in seen)
    outgrown = sum(s[1] for s in seen if s[0] == 2)  # a run went on past its copy's width
    siblings = sum(s[2] and s[3] for s in seen)
    assert starts and appends > starts and (outgrown if case == "long" else siblings), (starts, outgrown, appends)
    seen.clear()
    monkeypatch.setattr(kv_pool, "STAGE_SHARE", 0.0)  # no room for a copy: every step gathers
    gathered = run()
    assert seen and not any(s[1] or s[2] for s in seen)
    assert case == "long" or any(o and o.stats["parallel_blocks"] for o in kept)
    for a, b in zip(kept, gathered):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.token_ids, a.finish_reason, a.logprobs) == (b.token_ids, b.finish_reason, b.logprobs)


def test_each_sampling_setting_reaches_its_field_of_the_batch(tok, biased, monkeypatch):
    """The engine builds a step's sampling rows as plain tuples (cheaper than a field at a time):
    each request's temperature, top-k, top-p, penalty (inside steps only), noise key, replay target
    and structure mask land in their own `SamplingBatch` field, for sampled and replayed rows."""
    from npr.engine import engine as engine_module
    from npr.engine.sampler import SamplingBatch

    batches, of_rows = [], SamplingBatch.of_rows

    def kept(rows):
        batches.append(of_rows(rows))
        return batches[-1]

    monkeypatch.setattr(engine_module.SamplingBatch, "of_rows", staticmethod(kept))
    llm = LLM(biased, tok, num_pages=256, page_size=4)
    sampled = [
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3, seed=s, max_tokens=120)
        for s in range(3)
    ]
    replayed = SamplingParams(temperature=0.5, top_k=7, top_p=0.8, mode="sequential", max_tokens=60)
    target = tok.encode(" the plan is", add_special_tokens=False)
    outs = llm.generate(PROMPTS[:4], [*sampled, replayed], replay=[None, None, None, [target]])
    assert any(o.blocks for o in outs[:3])
    rows = [r for b in batches for r in zip(b.temperature, b.top_k, b.top_p, b.penalty, b.keys, b.forced, b.masks)]
    mine = [r for r in rows if r[0] == 0.7]
    assert mine and all(r[1:3] == (5, 0.9) and r[5] == -1 and r[6] >= 0 for r in mine)
    assert {r[3] for r in mine} == {1.0, 1.3}  # the penalty inside steps only: the request wrote a block
    assert len({r[4] for r in mine}) == len(mine)  # a noise key per token
    forced = [r[5] for r in rows if r[0] == 0.0]
    assert forced == target + [0]  # then a token past the target, which finishes it
