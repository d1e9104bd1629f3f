"""The KV pool and the scheduler under random fork / join / finish / preempt / abort sequences (hypothesis)."""

from __future__ import annotations

import pytest
from conftest import bias_tags, make_model, make_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from npr.bench import staggered
from npr.engine import LLM, SamplingParams
from npr.engine.kv_pool import KVPool, PoolFull, Segment
from npr.tokens import add_npr_tokens


def owned(pool: KVPool, holders) -> list[int]:
    segs = {id(s): s for ctx in holders for s in ctx}
    return [p for s in segs.values() for p in s.pages]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["new", "grow", "fork", "end", "join", "preempt"]), st.integers(0, 50)), max_size=80
    ),
    st.integers(1, 4),
)
def test_random_operations_never_leak_or_double_free(ops, page_size):
    """Mirror the engine's reference protocol: a branch holds its whole context; a block holds its
    prefix and finished steps from fork to join."""
    pool = KVPool(1, 1, 2, num_pages=24, page_size=page_size)
    mains: list[list[Segment]] = []  # contexts of main-line branches (last segment = the one it writes)
    forks: list[tuple[list[Segment], list[list[Segment]], list[Segment]]] = []  # prefix, live steps, ended
    for op, n in ops:
        steps = [k for f in forks for k in f[1]]
        if op == "new":
            seg = Segment()
            pool.acquire([seg])
            mains.append([seg])
        elif op == "grow" and mains + steps:
            ctx = (mains + steps)[n % len(mains + steps)]
            try:
                slots = pool.append(ctx[-1], n % 7 + 1)
            except PoolFull:
                continue
            assert len(set(slots)) == len(slots)
        elif op == "fork" and mains:
            parent = mains.pop(n % len(mains))
            kids = [parent + [Segment()] for _ in range(n % 3 + 1)]
            for k in kids:
                pool.acquire(k)
            pool.acquire(parent + [k[-1] for k in kids])  # the block's hold
            pool.release(parent)  # the parent branch retires
            forks.append((parent, kids, []))
        elif op == "end" and forks:
            prefix, kids, ended = forks[n % len(forks)]
            if kids:
                k = kids.pop(0)
                pool.release(k)
                ended.append(k[-1])
        elif op == "join" and forks:
            i = n % len(forks)
            prefix, kids, ended = forks[i]
            if not kids:
                forks.pop(i)
                joined = prefix + ended + [Segment()]
                pool.acquire(joined)
                pool.release(prefix + ended)
                mains.append(joined)
        elif op == "preempt" and mains:
            pool.release(mains.pop(n % len(mains)))
        pool.check()
        holders = (
            mains + [k for f in forks for k in f[1]] + [f[0] + [s for k in f[1] for s in k[-1:]] + f[2] for f in forks]
        )
        held = owned(pool, holders)
        assert len(held) == len(set(held)) and not set(held) & set(pool.free)
        assert len(held) + pool.free_pages == pool.num_pages
    for prefix, kids, ended in forks:  # finish everything
        for k in kids:
            pool.release(k)
        pool.release(prefix + [k[-1] for k in kids] + ended)
    for ctx in mains:
        pool.release(ctx)
    pool.check()
    assert pool.free_pages == pool.num_pages and not pool.live
    with pytest.raises(RuntimeError):
        pool.release([Segment(refs=0)])


@pytest.fixture(scope="module")
def engines():
    tok = make_tokenizer()
    add_npr_tokens(tok)
    model = bias_tags(make_model("qwen3", len(tok), seed=1), tok, 4.0)
    return tok, LLM(model, tok, num_pages=2048, page_size=4), model


@settings(max_examples=12, deadline=None)
@given(st.integers(12, 60), st.sampled_from([1, 2, 4, 8]), st.integers(1, 6), st.integers(0, 10**6))
def test_any_pool_size_gives_the_large_pool_tokens(engines, num_pages, page_size, n, seed):
    tok, big, model = engines
    prompts = ["the plan is", "x + y = z so", "Let us try small cases first"] * 2
    sp = [SamplingParams(max_tokens=50, seed=seed + i) for i in range(n)]
    ref = big.generate(prompts[:n], sp)
    small = LLM(model, tok, num_pages=num_pages, page_size=page_size)
    got = small.generate(prompts[:n], sp)
    for a, b in zip(ref, got):
        if b.finish_reason == "aborted":  # one request alone did not fit: said so, nothing leaked
            assert "KV pool" in b.error
            continue
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    small.pool.check()
    assert small.pool.free_pages == small.pool.num_pages and not small.pool.live


