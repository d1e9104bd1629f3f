"""NPR against the base model and the SR baseline over several RL seeds, on the default world.

From a finished `npr demo` folder (its Stage-2 model NPR-Beta and the SR baseline's sequential
SFT model), train Stage 3 (PAPO, parallel rollouts) and SR (the same RL budget, sequential
rollouts) once per seed, evaluate each with the demo's own evaluation settings, and print
mean ± std over seeds next to the base model's best sequential decoding (read from the demo's
evaluation). Every number is measured by the run.

    python examples/stage3_seeds.py --demo runs/demo --seeds 1 2 3
    python examples/stage3_seeds.py --demo runs/demo --seeds 1 2 3 --redistill

With --redistill each seed also redraws the distilled set from the demo's Stage-1 model and
retrains Stage 2 and the sequential SFT on it, so the spread covers the Stage-2 model's draw too
(one Stage-2 model understates it: the README's demo section). Seed 0 is the demo's own run,
whose models are evaluated as they are. --eval-limit evaluates every model, the base included,
on another number of held-out problems than the demo's; finished training and finished samples
are reused, so a second call only evaluates what is new.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from npr.engine import LLM, load
from npr.pipeline import ROW_KINDS, ROWS, eval_dir, eval_row, load_pipeline, run_pipeline
from npr.progress import quiet_libraries
from npr.train import checkpoint
from npr.train.config import load_config, read_yaml
from npr.train.rl import train_rl


def evaluate(plan, model_dir: Path, out: Path, row: str) -> dict:
    model, tok = load(model_dir, device="cpu")
    return eval_row(plan, LLM(model, tok, kv_cache_gb=plan.eval.kv_cache_gb), out, row)


def demo_avg(plan, demo: Path, stage: str, row: str) -> float:
    """avg@k of one of the demo's own evaluation rows (read from its results.json)."""
    res = json.loads((eval_dir(demo, stage, row) / "results.json").read_text())
    return res["benchmarks"][plan.eval.bench][ROW_KINDS[row].mode]["avg@k"]


def link_stages(folder: Path, source: Path, stages: tuple[str, ...]) -> None:
    """`folder` starts from `source`'s finished stages (symbolic links, nothing copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        link = folder / stage
        if not link.exists():
            link.symlink_to((source / stage).resolve(), target_is_directory=True)


def base_rows(plan, demo: Path, evals: Path | None) -> dict[str, float]:
    """The base model's avg@k in each of its rows under the latency budget: read from the demo's
    evaluation, or evaluated again into `evals` (when the evaluation's size differs from the demo's)."""
    accs = {}
    for row in ROWS["base"]:
        kind = ROW_KINDS[row]
        if not kind.budget:
            continue
        if evals is None:
            accs[row] = demo_avg(plan, demo, "base", row)
        else:
            accs[row] = evaluate(plan, demo / "base", eval_dir(evals, "base", row), row)["avg@k"]
    return accs


def demo_seed(demo: Path, redistill: bool) -> dict[str, Path]:
    """Seed 0 is the demo's own run: its stages are seeded 0, so its models are evaluated, not retrained."""
    stages = ["stage3", "sr"] + (["stage2", "sr/sft"] if redistill else [])
    seeds = [read_yaml(demo / s / "config.yaml").get("run", {}).get("seed", 0) for s in stages]
    if redistill:
        seeds.append(load_pipeline(demo / "pipeline.yaml")[0].distill.seed)
    if any(seeds):
        raise SystemExit(f"{demo} was not run with seed 0 ({dict(zip(stages, seeds))}): leave 0 out of --seeds")
    return {"parallel": demo / "stage3", "sequential": demo / "sr"}


def train_from_stage2(plan, root: Path, demo: Path, out: Path, seed: int) -> dict[str, Path]:
    """Stage 3 and SR retrained with `seed` from the demo's own Stage-2 and sequential-SFT models."""
    runs = {}
    for start, row, extra in ((demo / "stage2", "parallel", []),
                              (demo / "sr" / "sft", "sequential", ["rollout.mode=sequential"])):  # fmt: skip
        run = out / f"{row}-seed{seed}"
        over = [f"model.path={start}", f"run.out={run}", f"run.seed={seed}", *extra]
        cfg = load_config(root / plan.stage3.config, list(plan.stage3.overrides) + over)
        found = checkpoint.latest(run)
        if found is None or checkpoint.step_of(found) < cfg.run.steps:
            train_rl(cfg, resume=found is not None, overwrite=found is None)
        runs[row] = run
    return runs


