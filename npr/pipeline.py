"""`npr demo` and `npr pipeline`: the whole method, stage after stage, with one report.

    base -> Stage 1 (DAPO) -> rejection sampling -> Stage 2 (parallel SFT) -> Stage 3 (PAPO)
         -> SR baseline (sequential SFT + sequential RL on the same data and budgets)
         -> evaluation of every stage (sequential and parallel decoding, held-out problems) -> report

Each stage writes OUT/<stage>/ and is marked finished by OUT/<stage>/.stage-done: a rerun skips
finished stages, resumes an interrupted training stage from its last checkpoint, and an
interrupted evaluation or rejection sampling from the samples already written.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from npr.engine.params import layout_texts
from npr.progress import quiet_libraries
from npr.tasks import read_prompt_file
from npr.train.config import build, load_config, read_yaml

DONE = ".stage-done"  # marks a finished stage folder


@dataclass
class StagePlan:
    config: str | None = None  # a training YAML, relative to the pipeline file
    overrides: tuple = ()  # section.key=value applied on top


@dataclass
class DistillPlan:
    data: str = "countdown:train"
    limit: int = 600
    tries: int = 8
    keep: int = 1
    per_round: int = 4
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class EvalPlan:
    bench: str = "countdown"
    limit: int = 50
    n: int = 4
    max_tokens: int = 256
    max_path_tokens: int | None = None  # latency budget (critical path) shared by every decoding
    temperature: float = 1.0
    top_p: float = 1.0
    kv_cache_gb: float = 0.5
    batch: int = 8  # samples decoded together: the latency regime in which parallel decoding pays off


@dataclass
class Pipeline:
    out: str = "runs/demo"
    base: str = "world"  # "world": build the default world's base model; else a model folder or hub name
    dtype: str = "auto"  # of the prepared base (auto: as stored)
    stage1: StagePlan = field(default_factory=StagePlan)
    distill: DistillPlan = field(default_factory=DistillPlan)
    stage2: StagePlan = field(default_factory=StagePlan)
    # the model Stage 2 (and the SR baseline's sequential SFT) fine-tunes: "base", as in the authors'
    # release (npr-beta/train/sft_math.sh warms up Qwen3-4B-Instruct, not NPR-Zero), or "stage1";
    # either way the Stage-1 model writes the distilled data
    stage2_from: str = "base"
    stage3: StagePlan = field(default_factory=StagePlan)
    sr: bool = True  # train the sequential-RL baseline (Stage-2 and Stage-3 budgets, sequential topology)
    eval: EvalPlan = field(default_factory=EvalPlan)
    prompt_file: str | None = None  # an instruction of your own for every stage (relative to this file)
    layout: str = "canonical"  # text forced at forks and joins: canonical | paper


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> tuple[Pipeline, Path]:
    """Read a pipeline YAML (`key=value` or `section.key=value` overrides); returns it and its folder."""
    if not Path(path).is_file():
        raise ValueError(f"pipeline file not found: {path}")
    plan = build(Pipeline, read_yaml(path, overrides, top_level=True), str(path))
    if plan.prompt_file:  # relative to the pipeline file, like the stage configs
        plan.prompt_file = str(Path(path).parent / plan.prompt_file)
        read_prompt_file(plan.prompt_file)
    layout_texts(plan.layout)
    if plan.stage2_from not in ("base", "stage1"):
        raise ValueError(f"{path}: stage2_from: expected base or stage1, got {plan.stage2_from!r}")
    return plan, Path(path).parent


STAGES = ["base", "stage1", "distill", "stage2", "stage3", "sr", "eval", "report"]


def run_pipeline(plan: Pipeline, root: Path, progress: bool = True, only: str | None = None) -> dict:
    """Run every unfinished stage; returns the report data. `root`: the folder stage configs are relative to."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from npr.train import distributed

    if only is not None and only not in STAGES:
        raise ValueError(f"--only: expected one of {', '.join(STAGES)}, got {only!r}")
    rank, world = distributed.init()
    if world > 1 and only not in ("stage1", "distill", "stage2", "stage3", "sr", "eval"):
        raise ValueError("under torchrun run one stage at a time: --only stage1|distill|stage2|stage3|sr|eval")
    progress = progress and rank == 0
    quiet_libraries()  # one progress display
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "pipeline.yaml").write_text(yaml.safe_dump(dataclasses.asdict(plan), sort_keys=False))
    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn()]  # fmt: skip
    times = _read_json(out / "times.json")
    stages = [only] if only else STAGES
    with Progress(*cols, disable=not progress) as bar:
        overall = bar.add_task("pipeline", total=len(stages), info="")
        shared = bar if progress else False
        result = {}
        for stage in stages:
            marker = out / stage / DONE
            if distributed.from_rank0(marker.exists()) and stage != "report":  # one decision for all ranks
                bar.update(overall, advance=1, info=f"{stage} (done before)")
                continue
            bar.update(overall, info=stage)
            t0 = time.perf_counter()
            (out / stage).mkdir(parents=True, exist_ok=True)
            result = STAGE_FUNCTIONS[stage](plan, root, out, shared) or {}
            if rank == 0:
                times[stage] = times.get(stage, 0.0) + time.perf_counter() - t0
                (out / "times.json").write_text(json.dumps(times, indent=1))
                marker.write_text(json.dumps({"seconds": times[stage]}))
            bar.update(overall, advance=1)
    return result