@settings(max_examples=10, deadline=None)
@given(
    st.integers(2, 16), st.integers(0, 48), st.integers(8, 80), st.sampled_from([1, 2, 4, 8]),
    st.lists(st.integers(0, 30), min_size=2, max_size=6), st.integers(0, 40), st.integers(0, 10**6),
)  # fmt: skip
def test_any_schedule_gives_the_large_pool_tokens(
    engines, seqs, extra_tokens, num_pages, page_size, arrivals, kill, seed
):
    """Requests arriving at random steps into an engine with random limits (live branches, tokens
    per step, pages: forks preempt, prompts prefill in chunks) while one is aborted decode what
    the large pool decodes for the others, to the token and finish reason, and leave every page
    and context row free. A request's tokens depend on its seed only, not on when it came in or
    what shared its steps."""
    tok, big, model = engines
    prompts = ["the plan is", "x + y = z so", "Let us try small cases first " * 3, "1: 2: 3:"]
    n = len(arrivals)
    sp = [SamplingParams(max_tokens=60 + 20 * i, max_path_tokens=50 if i % 3 == 2 else None, seed=seed + i,
                         mode="sequential" if i % 4 == 3 else "parallel") for i in range(n)]  # fmt: skip
    ref = big.generate([prompts[i % 4] for i in range(n)], sp)
    small = LLM(model, tok, num_pages=num_pages, page_size=page_size, max_num_seqs=seqs,
                max_batch_tokens=seqs + extra_tokens)  # fmt: skip
    for i, got in enumerate(staggered(small, [prompts[i % 4] for i in range(n)], sp, arrivals, seed % n, kill)):
        if got is None:  # the one aborted
            continue
        if got.finish_reason == "aborted":  # the pool or max_num_seqs cannot hold it alone: said so
            assert "KV pool" in got.error or "max_num_seqs" in got.error
            continue
        assert (got.token_ids, got.finish_reason) == (ref[i].token_ids, ref[i].finish_reason)
        assert got.logprobs == pytest.approx(ref[i].logprobs, abs=1e-4)
    small.pool.check()
    assert small.pool.free_pages == small.pool.num_pages and not small.pool.live
    assert len(small.table.free) == small.table.rows


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 9), st.integers(1, 9)), min_size=1, max_size=6),
    st.integers(1, 4),
    st.booleans(),
)
def test_reserve_all_is_reserve_of_each_or_nothing(work, page_size, decode):
    """The engine's per-step reservation (`reserve_all`, or `reserve_each` of one token per segment,
    a decode step's): the same pages as one `reserve` per segment in order when they all fit; when
    they do not, False and no segment or free page touched."""
    if decode:
        work = [(filled, 1) for filled, _ in work]
    pools = [KVPool(1, 1, 2, num_pages=8, page_size=page_size) for _ in range(2)]
    segs = [[Segment() for _ in work] for _ in pools]
    for pool, ss in zip(pools, segs):
        for s, (filled, _) in zip(ss, work):
            pool.acquire([s])
            if filled <= len(pool.free) * page_size:
                pool.reserve(s, filled)
    before = [(list(s.pages), s.length) for s in segs[0]], list(pools[0].free)
    need = sum(pools[1].pages_needed(s, n) for s, (_, n) in zip(segs[1], work))
    if decode:
        fits = pools[0].reserve_each(segs[0])
    else:
        fits = pools[0].reserve_all([(s, n) for s, (_, n) in zip(segs[0], work)])
    assert fits == (need <= len(pools[1].free))
    if not fits:
        assert ([(s.pages, s.length) for s in segs[0]], pools[0].free) == before
        return
    for s, (_, n) in zip(segs[1], work):
        pools[1].reserve(s, n)
    assert [(s.pages, s.length) for s in segs[0]] == [(s.pages, s.length) for s in segs[1]]
    assert pools[0].free == pools[1].free


def test_staging_buffers_stay_within_their_share_of_the_pool():
    """Staged decode contexts take at most STAGE_SHARE of the pool's memory, all buckets' copies
    together (None past it), are kept from one call to the next while they fit, and go with the
    pool's memory when it sleeps."""
    from npr.engine.kv_pool import STAGE_SHARE

    pool = KVPool(2, 2, 4, num_pages=16, page_size=4)  # 64 slots; a quarter holds 16 per layer
    most = int(STAGE_SHARE * pool.capacity)
    k, v = pool.staging_buffers(0, 2, most // 4)
    assert k.shape == v.shape == (2, 2, most // 4, 2, 4) and k.data_ptr() != v.data_ptr()
    assert pool.staging_buffers(0, 3, 2)[0].data_ptr() == k.data_ptr()  # smaller: the same memory
    assert pool.staging_buffers(1, 1, most // 2 + 1) is None  # with bucket 0's copy: past the share
    assert pool.staging_buffers(1, 1, most // 2)[0].shape == (2, 1, most // 2, 2, 4)
    assert pool.staging_buffers(2, 1, most + 1) is None
    pool.sleep()
    assert pool.staging_buffers(0, 1, 1) is None
    pool.wake()
    assert pool.staging_buffers(0, 1, 1)[0].shape == (2, 1, 1, 2, 4)