def train_from_stage1(plan, root: Path, demo: Path, out: Path, seed: int) -> dict[str, Path]:
    """The pipeline from the demo's Stage-1 model on with `seed`: a distilled set of its own, then
    Stage 2, the sequential SFT, Stage 3 and SR (the pipeline's stages, resumable as in `npr demo`)."""
    folder = out / f"redistill-seed{seed}"
    link_stages(folder, demo, ("base", "stage1"))  # the seed's pipeline folder starts from the demo's models

    def seeded(sp):
        return dataclasses.replace(sp, overrides=(*sp.overrides, f"run.seed={seed}"))

    mine = dataclasses.replace(plan, out=str(folder), stage2=seeded(plan.stage2), stage3=seeded(plan.stage3),
                               distill=dataclasses.replace(plan.distill, seed=seed))  # fmt: skip
    for stage in ("distill", "stage2", "stage3", "sr"):
        run_pipeline(mine, root, progress=False, only=stage)
    return {"parallel": folder / "stage3", "sequential": folder / "sr"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished `npr demo` folder")
    ap.add_argument("--out", type=Path, default=None, help="where the seed runs go (default: DEMO/seeds)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    what = "per seed, also redraw the distilled set and retrain Stage 2 and the sequential SFT"
    ap.add_argument("--redistill", action="store_true", help=what)
    what = "held-out problems to evaluate on (default: the demo's); the base model is evaluated again at that size"
    ap.add_argument("--eval-limit", type=int, default=None, help=what)
    args = ap.parse_args()
    quiet_libraries()
    plan, _ = load_pipeline(args.demo / "pipeline.yaml")
    root = Path(__file__).resolve().parents[1] / "npr" / "configs" / "tiny"
    out = args.out or args.demo / "seeds"
    kind = "pipeline" if args.redistill else "RL"
    evals = out / f"eval-{args.eval_limit}" if args.eval_limit else None
    if args.eval_limit:
        plan = dataclasses.replace(plan, eval=dataclasses.replace(plan.eval, limit=args.eval_limit))
    base = base_rows(plan, args.demo, evals)
    # NPR's claim is against the base's best sequential decoding under the same latency budget
    base_row = max((r for r in base if ROW_KINDS[r].mode == "sequential"), key=base.get)
    base_acc = base[base_row]
    train = train_from_stage1 if args.redistill else train_from_stage2
    names = {"parallel": "NPR (Stage 3, parallel)", "sequential": "SR (sequential RL)"}
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        runs = demo_seed(args.demo, args.redistill) if seed == 0 else train(plan, root, args.demo, out, seed)
        for row, run in runs.items():
            where = (evals or out / "eval") / f"{kind.lower()}-{row}-seed{seed}"
            rows.setdefault(names[row], []).append(evaluate(plan, run, where, row))
            print(f"{names[row]} seed {seed}: avg@k {rows[names[row]][-1]['avg@k']:.3f}", flush=True)
    e = plan.eval
    print(f"\n{e.bench}: {e.limit} held-out problems x {e.n} samples, at most {e.max_tokens} tokens, "
          f"critical path {e.max_path_tokens}; {kind} seeds {args.seeds}\n")  # fmt: skip
    print("| model | avg@k mean ± std over seeds | per seed | best@k | trigger | parallelism |")
    print("|---|---|---|---|---|---|")
    print(f"| base, best sequential decoding ({base_row}) | {base_acc:.3f} | - | - | - | - |")
    print(f"| base, parallel decoding | {base['parallel']:.3f} | - | - | - | - |")
    summary = {"base": {"row": base_row, "avg@k": base_acc, "rows": base}}
    for name, rs in rows.items():
        acc = [r["avg@k"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        keys = ("best@k", "parallel_trigger_rate", "token_parallelism")
        means = [statistics.mean(r[key] for r in rs) for key in keys]
        print(f"| {name} | {statistics.mean(acc):.3f} ± {sd:.3f} | " + ", ".join(f"{a:.3f}" for a in acc)
              + " | {:.3f} | {:.3f} | {:.2f} |".format(*means))  # fmt: skip
        summary[name] = {"avg@k": acc, "std": sd}
    npr, sr = summary["NPR (Stage 3, parallel)"], summary["SR (sequential RL)"]
    # each gap against the seed spread of what was retrained per seed: both runs for NPR - SR, the
    # NPR runs for NPR - base (the base model is one fixed model, evaluated once)
    band_sr, band_base = 2 * max(npr["std"], sr["std"]), 2 * npr["std"]
    gap_sr = statistics.mean(npr["avg@k"]) - statistics.mean(sr["avg@k"])
    gap_base = statistics.mean(npr["avg@k"]) - base_acc
    print(f"\nNPR - SR = {gap_sr:+.3f} (2 x the larger seed std: {band_sr:.3f}); "
          f"NPR - base = {gap_base:+.3f} (2 x NPR's seed std: {band_base:.3f})")  # fmt: skip
    summary |= {"npr_minus_sr": gap_sr, "npr_minus_base": gap_base, "two_std_sr": band_sr, "two_std_base": band_base}
    (out / f"summary-{kind.lower()}-eval{e.limit}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
