"""One engine, many clients: the decode loop on its own thread, and per-request text streams.

Every HTTP request becomes engine requests added between steps, so all clients share one
continuous batch. After each step the loop turns new tokens into text deltas on the client's
asyncio queue: one delta per branch (run) for NPR-aware clients, and the canonical text
(main line, step 1, step 2, ..., takeaway) for plain clients — a run's text is released to the
canonical stream once every run before it is closed, so the concatenated stream equals the
finished completion's text.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from dataclasses import dataclass, field

from npr.engine import LLM, SamplingParams
from npr.engine.request import Completion, Request


class Detokenizer:
    """Incremental decoding: text of each new token, robust to tokens that only make sense together
    (byte-level pieces of one character, word pieces that change the spacing)."""

    def __init__(self, decode):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded each time
        self.read = 0  # tokens whose text is already out

    def push(self, new: list[int], final: bool = False) -> str:
        """Text the new tokens add; with `final`, everything still held back."""
        self.ids += new
        if len(self.ids) == self.read:
            return ""
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if not final and (after.endswith("\ufffd") or len(after) < len(before)):  # a character still incomplete
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


@dataclass(frozen=True)
class Delta:
    """New text of one request: `text` for the canonical stream, `deltas` per run."""

    choice: int
    text: str
    deltas: list[dict]  # {"run", "block", "step", "text"}; block is -1 and step -1 on the main line


@dataclass(frozen=True)
class Done:
    choice: int
    completion: Completion | None
    error: str | None = None


@dataclass(eq=False)
class _Stream:
    choice: int
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    canonical: Detokenizer
    stream: bool = True  # text deltas after each step; a whole answer gets only its `Done`
    frontier: int = 0  # the first run (index in req.runs) not yet wholly in the canonical stream
    before: int = 0  # canonical tokens of the runs before it
    runs: dict[int, Detokenizer] = field(default_factory=dict)  # per run: what its deltas have carried

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.sink.put_nowait, item)


class EngineLoop:
    """Owns the `LLM`; HTTP handlers talk to it through `submit` and `cancel` only."""

    def __init__(self, llm: LLM, decode=None):
        self.llm = llm
        self.decode = decode or text_decoder(llm.tokenizer)
        self.inbox: queue.Queue = queue.Queue()
        self.streams: dict[int, _Stream] = {}
        self.steps = 0
        self.cancelled = 0  # requests aborted while live
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="npr-engine", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake",))
        self._thread.join(timeout=30)

    async def submit(
        self, prompt: list[int], params: list[SamplingParams], sink: asyncio.Queue, stream: bool = True
    ) -> list[int]:
        """Add one engine request per params (the choices); events arrive on `sink`: text deltas
        after each step when `stream`, then a `Done` per choice. Returns their ids."""
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        self.inbox.put(("add", prompt, params, sink, loop, accepted, stream))
        return await accepted

    def cancel(self, request_ids: list[int]) -> None:
        """Abort requests whose client went away; their pages are freed before the next step."""
        self.inbox.put(("abort", list(request_ids)))

    # ---- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.llm.has_work())
            if not self.llm.has_work():
                continue
            try:
                self.llm.step()
            except Exception as e:  # noqa: BLE001 - a failed step must not leave clients hanging
                traceback.print_exc()
                self._fail_all(f"engine error: {type(e).__name__}: {e}")
                continue
            self.steps += 1
            self._publish()

    def _drain(self, block: bool) -> None:
        while True:
            try:
                msg = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if msg[0] == "add":
                _, prompt, params, sink, loop, accepted, stream = msg
                try:
                    ids = [self.llm.add_request(prompt, p) for p in params]
                except Exception as e:  # noqa: BLE001 - handed back to the HTTP handler
                    loop.call_soon_threadsafe(_settle, accepted, None, e)
                    continue
                for choice, rid in enumerate(ids):
                    self.streams[rid] = _Stream(choice, sink, loop, Detokenizer(self.decode), stream)
                loop.call_soon_threadsafe(_settle, accepted, ids, None)
            elif msg[0] == "abort":
                for rid in msg[1]:
                    self.streams.pop(rid, None)
                    self.cancelled += self.llm.abort(rid)

    def _publish(self) -> None:
        live = {r.id: r for r in self.llm.scheduler.running}
        for rid, s in list(self.streams.items()):
            req = live.get(rid) or self.llm.finished.get(rid)
            if req is None:
                continue  # still waiting for admission
            finished = req.finish_reason is not None
            if s.stream:
                delta = Delta(s.choice, _canonical(s, req, finished), _run_deltas(s, req, self.decode))
                if delta.text or delta.deltas:
                    s.put(delta)
            if finished:
                del self.streams[rid]
                s.put(Done(s.choice, self.llm.completion(rid)))

    def _fail_all(self, error: str) -> None:
        for rid, s in list(self.streams.items()):
            self.llm.abort(rid)
            self.llm.finished.pop(rid, None)
            s.put(Done(s.choice, None, error))
        self.streams.clear()


def text_decoder(tokenizer):
    """decode() that drops special tokens (end of turn, padding) but keeps the schema's tags, even
    for tokenizers that registered them as special."""
    from npr.tags import tag_ids

    hidden = set(tokenizer.all_special_ids) - set(tag_ids(tokenizer).values())
    return lambda ids: tokenizer.decode([t for t in ids if t not in hidden], skip_special_tokens=False)


def _settle(fut: asyncio.Future, value, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


def _run_deltas(s: _Stream, req: Request, decode) -> list[dict]:
    """The new text of every run that grew since the last step."""
    out = []
    for run in req.runs:
        det = s.runs.setdefault(run.index, Detokenizer(decode))
        toks = run.tokens[run.offset :]
        if len(toks) > len(det.ids):  # a preempted request decodes again: only tokens past what was sent
            text = det.push(toks[len(det.ids) :])
            if text:
                step = run.key[1] >= 0
                out.append({"run": run.index, "block": run.key[0] if step else -1, "step": run.key[1], "text": text})
    return out


def _canonical(s: _Stream, req: Request, finished: bool) -> str:
    """New canonical text: runs in creation order, each released once every run before it is
    closed (no live branch writes it and a later run exists). Only runs from the frontier on are
    read, so a step costs the new tokens, not the whole answer."""
    writing = {b.run.index for b in req.branches if not b.done}
    text = ""
    while s.frontier < len(req.runs):
        run = req.runs[s.frontier]
        toks = run.tokens[run.offset :]
        pushed = len(s.canonical.ids) - s.before
        if len(toks) > pushed:
            text += s.canonical.push(toks[pushed:])
        if not finished and (run.index in writing or s.frontier == len(req.runs) - 1):
            break
        s.before += len(toks)
        s.frontier += 1
    if finished:
        text += s.canonical.push([], final=True)
    return text
