"""The `npr` command line."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import typer

from npr import grammar, topology
from npr.engine.params import DEFAULT_TEMPERATURE as TEMPERATURE
from npr.engine.params import DEFAULT_TOP_P as TOP_P
from npr.evaluate import CHUNK
from npr.tags import TAGS

app = typer.Typer(
    help="NPR: teach language models to reason in parallel (Map-Process-Reduce) and run them fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


PROMPT_FILE_HELP = (
    "Ask with this instruction instead of the NPR one (UTF-8 text; {problem} marks where the problem goes)."
)
LAYOUT_HELP = "Text forced at forks and joins: canonical, or paper (the layout of the authors' checkpoints)."
SAMPLING_HELP = "Sampling (every command's default: temperature 1.0, top-p 0.7, the paper's evaluation setting)."


def _read(file: str) -> str:
    if file == "-":
        return sys.stdin.read()
    path = Path(file)
    if not path.is_file():
        raise typer.BadParameter(f"no such file: {file}", param_hint="FILE")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise typer.BadParameter(f"{file} is not UTF-8 text ({e})", param_hint="FILE") from None


@app.command()
def check(
    file: str = typer.Argument("-", help="Response to validate ('-' reads standard input)."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
    min_chars: int = typer.Option(2, help="Shortest acceptable plan/step/takeaway body."),
) -> None:
    """Validate a response against the parallel-reasoning schema.

    Exit status: 0 well-formed, 1 not, 2 usage error.
    """
    resp = grammar.parse(_read(file), min_chars=min_chars)
    if as_json:
        print(json.dumps(resp.summary(), ensure_ascii=False))
    else:
        verdict = "valid" if resp.valid else "invalid"
        shape = ", ".join(f"{len(b.plans)}x{len(b.steps)}" for b in resp.blocks) or "none"
        print(f"{verdict}  format_score={resp.format_score:.2f}  blocks(plans x steps)={shape}  answer={resp.answer!r}")
        for v in resp.violations:
            print(f"  [{v.kind}] {v.message}")
    raise typer.Exit(0 if resp.valid else 1)


@app.command("topology")
def topology_cmd(
    file: str = typer.Argument("-", help="Response to lay out ('-' reads standard input)."),
    width: int = typer.Option(24, help="Show the mask grid when the response has at most this many tokens."),
) -> None:
    """Show the positions and sibling-isolating attention of a response.

    Words stand in for tokens; tags are single tokens, as with a real tokenizer.
    """
    parts = re.split(f"({grammar.TAG_RE.pattern})", _read(file))
    words = [w for p in parts for w in ([p] if p in TAGS else p.split())]
    ids_of = {t: i for i, t in enumerate(TAGS)}
    vocab = {w: len(ids_of) + i for i, w in enumerate(dict.fromkeys(words))}
    ids = [ids_of.get(w, vocab.get(w)) for w in words]
    try:
        lay = topology.layout(ids, ids_of)
    except topology.TopologyError as e:
        print(f"not executable: {e}")
        raise typer.Exit(1) from None
    _, topo = topology.collate([(ids, 0)], ids_of)
    mask = topology.dense_mask(topo)[0, 0]
    print(f"{'#':>4} {'pos':>4} {'seg':>6}  token")
    for i, w in enumerate(words):
        seg = f"{lay.block[i]}.{lay.branch[i]}" if lay.block[i] >= 0 else "-"
        print(f"{i:>4} {lay.positions[i]:>4} {seg:>6}  {w}")
    if len(words) <= width:
        print("\nvisibility (row = query token, # = may attend):")
        for i in range(len(words)):
            print(f"{i:>4} " + "".join("#" if mask[i, j] else "." for j in range(len(words))))
    if not lay.complete:
        print("note: the response ends inside a block (truncated)")


@app.command()
def generate(
    model: str = typer.Option(..., "--model", help="Local model directory (Hugging Face format, safetensors)."),
    prompt: list[str] = typer.Option(..., "--prompt", help="Prompt text; repeat the option for a batch."),
    mode: str = typer.Option("parallel", help="parallel (fork/join branches) or sequential (one stream)."),
    max_tokens: int = typer.Option(1024, help="Token budget over all branches."),
    max_path_tokens: int = typer.Option(None, help="Critical-path budget (default: --max-tokens)."),
    temperature: float = typer.Option(TEMPERATURE, help=SAMPLING_HELP),
    top_p: float = typer.Option(TOP_P, help=SAMPLING_HELP),
    top_k: int = typer.Option(0),
    seed: int = typer.Option(None, help="Sampling seed (same seed, same output)."),
    task: str = typer.Option(
        "math", help="Whose instruction to add: math, choice, or countdown (the default world's tiny model)."
    ),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is: no chat template, no instruction."),
    prompt_file: Path = typer.Option(None, help=PROMPT_FILE_HELP),
    layout: str = typer.Option("canonical", help=LAYOUT_HELP),
    enforce: bool = typer.Option(True, help="Mask tag tokens that would break the schema."),
    tree: bool = typer.Option(False, "--tree", help="Also print the branch tree."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per prompt."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code from the checkpoint."),
) -> None:
    """Decode prompts with the NPR engine and print the answers."""
    from npr.engine import LLM, SamplingParams, load

    try:
        from npr.engine.params import layout_texts
        from npr.tasks import get_task, prompt_ids, read_prompt_file

        get_task(task)
        instruction = read_prompt_file(prompt_file)
        sp = SamplingParams(
            mode=mode, max_tokens=max_tokens, max_path_tokens=max_path_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, enforce_structure=enforce, **layout_texts(layout),
        )  # fmt: skip
        lm, tok = load(model, trust_remote_code=trust_remote_code)
        llm = LLM(lm, tok)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise typer.BadParameter(str(e)) from None
    if not raw:  # as eval does: the task's NPR instruction, then the chat template
        prompt = [prompt_ids(tok, {"problem": p, "grader": task, "instruction": instruction}) for p in prompt]
    else:
        prompt = [tok.encode(p) for p in prompt]
    for ids, out in zip(prompt, llm.generate(prompt, sp, progress=len(prompt) > 1)):
        answer = grammar.last_boxed(out.text)
        if as_json:
            print(json.dumps({"text": out.text, "answer": answer, "finish_reason": out.finish_reason,
                              "stats": out.stats, "blocks": out.blocks, "prompt_ids": ids}))  # fmt: skip
            continue
        print(out.text)
        print(f"\n-- answer: {answer}  finish: {out.finish_reason}  " + _stats_line(out.stats))
        if tree:
            print(_tree(out, tok))


def _stats_line(stats: dict) -> str:
    return (f"tokens: {stats['total_tokens']}  critical path: {stats['critical_path_tokens']}  "
            f"blocks: {stats['blocks']}  branches: {stats['branches']}  time: {stats['wall_time']:.2f}s")  # fmt: skip


def _tree(out, tok) -> str:
    lines = ["branch tree:"]
    for i, b in enumerate(out.blocks):
        lines.append(f"  block {i}: {b['plans']} plans")
        for j, (s, e) in enumerate(b["branches"]):
            text = tok.decode(out.token_ids[s:e]).replace("\n", " ")
            lines.append(f"    step {j + 1} [{s}:{e}) {e - s} tokens: {text[:70]}{'...' if len(text) > 70 else ''}")
    return "\n".join(lines)


@app.command()
def serve(
    model: str = typer.Option(..., "--model", help="Model folder, run folder or hub id (from the local HF cache)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="TCP port."),
    mode: str = typer.Option("parallel", help="Default decoding: parallel or sequential (per request too)."),
    task: str = typer.Option("math", help="Whose NPR instruction chat requests get: math, choice or countdown."),
    prompt_file: Path = typer.Option(None, help=PROMPT_FILE_HELP),
    layout: str = typer.Option("canonical", help=LAYOUT_HELP),
    served_model_name: str = typer.Option(None, help="Name clients pass as `model` (default: the folder's name)."),
    max_tokens: int = typer.Option(1024, help="Budget of a request that gives no max_tokens."),
    max_n: int = typer.Option(16, help="Largest `n` (choices per request) accepted."),
    kv_cache_gb: float = typer.Option(None, help="KV pool GiB (default: 60% of free GPU memory; small on CPU)."),
    max_num_seqs: int = typer.Option(256, help="Branches decoded together, over all requests."),
    attention: str = typer.Option("auto", help="auto, sdpa or flex."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code from the checkpoint."),
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions) with a live tree page at /."""
    from npr.serve import ServeConfig, build, run
    from npr.tasks import read_prompt_file

    try:
        name = served_model_name or Path(model.rstrip("/")).name
        cfg = ServeConfig(name, mode=mode, task=task, instruction=read_prompt_file(prompt_file), layout=layout,
                          max_tokens=max_tokens, max_n=max_n)  # fmt: skip
        app, _ = build(model, cfg, trust_remote_code, kv_cache_gb=kv_cache_gb, max_num_seqs=max_num_seqs,
                       attention=attention)  # fmt: skip
    except (ValueError, FileNotFoundError, OSError) as e:
        raise typer.BadParameter(str(e)) from None
    print(f"serving {name!r} on http://{host}:{port}  (page: /, API: /v1)")
    run(app, host, port)


