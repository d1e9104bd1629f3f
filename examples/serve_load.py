"""Load figures for `npr serve`: tokens/s and time to first token at 1, 8 and 32 concurrent clients.

    python examples/serve_load.py                       # runs/demo/stage3 if `make demo` made it,
                                                        # else a random tiny Qwen3
    python examples/serve_load.py --model DIR --clients 1 8 32 --requests 2

It starts `npr serve` as a user would (a subprocess on a free local port), then each client sends
`--requests` streamed chat requests one after another. Tokens count every branch (the `usage`
the server reports); time to first token is until the first chunk carrying text.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["use 3 5 4 to make 23", "use 6 2 9 to make 21", "use 7 3 8 to make 29", "use 2 10 5 to make 45"]


def random_tiny(folder: Path) -> Path:
    from npr.bench import random_model, word_tokenizer
    from npr.progress import quiet_libraries

    quiet_libraries()

    model = random_model("tiny")
    tok = word_tokenizer(model.config.vocab_size)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client, model: str, question: str, max_tokens: int, seed: int) -> tuple[float, int, int]:
    """(time to first token, tokens over all branches, critical-path tokens) of one streamed request."""
    t0, first, tokens, path = time.perf_counter(), None, 0, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, seed=seed, stream=True
    )
    async for chunk in stream:
        for c in chunk.choices:
            npr = (c.model_extra or {}).get("npr") or {}
            if first is None and (c.delta.content or npr.get("deltas")):
                first = time.perf_counter() - t0
            if c.finish_reason:
                tokens, path = npr["total_tokens"], npr["critical_path_tokens"]
    return first if first is not None else time.perf_counter() - t0, tokens, path


async def level(client, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    async def worker(w: int):
        return [await one(client, model, QUESTIONS[(w + r) % 4], max_tokens, 1000 * w + r) for r in range(requests)]

    t0 = time.perf_counter()
    results = [x for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for x in rs]
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p90_ms": 1000 * ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "parallelism": tokens / max(1, sum(r[2] for r in results)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: runs/demo/stage3, else a random tiny Qwen3)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    model = args.model or (str(ROOT / "runs/demo/stage3") if (ROOT / "runs/demo/stage3").is_dir() else None)
    task = "countdown"
    if model is None:
        model, task = str(random_tiny(Path(tmp.name) / "tiny")), "math"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "npr", "serve", "--model", model, "--port", str(port), "--task", task]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        asyncio.run(measure(server, port, model, args))
    finally:
        server.terminate()
        server.wait(timeout=30)
        tmp.cleanup()


async def measure(server, port: int, model: str, args) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600)
    name = await wait_ready(client, server)
    print(f"npr serve --model {model}  ({args.threads} torch threads, max_tokens {args.max_tokens})")
    print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>7} "
          f"{'TTFT p50 ms':>11} {'TTFT p90 ms':>11} {'tok/path':>8}")  # fmt: skip
    for c in args.clients:
        r = await level(client, name, c, args.requests, args.max_tokens)
        print(f"{r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['wall_s']:>7.2f} "
              f"{r['tokens_per_s']:>7.1f} {r['ttft_p50_ms']:>11.0f} {r['ttft_p90_ms']:>11.0f} "
              f"{r['parallelism']:>8.2f}")  # fmt: skip
    await client.close()


async def wait_ready(client, server, timeout: float = 300) -> str:
    import openai

    deadline = time.time() + timeout
    while True:
        try:
            return (await client.models.list()).data[0].id
        except openai.APIConnectionError:
            if server.poll() is not None:
                raise SystemExit(f"npr serve exited:\n{server.stderr.read()}") from None
            if time.time() > deadline:
                raise SystemExit("npr serve did not start in time") from None
            await asyncio.sleep(0.3)


if __name__ == "__main__":
    main()
