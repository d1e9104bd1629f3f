"""`npr serve`: an OpenAI-compatible HTTP server for parallel reasoners, and the live tree page.

Endpoints follow the convention of vLLM's and SGLang's servers: `GET /v1/models`,
`POST /v1/completions` (the prompt as given) and `POST /v1/chat/completions` (chat template,
and the NPR instruction added to the last user turn unless `"npr_instruction": false`), both
with `stream: true` as server-sent events ending in `data: [DONE]`. NPR extras ride in an `npr`
field: per choice the blocks with their step texts, branches, critical-path tokens and the
engine's finish reason; per streamed chunk the new text of each branch (`deltas`). Bad input is refused
with HTTP 400 and an OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from npr.engine import SamplingParams
from npr.engine.params import BUDGET_STOPS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, MODES, layout_texts
from npr.engine.request import Completion
from npr.serve.loop import Delta, Done, EngineLoop

ROLES = ("system", "user", "assistant")
MAX_STOP = 8


@dataclass
class ServeConfig:
    model_name: str
    mode: str = "parallel"  # default decoding when a request names none
    task: str = "math"  # whose NPR instruction chat requests get
    instruction: str | None = None  # a prompt file's instruction instead of the task's
    layout: str = "canonical"
    max_tokens: int = 1024  # default budget when a request gives none
    max_tokens_limit: int = 32768  # refuse requests asking for more
    max_n: int = 16
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P

    def __post_init__(self):  # refuse a bad setting at start-up, not on the first request
        from npr.tasks import get_task

        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        get_task(self.task)
        layout_texts(self.layout)
        if self.max_n < 1 or not 1 <= self.max_tokens <= self.max_tokens_limit:
            raise ValueError(
                f"need max_n >= 1 and 1 <= max_tokens <= max_tokens_limit, got max_n={self.max_n}, "
                f"max_tokens={self.max_tokens}, max_tokens_limit={self.max_tokens_limit}"
            )


class BadRequest(ValueError):
    """Refused with HTTP 400 (or `status`); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error", code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def client_error(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    """A 4xx answer in OpenAI's error shape."""
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return JSONResponse(error_body(message, param, kind, code), status_code=status)


# OpenAI parameters this server does not implement, with their neutral values: a request that sets
# one to anything else is refused by name, not answered as if it had been honoured.
UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


def refuse_unsupported(body: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise BadRequest(f"'{name}' is not supported by this server (got {body[name]!r})", name)


# ---- request parsing --------------------------------------------------------------------------


def _number(body: dict, name: str, default, lo, hi, kind=int):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return kind(value)


def sampling(body: dict, cfg: ServeConfig, vocab: int) -> list[SamplingParams]:
    """One SamplingParams per choice (`n`); seeds seed, seed+1, ... when a seed is given."""
    n = _number(body, "n", 1, 1, cfg.max_n)
    budget = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": budget}, "max_tokens", cfg.max_tokens, 1, cfg.max_tokens_limit)
    path = _number(body, "max_path_tokens", None, 1, cfg.max_tokens_limit)
    temperature = _number(body, "temperature", cfg.temperature, 0.0, 2.0, float)
    top_p = _number(body, "top_p", cfg.top_p, 0.0, 1.0, float)
    if top_p == 0:
        raise BadRequest("'top_p' must be in (0, 1]", "top_p")
    top_k = _number(body, "top_k", 0, -1, vocab)
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise BadRequest(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    mode = body.get("mode", cfg.mode)
    if mode not in MODES:
        raise BadRequest(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    return [
        SamplingParams(
            mode=mode,
            temperature=temperature,
            top_p=top_p,
            top_k=max(top_k, 0),
            max_tokens=max_tokens,
            max_path_tokens=path,
            seed=None if seed is None else seed + i,
            stop=list(stop),
            **layout_texts(cfg.layout),
        )  # fmt: skip
        for i in range(n)
    ]


def completion_prompt(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < len(tokenizer) for t in prompt):
            raise BadRequest(f"'prompt' holds token ids outside the vocabulary [0, {len(tokenizer)})", "prompt")
        ids = list(prompt)
    elif prompt is None:
        raise BadRequest("missing field 'prompt'", "prompt")
    else:
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt; use n for samples)", "prompt")
    if not ids:
        raise BadRequest("'prompt' is empty", "prompt")
    return ids


def chat_prompt(body: dict, tokenizer, cfg: ServeConfig) -> list[int]:
    from npr.prompts import chat_ids
    from npr.tasks import user_message

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}]: 'role' must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
                raise BadRequest(f"messages[{i}]: only text content parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}]: 'content' must be a string", f"messages[{i}].content")
        turns.append({"role": m["role"], "content": content})
    add = body.get("npr_instruction", True)
    if not isinstance(add, bool):
        raise BadRequest("'npr_instruction' must be true or false", "npr_instruction")
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    if add and users:
        last = turns[users[-1]]
        record = {"problem": last["content"], "grader": cfg.task, "instruction": cfg.instruction}
        last["content"] = user_message(record)  # the NPR format in both modes: "sequential" is how it decodes
    from jinja2 import TemplateError

    try:
        return chat_ids(tokenizer, turns)
    except TemplateError as e:  # the model's template refuses these turns (no user turn, roles not alternating)
        raise BadRequest(f"the model's chat template refused these messages: {e}", "messages") from None


