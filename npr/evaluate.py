"""`npr eval`: sample k responses per problem with the engine, grade them, report the metrics.

Samples are appended to DIR/samples.jsonl as they finish, so a rerun with the same DIR
skips what is done; a sample that fails (generation or grading) is recorded with its
error, the run goes on, and a rerun retries it. DIR/results.json, DIR/report.md and PNG plots are rewritten at the end.

Each sample records its share of its batch's wall time (`batch_seconds`); a mode's wall time is
their sum over the samples evaluated. Under torchrun each rank decodes every world-th batch of
those one process would decode, into a file of its own (samples.rankR.jsonl), which rank 0 merges
at the end in one process's order (and at the start, after an interrupted run). Seeds are per
problem and sample, so the samples are those one process would draw; the wall times add up over
the ranks (engine-seconds), so tokens/s is per engine and the speedup compares like with like.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from npr import grammar, metrics
from npr.data import atomic_write, load_benchmark, merge_parts, rank_part
from npr.grading import extract_answer
from npr.tasks import grade, prompt_ids, read_prompt_file, with_instruction

CHUNK = 64  # prompts per engine call: progress is saved between chunks


def _key(s: dict) -> tuple:
    return (s["bench"], s["mode"], s["problem_id"], s["sample"])


def sample_record(bench: str, mode: str, problem: dict, j: int, out) -> dict:
    """Grade one completion and describe it (one line of samples.jsonl)."""
    rec = {
        "bench": bench,
        "mode": mode,
        "problem_id": problem["id"],
        "sample": j,
        "prompt": problem["problem"],
        "reference": problem["answer"],
        "response": out.text,
        "finish_reason": out.finish_reason,
        "tree": out.blocks,
        "total_tokens": out.stats["total_tokens"],
        "critical_path_tokens": out.stats["critical_path_tokens"],
        "parallel_blocks": out.stats["parallel_blocks"],
        "refused_forks": out.stats["refused_forks"],
        "wall_time": out.stats["wall_time"],
    }
    try:
        parsed = grammar.parse(out.text)
        wellformed = [len(b.plans) == len(b.steps) > 0 and b.complete for b in parsed.blocks]
        rec["format_valid"] = parsed.valid
        rec["wellformed_blocks"] = sum(wellformed)
        forked = out.stats["blocks"] if mode == "parallel" else 0
        rec["forked_wellformed_blocks"] = sum(wellformed[:forked])
        rec["answer"] = extract_answer(out.text)  # what `grade` reads (also inside a takeaway)
        rec["correct"] = grade(problem, out.text)
    except Exception as e:  # recorded, not fatal
        rec["error"] = f"{type(e).__name__}: {e}"
    if out.error:
        rec["engine_error"] = out.error
    return rec


PROVENANCE = "provenance.json"
SAMPLES = "samples.jsonl"
OUTPUTS = (SAMPLES, "results.json", "report.md", "accuracy.png", "tokens.png", PROVENANCE)
LEGACY = ("timing.json",)  # written by earlier versions (wall times are now in the samples)


def weights_fingerprint(model) -> str:
    """A cheap identity of the weights in memory: every tensor's name, shape, dtype and first 4 KiB.
    Two different checkpoints (or training steps) differ in it; hashing whole 8 GB files would not
    be cheap."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        head = t.detach().reshape(-1)[: 4096 // t.element_size()].cpu().contiguous()
        h.update(head.view(torch.uint8).numpy().tobytes())  # bytes: works for bf16 too
    return h.hexdigest()[:16]


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _prompt_kind(parallel_prompt: bool, instruction: str | None) -> str:
    if not parallel_prompt:
        return "step-by-step"
    return "file:" + hashlib.sha256(instruction.encode()).hexdigest()[:16] if instruction else "npr"


def provenance(llm, sampling: dict, parallel_prompt: bool, fields: tuple, instruction: str | None = None) -> dict:
    """What an evaluation's samples depend on: a rerun may add to them only when all of it matches."""
    import npr

    return {
        "model": str(getattr(llm.model.config, "_name_or_path", "") or ""),
        "weights": weights_fingerprint(llm.model),
        "sampling": {k: sampling[k] for k in sorted(sampling)},
        "prompt": _prompt_kind(parallel_prompt, instruction),
        "fields": list(fields),
        "npr_version": npr.__version__,
        "git_commit": _git_commit(),
    }


