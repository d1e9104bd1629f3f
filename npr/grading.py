"""Final-answer extraction and grading rules: math (math-verify) and multiple choice (tasks pick one).

Math equivalence runs math-verify (gold first) in a worker process with a wall-clock
timeout, so it works from any thread or process and a pathological answer (a tower of
exponents, deeply nested LaTeX) is killed and graded incorrect instead of hanging the
run. Model output is never evaluated as code.
"""

from __future__ import annotations

import atexit
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing import get_context

from npr.grammar import last_boxed

MAX_ANSWER_CHARS = 1000  # longer "answers" are not answers
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE)
_FBOX = re.compile(r"\\fbox\{")
_BOLD = re.compile(r"^(?:\*\*|__)|(?:\*\*|__)$")  # markdown bold around a stated answer: "is **42**"


def extract_answer(text: str) -> str | None:
    r"""The response's final answer.

    1. the content of the last `\boxed{...}` (braces nested), else of the last `\fbox{...}`;
    2. else the text after the last "answer is" / "answer:" up to the end of its sentence or line;
    3. else None.
    """
    boxed = last_boxed(text)
    if boxed is None and "\\fbox{" in text:
        boxed = last_boxed(_FBOX.sub(r"\\boxed{", text))
    if boxed is not None:
        return boxed.strip()
    hits = _ANSWER_IS.findall(text[-4000:])
    if hits:
        return _BOLD.sub("", hits[-1].strip()).strip().strip("$").strip()
    return None


# ---- math ----------------------------------------------------------------------------------


def _verify(pred: str, gold: str) -> bool:
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # our process timeout replaces theirs
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


class _Worker:
    """One grading process; replaced when a call times out."""

    def __init__(self):
        self.pool: ProcessPoolExecutor | None = None
        self.lock = threading.Lock()  # one call at a time: a timeout kills the pool under nobody else

    def run(self, fn, *args, timeout: float):
        with self.lock:
            return self._run(fn, *args, timeout=timeout)

    def _run(self, fn, *args, timeout: float):
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
            # the worker's start (an interpreter, the caller's main module, math-verify's imports:
            # seconds on a busy machine) must not count against the first answer's timeout
            self.pool.submit(_warm).result()
        future = self.pool.submit(fn, *args)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            self.kill()
            raise

    def kill(self):
        if self.pool is not None:
            for p in list(getattr(self.pool, "_processes", {}).values()):
                p.kill()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def _warm() -> bool:
    import math_verify  # noqa: F401

    return True


_WORKER = _Worker()
atexit.register(_WORKER.kill)


def math_equal(pred: str | None, gold: str, timeout: float = 10.0) -> bool:
    """Whether `pred` equals `gold` mathematically (math-verify, gold first); False on timeout."""
    if pred is None or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
        return False
    if pred.strip() == str(gold).strip():
        return True
    try:
        return bool(_WORKER.run(_verify, pred, str(gold), timeout=timeout))
    except FutureTimeout:
        return False
    except Exception:  # a parser crash on odd input is a wrong answer, not a failed run
        return False


# ---- multiple choice -----------------------------------------------------------------------

# a letter alone ("B", "b", "(B)", "B.") or before text ("(B) text", "B. text", "B) text", "B: text")
_LETTER = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])(?=[.):]|$))[.):]?(?:\s+(.*))?$", re.S)
_WRAP = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\{([^{}]*)\}")


def choice_of(answer: str | None, options: list[str]) -> str | None:
    """The option letter an extracted answer names, trying in turn: an option's exact text; a
    letter alone; an option's text in another case, where that names one option (options may
    differ only in case); a letter before some text. So an answer that starts like a letter
    ("A = 2, B = 3") names the option with that text, not "A"."""
    if not answer:
        return None
    a = answer
    while _WRAP.search(a):
        a = _WRAP.sub(r"\1", a)
    a = a.replace("**", "").replace("__", "").strip().strip("$").strip()
    norm, texts = _norm(a), [_norm(opt) for opt in options]
    if norm and norm in texts:
        return chr(ord("A") + texts.index(norm))
    m = _LETTER.match(a)
    letter = (m.group(1) or m.group(2)).upper() if m else None
    if letter and ord(letter) - ord("A") >= max(len(options), 1):
        letter = None
    if letter and not m.group(3):  # a letter alone
        return letter
    folded = [i for i, t in enumerate(texts) if norm and norm.lower() == t.lower()]
    if len(folded) == 1:
        return chr(ord("A") + folded[0])
    return letter  # a letter before some text, or None


def _norm(s: str) -> str:
    return re.sub(r"[\s$.]+", " ", s).strip()


def choice_correct(text: str, letter: str, options: list[str]) -> bool:
    return choice_of(extract_answer(text), options) == letter