bench_app = typer.Typer(help="Benchmarks that print figures (ratios measured side by side in one run).")
app.add_typer(bench_app, name="bench")


def _bench_model(model: str | None, config: str, dtype: str):
    """(model, tokenizer, dtype) of the engine benchmarks: a local model or a random one of a
    real shape; on a CPU, 2 threads, as the benchmarks' figures were taken."""
    import torch

    from npr import bench
    from npr.engine import load

    cuda = torch.cuda.is_available()
    try:
        dt = bench.resolve_dtype(dtype)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--dtype") from None
    try:
        if model:
            lm, tok = load(model, dtype=dt)
        else:
            lm = bench.random_model(config, dt, "cuda" if cuda else "cpu")
            tok = bench.word_tokenizer(lm.config.vocab_size)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise typer.BadParameter(str(e)) from None
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    return lm, tok, dt


@bench_app.command("engine")
def bench_engine_cmd(
    model: str = typer.Option(None, "--model", help="Local model directory (its tokenizer must have the tags)."),
    config: str = typer.Option(
        "tiny", help="Random model shape when no --model: tiny, qwen3-0.6b-shape, qwen3-4b-shape."
    ),
    dtype: str = typer.Option("auto", help="float32, bfloat16 or auto (bf16 on GPU, fp32 on CPU)."),
    requests: int = typer.Option(8, help="Requests decoded together."),
    plans: int = typer.Option(4, help="Parallel steps per block."),
    step_tokens: int = typer.Option(48, help="Tokens per step."),
    blocks: int = typer.Option(2, help="Blocks per trajectory."),
    prompt_tokens: int = typer.Option(32, help="Tokens per prompt."),
    kv_cache_gb: float = typer.Option(None, help="KV pool size (default 0.25 GB)."),
    attention: str = typer.Option("auto", help="Engine attention kernel: auto (flex on CUDA), sdpa or flex."),
    page_size: int = typer.Option(16, help="KV pool page size in tokens (the flex kernel's key/value block)."),
    hf: bool = typer.Option(True, help="Also time Hugging Face generate on the flat sequences."),
    sweep: bool = typer.Option(
        False, help="Run the fixed sweep (16-256 branches, prompts up to 4k, long steps) and print one table."
    ),
    repeats: int = typer.Option(
        None, help="Interleaved runs per figure, the best kept (default 5 in a sweep, else 3)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Parallel vs sequential engine decoding vs HF generate on identical token ids."""
    import torch

    from npr import bench

    lm, tok, dt = _bench_model(model, config, dtype)
    cuda = torch.cuda.is_available()
    try:
        if sweep:
            rows = bench.bench_sweep(lm, tok, plans, attention=attention, hf_generate=hf, page_size=page_size,
                                     repeats=5 if repeats is None else repeats)  # fmt: skip
            print(json.dumps(rows) if as_json else bench.sweep_table(rows))
            return
        res = bench.bench_engine(lm, tok, requests, plans, step_tokens, blocks, prompt_tokens, kv_cache_gb=kv_cache_gb,
                                 hf_generate=hf, attention=attention, page_size=page_size,
                                 repeats=3 if repeats is None else repeats)  # fmt: skip
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if as_json:
        keys = ("parallel_tps", "sequential_tps", "hf_generate_tps", "ideal_speedup", "speedup", "decode_speedup",
                "hf_schedule_speedup", "parity_max_abs_logprob_diff")  # fmt: skip
        print(json.dumps({k: res[k] for k in keys}))
        return
    name = model or config
    print(f"engine benchmark: {name}, {dt}, {'cuda' if cuda else 'cpu'}; {requests} requests x {blocks} blocks"
          f" x {plans} steps of {step_tokens} tokens ({res['tokens']} tokens)")  # fmt: skip
    for k, v in res.items():
        print(f"  {k:30s} {v:.4g}" if isinstance(v, float) else f"  {k:30s} {v}")


@bench_app.command("decode")
def bench_decode_cmd(
    config: str = typer.Option("tiny", help="Random model shape: tiny, qwen3-0.6b-shape, qwen3-4b-shape (or --model)."),
    model: str = typer.Option(None, "--model", help="Local model directory instead of a random shape."),
    dtype: str = typer.Option("auto", help="float32, bfloat16 or auto (bf16 on GPU, fp32 on CPU)."),
    batch: list[int] = typer.Option([1, 64], help="Rows decoded together (repeat for several)."),
    prompt_tokens: int = typer.Option(1024, help="Context before the timed decode steps."),
    new_tokens: int = typer.Option(64, help="Decode steps per run."),
    attention: str = typer.Option("auto", help="Engine attention kernel: auto (flex on CUDA), sdpa or flex."),
    page_size: int = typer.Option(16, help="KV pool page size in tokens (the flex kernel's key/value block)."),
    hf: bool = typer.Option(True, help="Also time Hugging Face generate on the same prompts."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Time of one decode step against the memory-bandwidth bound (weights + KV read per step /
    bandwidth), for the engine and HF generate, at each batch size."""
    import torch

    from npr.bench.decode import bench_decode, copy_bandwidth, decode_table

    lm, tok, dt = _bench_model(model, config, dtype)
    cuda = torch.cuda.is_available()
    bandwidth = copy_bandwidth(next(lm.parameters()).device)
    try:
        rows = [bench_decode(lm, tok, b, prompt_tokens, new_tokens, attention, hf, bandwidth=bandwidth,
                             page_size=page_size) for b in batch]  # fmt: skip
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if as_json:
        print(json.dumps(rows))
        return
    nominal = rows[0]["nominal_bandwidth"]
    print(f"decode benchmark: {model or config}, {dt}, {'cuda' if cuda else 'cpu'}; copy bandwidth "
          f"{bandwidth / 1e9:,.0f} GB/s" + (f" (nominal {nominal / 1e9:,.0f} GB/s)" if nominal else ""))  # fmt: skip
    print(decode_table(rows))


@bench_app.command("train")
def bench_train_cmd(
    config: str = typer.Option(
        "narrow-152k", help="Random model shape: tiny, narrow-152k, qwen3-0.6b-shape, qwen3-4b-shape."
    ),
    length: list[int] = typer.Option([2048, 4096, 8192], help="Sequence length in tokens (repeat for several)."),
    step: list[str] = typer.Option(["sft", "papo"], help="Training step: sft (Stage 2) or papo (Stage 3)."),
    dtype: str = typer.Option("auto", help="float32, bfloat16 or auto (bf16 on GPU, fp32 on CPU)."),
    attention: str = typer.Option("auto", help="Trainer attention: auto (flex on CUDA), flex or default."),
    checkpointing: bool = typer.Option(True, help="Gradient checkpointing (as the Qwen configs train)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Peak memory and time of one real training step (the trainers' own functions, random weights).

    On a CPU each length runs in a fresh process and the peak is its RSS; on a GPU it is
    torch.cuda.max_memory_allocated, and the time is the second step's (the first compiles)."""
    from npr.bench.train import check, measure, table

    rows = []
    try:
        for s in step:  # every setting is checked before the first step runs
            for n in length:
                check(config, n, s, dtype, attention)
        for s in step:
            for n in length:
                rows.append(measure(config, n, s, dtype, attention, checkpointing))
                if not as_json:
                    print(table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else table(rows), flush=True)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if as_json:
        print(json.dumps(rows))


@app.command()
def base(
    out: Path = typer.Option(Path("runs/base"), "--out", help="Where the base checkpoint is written (and cached)."),
    rebuild: bool = typer.Option(False, help="Train again even if a finished build with this recipe exists."),
    steps: int = typer.Option(None, help="Training steps (default: the recipe's)."),
    report: bool = typer.Option(True, help="Measure accuracy and format validity on the test split."),
    problems: int = typer.Option(100, help="Test problems for the report."),
) -> None:
    """Build the default world's tiny base model (Countdown, Qwen3 architecture) in a few CPU minutes."""
    import dataclasses

    from npr.world.base import Recipe, build_base

    recipe = Recipe() if steps is None else dataclasses.replace(Recipe(), steps=steps)
    path, rep, reused = build_base(out, recipe, rebuild=rebuild)
    how = "reused" if reused else f"trained in {rep['seconds']:.0f}s"
    print(f"base model: {path} ({how}; loss {rep['loss_first']:.2f} -> {rep['loss_last']:.2f})")
    if report:
        from npr.world.base import measure_base

        for name, r in measure_base(path, problems).items():
            print(f"  {name:26s} avg@{r['k']} {r['avg@k']:.3f}  best@{r['k']} {r['best@k']:.3f}  "
                  f"format-valid {r['format_valid']:.3f}  tokens {r['tokens']:.0f}")  # fmt: skip


@app.command("grade")
def grade_cmd(
    file: str = typer.Argument("-", help="Response to grade ('-' reads standard input)."),
    reference: str = typer.Option(..., "--reference", help="The reference answer."),
    options: list[str] = typer.Option(None, "--option", help="Multiple choice: the options, in order (A, B, ...)."),
) -> None:
    """Grade a response's final answer against a reference: prints correct/incorrect, exits 0/1."""
    from npr.grading import choice_correct, extract_answer, math_equal

    text = _read(file)
    ok = (
        choice_correct(text, reference.strip().upper(), options)
        if options
        else math_equal(extract_answer(text), reference)
    )
    print("correct" if ok else "incorrect")
    raise typer.Exit(0 if ok else 1)


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., "--model", help="Local model directory (Hugging Face format, safetensors)."),
    bench: str = typer.Option(
        ...,
        "--bench",
        help="Benchmarks, comma-separated: aime24, aime25, amc23, hmmt25, "
        "math500, gpqa, countdown, or NAME=PATH for a file of your own (NAME:choice=PATH: multiple choice).",
    ),  # fmt: skip
    n: int = typer.Option(4, "--n", "-n", help="Samples per problem (k); -n under torchrun (which takes --n)."),
    mode: str = typer.Option("parallel", help="parallel or sequential decoding."),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Output folder (rerun to resume)."),
    limit: int = typer.Option(None, help="Only the first N problems of each benchmark."),
    problem_field: str = typer.Option(None, help="Problem field of NAME=PATH files (default: detected)."),
    answer_field: str = typer.Option(None, help="Answer field of NAME=PATH files (default: detected)."),
    temperature: float = typer.Option(TEMPERATURE, help=SAMPLING_HELP),
    top_p: float = typer.Option(TOP_P, help=SAMPLING_HELP),
    max_tokens: int = typer.Option(2048, help="Token budget per response (all branches)."),
    max_path_tokens: int = typer.Option(None, help="Critical-path budget per response."),
    compare_sequential: bool = typer.Option(False, help="Also decode sequentially in the same run; report speedup."),
    enforce: bool = typer.Option(True, help="Mask tag tokens that would break the schema (--no-enforce: raw model)."),
    batch: int = typer.Option(CHUNK, min=1, help="Samples per engine call (progress is saved after each)."),
    kv_cache_gb: float = typer.Option(None, help="KV pool size."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code from the checkpoint."),
    overwrite: bool = typer.Option(False, help="Start afresh in an --out that holds another evaluation (deletes it)."),
    prompt_file: Path = typer.Option(None, help=PROMPT_FILE_HELP),
    layout: str = typer.Option("canonical", help=LAYOUT_HELP),
) -> None:
    """Evaluate a model on benchmarks: accuracy, format validity, parallelism, tokens, speed."""
    from rich.progress import Progress

    from npr.data import DataError, load_benchmark
    from npr.engine import LLM, SamplingParams, load
    from npr.engine.params import layout_texts
    from npr.evaluate import run_eval
    from npr.tasks import read_prompt_file
    from npr.train import distributed

    benches = [b.strip() for b in bench.split(",") if b.strip()]
    try:
        rank, _ = distributed.init()  # under torchrun the ranks share the samples (npr/evaluate.py)
        SamplingParams(mode=mode, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        texts = layout_texts(layout)
        read_prompt_file(prompt_file)
        for b in benches:
            load_benchmark(b, 1, problem_field, answer_field)
        lm, tok = load(model, trust_remote_code=trust_remote_code)
        llm = LLM(lm, tok, kv_cache_gb=kv_cache_gb)
    except (ValueError, DataError, FileNotFoundError, OSError) as e:
        raise typer.BadParameter(str(e)) from None
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
                "max_path_tokens": max_path_tokens, "enforce_structure": enforce, **texts}  # fmt: skip
    with Progress(transient=True, disable=rank != 0) as bar:
        task = bar.add_task("evaluating", total=None)
        try:
            res = run_eval(llm, benches, out, n, mode, limit, sampling, compare_sequential,
                           (problem_field, answer_field), batch=batch, overwrite=overwrite, prompt_file=prompt_file,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(1) from None
    if rank == 0:
        print((out / "report.md").read_text())
        print(f"wrote {out}/results.json, samples.jsonl, report.md, accuracy.png, tokens.png")
    del res


@app.command()
def distill(
    model: str = typer.Option(..., "--model", help="Stage-1 model: a model folder or a training run folder."),
    data: str = typer.Option("countdown:train", "--data", help="Problems: a benchmark or NAME[:choice]=PATH."),
    out: Path = typer.Option(
        Path("runs/distill"), "--out", help="Output folder (rerun with the same folder to resume)."
    ),
    tries: int = typer.Option(8, "--tries", help="Responses sampled per problem at most (K)."),
    keep: int = typer.Option(1, "--keep", help="Accepted responses kept per problem at most (M)."),
    per_round: int = typer.Option(4, "--per-round", help="Responses sampled per problem at a time."),
    limit: int = typer.Option(None, help="Only the first N problems."),
    max_tokens: int = typer.Option(256, help="Token budget per response."),
    temperature: float = typer.Option(TEMPERATURE, help=SAMPLING_HELP),
    top_p: float = typer.Option(TOP_P, help=SAMPLING_HELP),
    seed: int = typer.Option(0, help="Sampling seed."),
    kv_cache_gb: float = typer.Option(None, help="KV pool size."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code from the checkpoint."),
    prompt_file: Path = typer.Option(None, help=PROMPT_FILE_HELP),
    layout: str = typer.Option("canonical", help=LAYOUT_HELP + " Distill encodes the accepted answers in it."),
) -> None:
    """Stage 2 data: rejection-sample the model's own correct, well-formed, executable responses."""
    from npr.data import DataError, load_benchmark
    from npr.engine import LLM, load
    from npr.engine.params import layout_texts
    from npr.tasks import read_prompt_file, with_instruction
    from npr.train import distributed
    from npr.train.distill import DistillConfig, run_distill

    cfg = DistillConfig(
        tries=tries,
        keep=keep,
        per_round=per_round,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        layout=layout,
    )
    try:
        rank, _ = distributed.init()  # under torchrun the ranks share the problems (npr/train/distill.py)
        layout_texts(layout)
        problems = with_instruction(load_benchmark(data, limit), read_prompt_file(prompt_file))
        lm, tok = load(model, trust_remote_code=trust_remote_code)
        llm = LLM(lm, tok, kv_cache_gb=kv_cache_gb)
    except (ValueError, DataError, FileNotFoundError, OSError) as e:
        raise typer.BadParameter(str(e)) from None
    stats = run_distill(llm, problems, out, cfg, progress=rank == 0)
    if rank == 0:
        print(json.dumps({k: v for k, v in stats.items() if k != "config"}, indent=2))
        print(f"wrote {out}/examples.jsonl, attempts.jsonl, stats.json")


def _train(fn, config: Path | None, overrides: list[str], resume: bool, wrote: str, overwrite: bool = False) -> None:
    """Read the config, run a trainer, report errors without a traceback, print the summary (rank 0)."""
    from npr.train.config import load_config
    from npr.train.loop import TrainingError

    try:
        cfg = load_config(config, overrides)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        summary = fn(cfg, resume=resume, overwrite=overwrite)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
        print(f"run written to {cfg.run.out} ({wrote})")


train_app = typer.Typer(help="Training stages: rl (Stage 1 DAPO / Stage 3 PAPO), sft (Stage 2).")
app.add_typer(train_app, name="train")


@train_app.command("rl")
def train_rl_cmd(
    overrides: list[str] = typer.Argument(None, help="Config overrides: section.key=value (e.g. optim.lr=1e-6)."),
    config: Path = typer.Option(None, "--config", help="YAML config (e.g. configs/tiny/stage1.yaml)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in run.out."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh in a run.out that holds a run (deletes it)."
    ),
) -> None:
    """Reinforcement learning on engine rollouts (DAPO for Stage 1, PAPO for Stage 3)."""
    from npr.train.rl import train_rl

    _train(train_rl, config, overrides or [], resume, "metrics.jsonl, samples.txt, checkpoints/", overwrite)


@train_app.command("sft")
def train_sft_cmd(
    overrides: list[str] = typer.Argument(None, help="Config overrides: section.key=value (e.g. optim.lr=1e-6)."),
    config: Path = typer.Option(None, "--config", help="YAML config (e.g. configs/tiny/stage2.yaml)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in run.out."),
    sequential: bool = typer.Option(False, "--sequential", help="Sequential-SFT baseline: causal mask and positions."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh in a run.out that holds a run (deletes it)."
    ),
) -> None:
    """Supervised fine-tuning on distilled examples with the parallel topology (Stage 2, NPR-Beta)."""
    from npr.train.sft import train_sft

    extra = ["sft.sequential=true"] if sequential else []
    _train(train_sft, config, (overrides or []) + extra, resume, "metrics.jsonl, checkpoints/", overwrite)


def _run_pipeline(path: Path, overrides: list[str], only: str | None) -> None:
    from npr.pipeline import load_pipeline, run_pipeline
    from npr.train.loop import TrainingError

    try:
        plan, root = load_pipeline(path, overrides)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        run_pipeline(plan, root, only=only)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    if os.environ.get("RANK", "0") == "0" and (Path(plan.out) / "report.md").exists() and not only:
        print((Path(plan.out) / "report.md").read_text())
        print(f"wrote {plan.out}/report.md, report.json and figures; rerun the same command to resume")


CONFIGS = Path(__file__).parent / "configs"
STAGE_HELP = "Run only this stage: base, stage1, distill, stage2, stage3, eval or report."


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder (rerun to resume)."),
    only: str = typer.Option(None, "--only", help=STAGE_HELP),
) -> None:
    """The whole method on the embedded default world: base -> Stage 1 -> distill -> Stage 2 -> Stage 3
    -> evaluation of every stage -> DIR/report.md. About 40 CPU minutes; resumable."""
    _run_pipeline(CONFIGS / "tiny" / "pipeline.yaml", [f"out={out}"], only)


@app.command()
def pipeline(
    overrides: list[str] = typer.Argument(None, help="Overrides: key=value or section.key=value (e.g. out=runs/x)."),
    config: Path = typer.Option(..., "--config", help="Pipeline YAML (e.g. configs/qwen3-4b-instruct/pipeline.yaml)."),
    only: str = typer.Option(None, "--only", help=STAGE_HELP),
) -> None:
    """The whole method for any checkpoint, stage after stage as a pipeline YAML describes; resumable."""
    _run_pipeline(config, overrides or [], only)


def main() -> None:
    from npr.progress import quiet_libraries
    from npr.train import distributed

    quiet_libraries()  # the commands draw their own progress
    try:
        app()
    except SystemExit as e:  # every command ends here (click's standalone mode)
        distributed.end(e.code)  # under torchrun: exits without the interpreter's teardown
        raise