def _stage_config(plan: Pipeline, sp: StagePlan, root: Path, forced: list[str]):
    path = (root / sp.config) if sp.config else None
    shared = [f"rollout.layout={plan.layout}"] + ([f"data.prompt_file={plan.prompt_file}"] if plan.prompt_file else [])
    return load_config(path, list(sp.overrides) + shared + forced)


def _continue(run: Path) -> dict:
    """An unfinished stage resumes from its last checkpoint, or starts afresh when it has none."""
    from npr.train import checkpoint, distributed

    found = distributed.from_rank0(checkpoint.latest(run) is not None)  # one decision for every rank
    return {"resume": found, "overwrite": not found}


def base_stage(plan: Pipeline, root: Path, out: Path, progress) -> None:
    """The default world's base model, or a real checkpoint prepared with the tags (safetensors)."""
    if plan.base == "world":
        from npr.world.base import build_base

        build_base(out / "base", progress=bool(progress))
        return
    prepare_base(plan.base, out / "base", plan.dtype)


def prepare_base(source: str, dest: Path, dtype: str = "auto") -> None:
    """Copy a model (local folder or hub name) to `dest` with the NPR tags added (and rows initialised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npr.tokens import add_npr_tokens
    from npr.train.policy import DTYPES

    torch_dtype = {"auto": "auto", **DTYPES}[dtype]
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True)
    add_npr_tokens(tok, model)
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        f.replace(dest / f.name)
    tmp.rmdir()


def stage1_stage(plan: Pipeline, root: Path, out: Path, progress) -> None:
    from npr.train.rl import train_rl

    cfg = _stage_config(plan, plan.stage1, root, [f"model.path={out / 'base'}", f"run.out={out / 'stage1'}"])
    train_rl(cfg, **_continue(out / "stage1"), progress=progress)


def distill_config(plan: Pipeline):
    """The rejection sampling's settings; answers are encoded in the layout the later stages decode in."""
    from npr.train.distill import DistillConfig

    d = plan.distill
    return DistillConfig(tries=d.tries, keep=d.keep, per_round=d.per_round, max_tokens=d.max_tokens,
                         temperature=d.temperature, top_p=d.top_p, seed=d.seed, layout=plan.layout)  # fmt: skip


def distill_stage(plan: Pipeline, root: Path, out: Path, progress) -> None:
    from npr.data import load_benchmark
    from npr.engine import LLM, load
    from npr.tasks import with_instruction
    from npr.train.distill import run_distill

    d, cfg = plan.distill, distill_config(plan)
    model, tok = load(out / "stage1")
    llm = LLM(model, tok, kv_cache_gb=plan.eval.kv_cache_gb)
    problems = with_instruction(load_benchmark(d.data, d.limit or None), read_prompt_file(plan.prompt_file))
    run_distill(llm, problems, out / "distill", cfg, progress=progress)


def _sft_forced(plan: Pipeline, out: Path, run: Path) -> list[str]:
    """What Stage 2 and the SR baseline's sequential SFT share: the start model and the distilled
    data (so the two arms differ only in their topology)."""
    return [f"model.path={out / plan.stage2_from}", f"data.source={out / 'distill'}", f"run.out={run}"]


def stage2_stage(plan: Pipeline, root: Path, out: Path, progress) -> None:
    from npr.train.sft import train_sft

    cfg = _stage_config(plan, plan.stage2, root, _sft_forced(plan, out, out / "stage2"))
    train_sft(cfg, **_continue(out / "stage2"), progress=progress)


def stage3_stage(plan: Pipeline, root: Path, out: Path, progress) -> None:
    from npr.train.rl import train_rl

    cfg = _stage_config(plan, plan.stage3, root, [f"model.path={out / 'stage2'}", f"run.out={out / 'stage3'}"])
    train_rl(cfg, **_continue(out / "stage3"), progress=progress)


def sr_stage(plan: Pipeline, root: Path, out: Path, progress) -> None:
    """The sequential-RL baseline: the NPR path with the sequential topology. Sequential SFT on the
    same distilled examples (Stage-2 config), then RL with sequential rollouts of the same schema
    on the same data (Stage-3 config and budget)."""
    from npr.train.rl import train_rl
    from npr.train.sft import train_sft

    if not plan.sr:
        return
    sft = out / "sr" / "sft"
    forced = _sft_forced(plan, out, sft) + ["sft.sequential=true"]
    train_sft(_stage_config(plan, plan.stage2, root, forced), **_continue(sft), progress=progress)
    forced = [f"model.path={sft}", f"run.out={out / 'sr'}", "rollout.mode=sequential"]
    train_rl(_stage_config(plan, plan.stage3, root, forced), **_continue(out / "sr"), progress=progress)


