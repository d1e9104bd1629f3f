"""`npr serve` driven by the official `openai` client on a tiny model, over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package is built on
import pytest
from conftest import bias_tags, make_model, make_tokenizer

from npr.engine import LLM
from npr.serve import EngineLoop, ServeConfig, create_app
from npr.tokens import add_npr_tokens

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

NAME = "tiny-npr"
PROMPTS = ["the plan is", "x + y = z so", "Let us try small cases first", "1: 2: 3:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn on a free local port, in a thread, for the module's tests."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served():
    tok = make_tokenizer()
    add_npr_tokens(tok)
    model = bias_tags(make_model("qwen3", len(tok)), tok, 4.0)
    llm = LLM(model, tok, num_pages=1024, page_size=4)
    engine = EngineLoop(llm)
    server = Server(create_app(engine, ServeConfig(NAME, max_tokens=64, max_tokens_limit=4096, max_n=8)))
    yield server, engine
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def extra(obj, name="npr"):
    return (obj.model_extra or {}).get(name)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_streamed_equals_whole_and_reports_the_tree(client):
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=120, temperature=0, extra_body={"max_path_tokens": 80})
    whole = client.completions.create(**kw)
    choice = whole.choices[0]
    npr = extra(choice)
    assert npr["total_tokens"] == whole.usage.completion_tokens > 0
    assert npr["critical_path_tokens"] <= 80 and npr["total_tokens"] <= 120
    streamed = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    assert streamed[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_stream_follows_every_branch(client):
    """Plain clients get the canonical text; the per-branch deltas rebuild each step's text."""
    found = False
    for seed in range(6):
        kw = dict(model=NAME, messages=[{"role": "user", "content": PROMPTS[seed % 4]}], max_tokens=160, seed=seed)
        whole = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        runs: dict[tuple, str] = {}
        for c in chunks:
            for d in (extra(c.choices[0]) or {}).get("deltas", []):
                runs[(d["run"], d["block"], d["step"])] = runs.get((d["run"], d["block"], d["step"]), "") + d["text"]
        blocks = extra(whole.choices[0])["blocks"]
        for b, block in enumerate(blocks):
            steps = [t for (_, blk, step), t in sorted(runs.items()) if blk == b and step >= 0]
            assert steps == block["steps"]
            found |= len(block["steps"]) >= 2
    assert found, "no parallel block in six samples: the test model no longer forks"