def check_provenance(out_dir: Path, now: dict, overwrite: bool) -> None:
    """Refuse to mix samples of another model or other settings into `out_dir` (or clear it)."""
    path = out_dir / PROVENANCE
    before = json.loads(path.read_text()) if path.exists() else None
    has_samples = (out_dir / SAMPLES).exists()
    if overwrite:
        for name in OUTPUTS + LEGACY:
            (out_dir / name).unlink(missing_ok=True)
    elif has_samples and before != now:
        if before is None:
            diff = "it records no provenance"
        else:
            diff = "; ".join(f"{k}: {before.get(k)!r} there, {now[k]!r} now" for k in now if before.get(k) != now[k])
        raise ValueError(f"{out_dir} holds results of another evaluation ({diff}): use another --out, or --overwrite")
    atomic_write(path, json.dumps(now, indent=1))


def run_eval(
    llm,
    benches: list[str],
    out_dir: str | Path,
    n: int = 4,
    mode: str = "parallel",
    limit: int | None = None,
    sampling: dict | None = None,
    compare_sequential: bool = False,
    fields: tuple[str | None, str | None] = (None, None),
    progress: Callable[[int, int], None] | None = None,
    batch: int = CHUNK,
    parallel_prompt: bool = True,
    overwrite: bool = False,
    prompt_file: str | Path | None = None,
) -> dict:
    """Evaluate; a rerun into the same `out_dir` resumes only with the same model, sampling settings
    and prompt (recorded in provenance.json), else it refuses (`overwrite`: start afresh)."""
    from npr.engine import SamplingParams
    from npr.train import distributed

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = distributed.rank_world()
    distributed.check_shared(out_dir)
    sampling = {"temperature": 1.0, "top_p": 0.7, "max_tokens": 2048} | (sampling or {})
    instruction = read_prompt_file(prompt_file)
    prov = provenance(llm, sampling, parallel_prompt, fields, instruction)
    # an interrupted run's parts are merged before its provenance is checked, its failed samples
    # dropped (to be retried) only once that check has passed; what is done is rank 0's reading,
    # sent to all (another node may still see the files unmerged)
    done = distributed.on_rank0(lambda: _start(out_dir, prov, overwrite))
    path = out_dir / SAMPLES
    modes = [mode] + (["sequential"] if compare_sequential and mode != "sequential" else [])
    problems = {b: with_instruction(load_benchmark(b, limit, *fields), instruction) for b in benches}
    batches = []  # (bench, mode, `batch` samples decoded together); whole batches to each rank
    for b, ps in problems.items():
        for m in modes:
            todo = [(p, j) for p in ps for j in range(n) if (b, m, p["id"], j) not in done]
            batches += [(b, m, todo[c : c + batch]) for c in range(0, len(todo), batch)]
    batches = batches[rank::world]
    finished = len(done) if world == 1 else 0  # under torchrun the progress is rank 0's share
    todo_total = finished + sum(len(chunk) for _, _, chunk in batches)
    with rank_part(path, rank, world).open("a", encoding="utf-8") as f:
        for bench, m, chunk in batches:
            # the speedup's reference decodes the same work serially: the latency budget, which
            # a serial answer spends on every token, is the parallel run's alone
            kw = sampling | ({"max_path_tokens": None} if m != mode else {})
            seeds = [zlib.crc32(f"{p['id']}/{j}".encode()) for p, j in chunk]
            params = [SamplingParams(mode=m, seed=seed, **kw) for seed in seeds]
            t0 = time.perf_counter()
            try:
                outs = llm.generate([prompt_ids(llm.tokenizer, p, parallel_prompt) for p, _ in chunk], params)
            except Exception as e:  # recorded per sample; the run goes on (a rerun retries them)
                outs = [None] * len(chunk)
                failure = f"{type(e).__name__}: {e}"
            share = (time.perf_counter() - t0) / len(chunk)  # samples of a batch share its time
            for (p, j), o in zip(chunk, outs):
                if o is None:
                    rec = {"bench": bench, "mode": m, "problem_id": p["id"], "sample": j, "error": failure}
                else:
                    rec = sample_record(bench, m, p, j, o)
                rec["batch_seconds"] = share
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            finished += len(chunk)
            if progress:
                progress(finished, todo_total)
    plan = [(b, m, p["id"], j) for b, ps in problems.items() for m in modes for p in ps for j in range(n)]
    distributed.wait_for_all(out_dir, "eval-done")
    return distributed.on_rank0(lambda: _summarize(out_dir, benches, modes, plan, prov))


def _merge(out_dir: Path, retry: bool = False, plan: list | None = None) -> list[dict]:
    """The ranks' samples merged into samples.jsonl; `retry`: without the failed ones (a rerun
    retries them; at the end of a run they stay, for the report's error count); in `plan`'s order
    when given (the order one process writes)."""
    from npr.train import distributed

    distributed.clear_marks(out_dir, "eval-done")
    index = {k: i for i, k in enumerate(plan or [])}
    order = (lambda s: index.get(_key(s), len(index))) if plan else None
    return merge_parts(out_dir / SAMPLES, key=_key, keep=(lambda x: "error" not in x) if retry else None, order=order)