# ---- responses --------------------------------------------------------------------------------


def finish_reason(c: Completion) -> str:
    """OpenAI's reason; the engine's own (path_length, invalid_schema, ...) is in the npr extras."""
    return "length" if c.finish_reason in BUDGET_STOPS else "stop"


def npr_extras(c: Completion, decode) -> dict:
    return {
        "finish_reason": c.finish_reason,
        "error": c.error,
        "total_tokens": c.stats["total_tokens"],
        "critical_path_tokens": c.stats["critical_path_tokens"],
        "branches": c.stats["branches"],
        "parallel_blocks": c.stats["parallel_blocks"],
        "wall_time": round(c.stats["wall_time"], 4),
        "blocks": [
            {"plans": b["plans"], "steps": [decode(c.token_ids[s:e]) for s, e in b["branches"]]} for b in c.blocks
        ],
    }


def answer_text(c: Completion, decode, stops: list[str]) -> str:
    """The text a client gets: the canonical text, cut before the stop string that ended it
    (OpenAI's and vLLM's servers return no stop string). The engine checks stop strings in the
    decoded last 16 tokens of the main line, so the match is sought there only: a stop string
    inside an earlier step did not stop anything."""
    text = decode(c.token_ids)
    if c.finish_reason != "stop" or not stops:
        return text
    start = max(0, len(text) - len(decode(c.token_ids[-16:])))
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else text


def held_back(stops: list[str]) -> int:
    """Characters a stream keeps back while a request with stop strings decodes, so a stop string
    (and the rest of the token that ends it) is never sent before the request knows it stopped."""
    return max(map(len, stops)) + 32 if stops else 0


def usage(prompt: list[int], completions: list[Completion]) -> dict:
    gen = sum(c.stats["total_tokens"] for c in completions)  # every branch's tokens
    return {"prompt_tokens": len(prompt), "completion_tokens": gen, "total_tokens": len(prompt) + gen}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- the app ----------------------------------------------------------------------------------