MODELS = ["base", "stage1", "stage2", "stage3", "sr"]


@dataclass(frozen=True)
class Row:
    mode: str  # engine mode
    enforce: bool  # structure enforced by the engine
    npr_prompt: bool  # NPR instruction in the prompt (else the step-by-step one)
    budget: bool = True  # under the plan's latency budget (max_path_tokens)


ROW_KINDS = {
    # the model alone, no latency budget: does it write the format itself, and is it right?
    "sequential (raw)": Row("sequential", False, True, budget=False),
    "sequential (plain prompt)": Row("sequential", False, False),  # asked step by step: the base's own way
    "sequential": Row("sequential", True, True),  # the schema, one token after another (the SR baseline's way)
    # the same answers as "parallel", decoded one token after another with no latency budget: the
    # speedup's reference (same work, serial instead of concurrent steps)
    "serial": Row("sequential", True, True, budget=False),
    "parallel": Row("parallel", True, True),  # the engine: steps of a block decoded as concurrent branches
}
ROWS = {  # which rows each model gets (the speedup compares "serial" and "parallel" of one model)
    "base": ["sequential (raw)", "sequential (plain prompt)", "sequential", "parallel"],
    "stage1": ["sequential (raw)", "parallel"],
    "stage2": ["serial", "parallel"],
    "stage3": ["serial", "parallel"],
    "sr": ["sequential"],
}


def eval_stage(plan: Pipeline, root: Path, out: Path, progress) -> None:
    """Every stage's model on the held-out problems, same problems and seeds in every mode; the
    speedup compares "serial" and "parallel" (same schema, serial vs concurrent steps)."""
    from npr.engine import LLM, load
    from npr.progress import bar as progress_bar

    with progress_bar("eval", progress) as bar:
        for name in MODELS:
            if name == "sr" and not plan.sr:  # run_pipeline made the (empty) folder; there is no model
                continue
            model, tok = load(out / name)
            llm = LLM(model, tok, kv_cache_gb=plan.eval.kv_cache_gb)
            for row in ROWS[name]:
                task = bar.add_task(f"eval {name} {row}", total=None, info="")
                eval_row(plan, llm, eval_dir(out, name, row), row,
                         progress=lambda done, total, t=task: bar.update(t, completed=done, total=total))  # fmt: skip
                bar.remove_task(task)
            del llm, model


def eval_row(plan: Pipeline, llm, out_dir: Path, row: str, progress=None) -> dict:
    """One report row: the model behind `llm` with the row's decoding and the plan's eval settings."""
    from npr.evaluate import run_eval

    e, kind = plan.eval, ROW_KINDS[row]
    sampling = {"temperature": e.temperature, "top_p": e.top_p, "max_tokens": e.max_tokens,
                "max_path_tokens": e.max_path_tokens if kind.budget else None, "enforce_structure": kind.enforce,
                **layout_texts(plan.layout)}  # fmt: skip
    res = run_eval(llm, [e.bench], out_dir, e.n, kind.mode, e.limit or None, sampling, batch=e.batch,
                   parallel_prompt=kind.npr_prompt, progress=progress, prompt_file=plan.prompt_file)  # fmt: skip
    return res["benchmarks"][e.bench][kind.mode]


def eval_dir(out: Path, name: str, row: str) -> Path:
    return out / "eval" / name / row.replace(" (", "-").replace(")", "")


def report_stage(plan: Pipeline, root: Path, out: Path, progress) -> dict:
    from npr.data import read_appended
    from npr.report import write_report

    evals = {}
    for name in MODELS:
        modes = {}
        for row in ROWS[name]:
            mode = ROW_KINDS[row].mode
            res = _read_json(eval_dir(out, name, row) / "results.json")
            if res:
                modes[row] = res["benchmarks"][plan.eval.bench][mode]
        if modes:
            evals[name] = modes
    runs = {s: out / s for s in ("stage1", "stage2", "stage3", "sr") if (out / s).exists()}
    samples = read_appended(out / "eval" / "stage3" / "parallel" / "samples.jsonl")
    distill = _read_json(out / "distill" / "stats.json")
    times = _read_json(out / "times.json")
    info = {
        "title": f"Benchmark {plan.eval.bench}: {plan.eval.limit} held-out problems x {plan.eval.n} samples, "
        f"temperature {plan.eval.temperature}, top-p {plan.eval.top_p}, at most {plan.eval.max_tokens} tokens"
        + (f", critical path at most {plan.eval.max_path_tokens}." if plan.eval.max_path_tokens else "."),
        "base": plan.base,
        "distilled examples": distill.get("examples"),
        "distill acceptance rate": distill.get("acceptance_rate") and round(distill["acceptance_rate"], 3),
        "stage seconds": {k: round(v) for k, v in times.items()},
    }
    return write_report(out, evals, runs, samples, info)


STAGE_FUNCTIONS = {
    "base": base_stage,
    "stage1": stage1_stage,
    "distill": distill_stage,
    "stage2": stage2_stage,
    "stage3": stage3_stage,
    "sr": sr_stage,
    "eval": eval_stage,
    "report": report_stage,
}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
