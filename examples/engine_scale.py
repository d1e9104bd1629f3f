"""Engine throughput as the work grows: branches and context (issue 14's table).

    python examples/engine_scale.py [--config tiny] [--hf]

Prints parallel / sequential engine tokens/s, HF `generate` tokens/s and speedup / ideal for
16, 64 and 256 concurrent branches with short prompts and 64 branches with 1,024-token prompts.
All figures come from one process, measured side by side; threads are pinned to 2 on CPU.
"""

from __future__ import annotations

import argparse

import torch

from npr.bench import bench_engine, random_model, word_tokenizer

CASES = [(16, 32), (64, 32), (256, 32), (64, 1024)]  # (branches, prompt tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--plans", type=int, default=4)
    ap.add_argument("--step-tokens", type=int, default=32)
    ap.add_argument("--hf", action="store_true", help="also time Hugging Face generate")
    ap.add_argument("--cases", default=None, help="e.g. 16x32,64x1024 (branches x prompt tokens)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(2)
    cases = CASES
    if args.cases:
        cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = random_model(args.config, dtype=dtype, device=dev)
    tok = word_tokenizer(model.config.vocab_size)
    cols = ["branches", "prompt", "step tokens", "parallel tok/s", "sequential tok/s", "HF generate tok/s"]
    print("| " + " | ".join(cols + ["speedup / ideal"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for branches, prompt in cases:
        r = bench_engine(
            model,
            tok,
            requests=branches // args.plans,
            plans=args.plans,
            step_tokens=args.step_tokens,
            blocks=1,
            prompt_tokens=prompt,
            hf_generate=args.hf,
        )
        hf = f"{r['hf_generate_tps']:,.0f}" if r["hf_generate_tps"] else "-"
        print(
            f"| {branches} | {prompt} | {args.step_tokens} | {r['parallel_tps']:,.0f} | {r['sequential_tps']:,.0f} "
            f"| {hf} | {r['speedup'] / r['ideal_speedup']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