def create_app(engine: EngineLoop, cfg: ServeConfig):
    @asynccontextmanager
    async def lifespan(_):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="npr serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    tok = engine.llm.tokenizer
    decode = engine.decode
    page = resources.files("npr.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(BadRequest)
    async def _bad(_, e: BadRequest):
        return client_error(str(e), e.status, e.param, e.code)

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        return client_error(str(e.detail), e.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/v1/models")
    async def models():
        card = {"id": cfg.model_name, "object": "model", "created": int(time.time()), "owned_by": "npr"}
        return {"object": "list", "data": [dict(card, max_model_len=cfg.max_tokens_limit)]}

    async def parse(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"invalid JSON body: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model")
        if model is None:
            raise BadRequest("missing field 'model'", "model")
        if model != cfg.model_name:
            message = f"model {model!r} is not served here; this server has {cfg.model_name!r}"
            raise BadRequest(message, "model", status=404, code="model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise BadRequest("'stream' must be true or false", "stream")
        refuse_unsupported(body)
        return body

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request)
        params = sampling(body, cfg, len(tok))
        return await respond(request, body, completion_prompt(body, tok), params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request)
        params = sampling(body, cfg, len(tok))
        return await respond(request, body, chat_prompt(body, tok, cfg), params, chat=True)

    async def respond(request, body: dict, prompt: list[int], params: list[SamplingParams], chat: bool):
        if len(prompt) > cfg.max_tokens_limit:
            raise BadRequest(f"the prompt has {len(prompt)} tokens; this server takes at most {cfg.max_tokens_limit}")
        capacity = engine.llm.pool.capacity
        if len(prompt) + 1 > capacity:  # the engine would abort it at admission
            raise BadRequest(f"the prompt has {len(prompt)} tokens; this server's KV cache holds {capacity}", "prompt")
        sink: asyncio.Queue = asyncio.Queue()
        try:
            ids = await engine.submit(prompt, params, sink, stream=body.get("stream") is True)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": cfg.model_name,
        }
        stops = params[0].stop  # the same for every choice
        if body.get("stream"):
            options = body.get("stream_options") or {}
            with_usage = isinstance(options, dict) and options.get("include_usage") is True
            return StreamingResponse(
                stream(head, prompt, ids, sink, chat, with_usage, stops), media_type="text/event-stream"
            )
        return await whole(request, head, prompt, ids, sink, chat, stops)

    async def whole(request, head: dict, prompt: list[int], ids: list[int], sink: asyncio.Queue, chat: bool,
                    stops: list[str]):  # fmt: skip
        done: dict[int, Done] = {}
        try:
            while len(done) < len(ids):
                try:
                    ev = await asyncio.wait_for(sink.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    # the queue is silent until a choice is done (no deltas for a whole answer), so
                    # this runs every half second while it decodes
                    if await request.is_disconnected():  # nobody will read the answer: free its pages now
                        engine.cancel(ids)
                        return client_error("client disconnected", 499)
                    continue
                if isinstance(ev, Done):
                    done[ev.choice] = ev
        except asyncio.CancelledError:
            engine.cancel(ids)
            raise
        failed = [d.error for d in done.values() if d.completion is None]
        if failed:
            return JSONResponse(error_body(failed[0], kind="server_error"), status_code=500)
        comps = [done[i].completion for i in range(len(ids))]
        aborted = [c.error for c in comps if c.finish_reason == "aborted"]
        if aborted:  # the engine could not hold it (pages, max_num_seqs): no answer, not a normal stop
            return JSONResponse(error_body(aborted[0] or "aborted", kind="server_error"), status_code=503)
        choices = []
        for i, c in enumerate(comps):
            text = answer_text(c, decode, stops)
            body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
            choices.append({"index": i, **body, "finish_reason": finish_reason(c), "npr": npr_extras(c, decode)})
        obj = "chat.completion" if chat else "text_completion"
        return {**head, "object": obj, "choices": choices, "usage": usage(prompt, comps)}

    async def stream(head, prompt, ids, sink: asyncio.Queue, chat: bool, with_usage: bool, stops: list[str]):
        obj = "chat.completion.chunk" if chat else "text_completion"
        comps: dict[int, Completion] = {}
        ended, hold = 0, held_back(stops)
        sent, pending = [""] * len(ids), [""] * len(ids)  # per choice: canonical text out, and held back

        def chunk(choice: int, text: str | None, finish: str | None, npr: dict | None) -> str:
            if chat:
                part = {"delta": {} if text is None else {"content": text}}
            else:
                part = {"text": text or "", "logprobs": None}
            c = {"index": choice, **part, "finish_reason": finish}
            if npr is not None:
                c["npr"] = npr
            return sse({**head, "object": obj, "choices": [c]})

        try:
            if chat:
                for i in range(len(ids)):
                    role = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield sse({**head, "object": obj, "choices": [role]})
            while ended < len(ids):
                ev = await sink.get()
                if isinstance(ev, Delta):
                    text, i = pending[ev.choice] + ev.text, ev.choice
                    cut = max(0, len(text) - hold)
                    sent[i], pending[i] = sent[i] + text[:cut], text[cut:]
                    yield chunk(i, text[:cut], None, {"deltas": ev.deltas})
                    continue
                ended += 1
                if ev.completion is None or ev.completion.finish_reason == "aborted":
                    error = ev.error if ev.completion is None else ev.completion.error
                    yield sse(error_body(error or "engine error", kind="server_error"))
                    continue
                comps[ev.choice] = ev.completion
                whole_text = answer_text(ev.completion, decode, stops)
                if whole_text.startswith(sent[ev.choice]) and len(whole_text) > len(sent[ev.choice]):
                    yield chunk(ev.choice, whole_text[len(sent[ev.choice]) :], None, None)  # what was held back
                yield chunk(ev.choice, None, finish_reason(ev.completion), npr_extras(ev.completion, decode))
            if with_usage:
                yield sse({**head, "object": obj, "choices": [], "usage": usage(prompt, list(comps.values()))})
            yield "data: [DONE]\n\n"
        finally:
            if ended < len(ids):  # the client went away: free its pages now
                engine.cancel(ids)

    return app