def test_n_choices_and_usage_counts_every_token(client):
    r = client.completions.create(model=NAME, prompt=PROMPTS[1], n=3, max_tokens=60, seed=5, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(extra(c)["total_tokens"] for c in r.choices)
    assert len({c.text for c in r.choices}) > 1  # seeds 5, 6, 7
    s = list(client.completions.create(model=NAME, prompt=PROMPTS[1], n=3, max_tokens=60, seed=5, stream=True))
    for i in range(3):
        assert "".join(c.choices[0].text for c in s if c.choices and c.choices[0].index == i) == r.choices[i].text


def test_sixteen_concurrent_clients_get_their_own_answers(client):
    def ask(i):
        return client.completions.create(model=NAME, prompt=PROMPTS[i % 4], max_tokens=48, seed=100 + i).choices[0]

    alone = [ask(i).text for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = [c.text for c in pool.map(ask, range(16))]
    assert together == alone


def test_a_cancelled_stream_frees_its_pages(served):
    server, engine = served
    pool = engine.llm.pool
    wait_idle(engine)
    start, cancelled = pool.free_pages, engine.cancelled
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 3000, "stream": True, "seed": 3, "temperature": 1.0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        seen = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                seen.append(json.loads(line[5:]))
            if len(seen) >= 3:
                break  # hang up mid-answer
    assert all(c["choices"][0]["finish_reason"] is None for c in seen)
    wait_idle(engine)
    assert engine.cancelled == cancelled + 1
    assert pool.free_pages == start
    assert not engine.llm.scheduler.running and not engine.streams


@pytest.mark.parametrize("n", [1, 8])
def test_a_client_that_gives_up_on_a_whole_answer_frees_its_pages(served, n):
    """Cancelled while it decodes, not when it ends: with n = 1 nothing is preempted, so the
    engine's queue is never silent by chance (a whole answer must not get per-step deltas)."""
    server, engine = served
    wait_idle(engine)
    start, cancelled, steps = engine.llm.pool.free_pages, engine.cancelled, engine.steps
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 4000, "n": n, "seed": 4, "temperature": 1.0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    wait_idle(engine)
    assert engine.cancelled > cancelled
    assert engine.llm.pool.free_pages == start
    assert engine.steps - steps < 4000  # it never ran to its budget


def wait_idle(engine, timeout=60):
    deadline = time.time() + timeout
    while engine.streams or engine.llm.has_work() or not engine.inbox.empty():
        assert time.time() < deadline, "engine did not go idle"
        time.sleep(0.05)
    time.sleep(0.1)


HI = [{"role": "user", "content": "hi"}]
BAD = [
    ("not json", None, None),
    ({"prompt": "hi"}, "model", None),
    ({"model": NAME}, "prompt", None),
    ({"model": NAME, "prompt": "hi", "max_tokens": -5}, "max_tokens", None),
    ({"model": NAME, "prompt": "hi", "max_tokens": 10**9}, "max_tokens", None),
    ({"model": NAME, "prompt": "hi", "n": 1000}, "n", None),
    ({"model": NAME, "prompt": "hi", "temperature": "hot"}, "temperature", None),
    ({"model": NAME, "prompt": "hi", "stream": "yes"}, "stream", None),
    ({"model": NAME, "prompt": [10**9]}, "prompt", None),
    ({"model": NAME, "messages": "hi"}, "messages", "chat"),
    ({"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "chat"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "mode": "diagonal"}, "mode", "chat"),
    ({"model": NAME, "prompt": "hi", "logprobs": 2}, "logprobs", None),
    ({"model": NAME, "prompt": "hi", "presence_penalty": 0.5}, "presence_penalty", None),
    ({"model": NAME, "messages": HI, "tools": [{"type": "function"}]}, "tools", "chat"),
    ({"model": NAME, "messages": HI, "response_format": {"type": "json_object"}}, "response_format", "chat"),
]


@pytest.mark.parametrize("body,param,route", BAD)
def test_bad_input_is_a_400_and_the_server_keeps_serving(served, client, body, param, route):
    url = served[0].url + ("/v1/chat/completions" if route == "chat" else "/v1/completions")
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url, content=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=4).choices[0].finish_reason


def test_unknown_model_is_a_404_and_neutral_unsupported_parameters_pass(served, client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(served[0].url + "/v1/completions", json={"model": "gpt-5", "prompt": "hi"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # what clients send by default (no penalties, no logprobs, plain text) is not refused
    neutral = dict(presence_penalty=0, frequency_penalty=0.0, logprobs=False, response_format={"type": "text"})
    msgs = [{"role": "user", "content": "hi"}]
    assert client.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, **neutral).choices[0].finish_reason


def test_page_is_served(served):
    r = httpx.get(served[0].url + "/", timeout=30)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/v1/chat/completions" in r.text and "Native Parallel Reasoner" in r.text


def test_chat_prompt_takes_the_prompt_file_instruction_unless_turned_off(served):
    from npr.serve.app import chat_prompt

    tok = served[1].llm.tokenizer
    cfg = ServeConfig(NAME, instruction="Think in branches about: {problem}")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 2"}]
    text = tok.decode(chat_prompt({"messages": msgs}, tok, cfg))
    assert "Think in branches about: 2 + 2" in text and "be brief" in text
    plain = tok.decode(chat_prompt({"messages": msgs, "npr_instruction": False}, tok, cfg))
    assert "Think in branches" not in plain and plain.endswith("2 + 2")


def test_npr_serve_command(tmp_path):
    """The CLI as a user starts it: a model folder and a prompt file, on 127.0.0.1."""
    import subprocess
    import sys

    tok = make_tokenizer()
    add_npr_tokens(tok)
    bias_tags(make_model("qwen3", len(tok)), tok, 4.0).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    instruction = "Answer with <guideline><plan>1: a plan</plan></guideline><step>1: a step</step> {problem}"
    (tmp_path / "prompt.txt").write_text(instruction, encoding="utf-8")
    port = free_port()
    args = [sys.executable, "-m", "npr", "serve", "--model", str(tmp_path / "m"), "--port", str(port)]
    bad = subprocess.run([*args, "--layout", "diagonal"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown layout" in bad.stderr
    proc = subprocess.Popen(
        [*args, "--layout", "paper", "--prompt-file", str(tmp_path / "prompt.txt")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.time() + 120
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["m"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "slow"
                time.sleep(0.3)
        q = PROMPTS[0]
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], max_tokens=40, seed=1)
        assert r.usage.prompt_tokens == len(tok.encode(instruction.replace("{problem}", q)))  # the prompt file's
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_paper_layout_forces_its_fork_text(served):
    llm = served[1].llm
    engine = EngineLoop(LLM(llm.model, llm.tokenizer, num_pages=512, page_size=4))
    server = Server(create_app(engine, ServeConfig(NAME, layout="paper", max_tokens=120)))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        steps = []
        for seed in range(12):
            r = client.completions.create(model=NAME, prompt=PROMPTS[seed % 4], seed=seed, top_p=1.0)
            steps += [s for b in extra(r.choices[0])["blocks"] for s in b["steps"]]
        assert steps and all(s.startswith("<step>\n") for s in steps)
    finally:
        server.stop()


def test_served_text_keeps_tags_registered_as_special_and_drops_end_of_turn():
    from npr.serve.loop import text_decoder
    from npr.tags import TAGS

    tok = make_tokenizer()
    tok.add_tokens(list(TAGS), special_tokens=True)  # as some checkpoints made elsewhere have them
    ids = tok.encode("<guideline><plan>1: a</plan></guideline>") + [tok.eos_token_id]
    assert text_decoder(tok)(ids) == "<guideline><plan>1: a</plan></guideline>"


def test_what_the_engine_cannot_hold_is_an_error_not_a_stop(served):
    """A prompt larger than the KV cache is a 400; a request the pool cannot hold alone ends
    "aborted" in the engine, which a client gets as a 503 (an error event when streaming), never
    as an answer that stopped; a chat template that refuses the turns is a 400, not a crash."""
    import copy

    llm = served[1].llm
    tok = copy.deepcopy(llm.tokenizer)
    tok.chat_template = (
        "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('the last turn must be the user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    engine = EngineLoop(LLM(llm.model, tok, num_pages=8, page_size=4))  # 32 tokens of KV cache
    server = Server(create_app(engine, ServeConfig(NAME, max_tokens=200, max_tokens_limit=4096)))
    url = server.url + "/v1"
    try:
        r = httpx.post(url + "/completions", json={"model": NAME, "prompt": [5] * 40}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        body = {"model": NAME, "prompt": [5] * 8, "temperature": 0.0, "stop": ["never"]}
        r = httpx.post(url + "/completions", json=body, timeout=60)
        assert r.status_code == 503 and "KV pool" in r.json()["error"]["message"], r.text
        with httpx.stream("POST", url + "/completions", json={**body, "stream": True}, timeout=60) as r:
            events = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
        assert events[-1] == "[DONE]" and "KV pool" in json.loads(events[-2])["error"]["message"]
        assert not any(json.loads(e).get("choices", [{}])[0].get("finish_reason") for e in events[:-1])
        chat = {"model": NAME, "messages": [{"role": "system", "content": "be brief"}]}
        r = httpx.post(url + "/chat/completions", json=chat, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert engine.llm.pool.free_pages == engine.llm.pool.num_pages
    finally:
        server.stop()
    with pytest.raises(ValueError, match="max_tokens"):
        ServeConfig(NAME, max_tokens=0)


def test_stop_strings_are_cut_from_the_answer_streamed_or_whole(served, client):
    """As OpenAI's and vLLM's servers do: the returned text ends before the stop string, and the
    stream (which holds back enough text to cut it) carries the same text."""
    from types import SimpleNamespace

    from npr.serve.app import answer_text

    def fake(ids, reason="stop"):
        return SimpleNamespace(token_ids=ids, finish_reason=reason)

    def decode(ids):
        return "".join(chr(97 + i) for i in ids)

    ids = list(range(20))  # "abcdefghijklmnopqrst": only the last 16 tokens are searched
    assert answer_text(fake(ids), decode, ["b", "rs", "q"]) == "abcdefghijklmnop"
    assert answer_text(fake(ids, "length"), decode, ["q"]) == decode(ids)  # a budget, not a stop
    for seed in range(20):
        body = dict(model=NAME, max_tokens=40, seed=seed, temperature=1.0, extra_body={"mode": "sequential"})
        free = client.completions.create(prompt=PROMPTS[0], **body).choices[0].text
        if len(free) > 12 and "<" not in free[:8]:
            break
    stop = free[4:7]
    whole = client.completions.create(prompt=PROMPTS[0], stop=[stop], **body).choices[0]
    assert whole.finish_reason == "stop" and whole.text == free[: free.find(stop)]
    chunks = client.completions.create(prompt=PROMPTS[0], stop=[stop], stream=True, **body)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