def _start(out_dir: Path, prov: dict, overwrite: bool) -> set:
    """Merge what an interrupted run left, check (or clear) the folder, drop failed samples;
    returns the keys of the samples done."""
    _merge(out_dir)
    check_provenance(out_dir, prov, overwrite)
    return {_key(s) for s in _merge(out_dir, retry=True)}


def _summarize(out_dir: Path, benches: list[str], modes: list[str], plan: list, prov: dict) -> dict:
    samples = _merge(out_dir, plan=plan)
    results = summarize_run(samples, benches, modes, set(plan)) | {"provenance": prov}
    write_outputs(out_dir, results)
    return results


def summarize_run(samples: list[dict], benches: list[str], modes: list[str], plan: set | None = None) -> dict:
    """Metrics per benchmark and mode, over the samples of this run's `plan` ((bench, mode, problem
    id, sample) keys) when given: a rerun with a smaller --n or --limit reads the same file, and
    its wall time is that of its own samples (each holds its share of its batch's time)."""
    results: dict = {"benchmarks": {}}
    for b in benches:
        per = {}
        for m in modes:
            mine = [s for s in samples if s["bench"] == b and s["mode"] == m and (plan is None or _key(s) in plan)]
            per[m] = metrics.summarize(mine, sum(s.get("batch_seconds", 0.0) for s in mine) or None)
        if "parallel" in per and "sequential" in per and per["parallel"].get("wall_time_s"):
            per["speedup"] = per["sequential"]["wall_time_s"] / per["parallel"]["wall_time_s"]
        results["benchmarks"][b] = per
    return results


def write_outputs(out_dir: Path, results: dict) -> None:
    atomic_write(out_dir / "results.json", json.dumps(results, indent=1))
    atomic_write(out_dir / "report.md", report_markdown(results))
    plot(out_dir, results)


ROWS = [
    ("samples", "{}"),
    ("errors", "{}"),  # failed samples, left out of every other row (a rerun retries them)
    ("avg@k", "{:.3f}"),
    ("best@k", "{:.3f}"),
    ("pass@1", "{:.3f}"),
    ("format_valid_rate", "{:.3f}"),
    ("parallel_trigger_rate", "{:.3f}"),
    ("genuine_parallel_rate", "{:.3f}"),
    ("mean_total_tokens", "{:.1f}"),
    ("mean_critical_path_tokens", "{:.1f}"),
    ("token_parallelism", "{:.2f}"),
    ("tokens_per_s", "{:.1f}"),
    ("wall_time_s", "{:.1f}"),
]


def report_markdown(results: dict) -> str:
    cols = [(b, m) for b, per in results["benchmarks"].items() for m in per if m != "speedup"]
    lines = ["# NPR evaluation", "", "| metric | " + " | ".join(f"{b} ({m})" for b, m in cols) + " |"]
    lines.append("|---" * (len(cols) + 1) + "|")
    for key, fmt in ROWS:
        vals = [results["benchmarks"][b][m].get(key) for b, m in cols]
        lines.append(f"| {key} | " + " | ".join("-" if v is None else fmt.format(v) for v in vals) + " |")
    k = {results["benchmarks"][b][m]["k"] for b, m in cols}
    lines += ["", f"k = {', '.join(map(str, sorted(k)))} samples per problem."]
    for b, per in results["benchmarks"].items():
        if "speedup" in per:
            lines.append(f"- {b}: wall-clock speedup of parallel over sequential decoding: {per['speedup']:.2f}x")
    lines += ["", "Metric definitions: docs/design.md §6 (in the NPR repository)."]
    return "\n".join(lines) + "\n"


def plot(out_dir: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(b, m) for b, per in results["benchmarks"].items() for m in per if m != "speedup"]
    labels = [f"{b}\n{m}" for b, m in cols]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(cols)), 3.5))
    avg = [results["benchmarks"][b][m]["avg@k"] for b, m in cols]
    best = [results["benchmarks"][b][m]["best@k"] for b, m in cols]
    x = range(len(cols))
    ax.bar([i - 0.2 for i in x], avg, 0.4, label="avg@k")
    ax.bar([i + 0.2 for i in x], best, 0.4, label="best@k")
    ax.set_xticks(list(x), labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(cols)), 3.5))
    total = [results["benchmarks"][b][m]["mean_total_tokens"] for b, m in cols]
    path = [results["benchmarks"][b][m]["mean_critical_path_tokens"] for b, m in cols]
    ax.bar([i - 0.2 for i in x], total, 0.4, label="total tokens")
    ax.bar([i + 0.2 for i in x], path, 0.4, label="critical path")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("tokens per response")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "tokens.png", dpi=100)
    plt.close(fig)
