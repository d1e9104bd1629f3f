"""NPR over Stage-1 seeds, on the default world: is NPR's gap to the base decoded in parallel a
draw of Stage 1?

From a finished `npr demo` folder (its base model, reused), run the pipeline's Stage 1 with
`run.seed=S`, the distillation with `seed=S`, then Stage 2 and Stage 3 with the demo's own
settings and seeds, into runs/s1seedS (resumable: finished stages are skipped); evaluate Stage 3
and Stage 2 decoded in parallel and Stage 1's raw sequential decoding with the demo's evaluation
settings; print each seed and mean ± std next to the base model's rows. Seed 0 is the demo's own
run, read from its evaluation. The SR baseline is not trained (`sr=false`).

    python examples/stage1_seeds.py --demo runs/demo --seeds 0 1 2 3

About 13 min of training and 3 of evaluation per seed on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from stage3_seeds import demo_avg, evaluate

from npr.pipeline import load_pipeline, run_pipeline
from npr.progress import quiet_libraries

ROWS = [("stage3", "parallel"), ("stage2", "parallel"), ("stage1", "sequential (raw)")]
CONFIG = Path(__file__).resolve().parents[1] / "npr" / "configs" / "tiny" / "pipeline.yaml"


def seed_run(demo: Path, out: Path, seed: int) -> dict[str, float]:
    """The pipeline from the demo's base model with Stage 1 and the distillation seeded `seed`;
    avg@k of each row (cached in OUT/evalx/summary.json: the stages are deterministic)."""
    cached = out / "evalx" / "summary.json"
    if cached.exists():
        return json.loads(cached.read_text())
    if not (out / "base").exists():
        shutil.copytree(demo / "base", out / "base")  # with its .stage-done: reused, not rebuilt
    over = [f"out={out}", f"stage1.overrides=[run.seed={seed}]", f"distill.seed={seed}", "sr=false"]
    plan, root = load_pipeline(CONFIG, over)
    for stage in ("stage1", "distill", "stage2", "stage3"):
        run_pipeline(plan, root, progress=False, only=stage)
    accs = {}
    for stage, row in ROWS:
        res = evaluate(plan, out / stage, out / "evalx" / stage / row.split(" ")[0], row)
        accs[f"{stage} {row}"] = res["avg@k"]
    cached.write_text(json.dumps(accs, indent=1))
    return accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished `npr demo` folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="where runs/s1seedS go")
    args = ap.parse_args()
    quiet_libraries()
    plan, _ = load_pipeline(args.demo / "pipeline.yaml")
    per_seed = {}
    for seed in args.seeds:
        if seed == 0:
            per_seed[0] = {f"{s} {r}": demo_avg(plan, args.demo, s, r) for s, r in ROWS}
        else:
            per_seed[seed] = seed_run(args.demo, args.runs / f"s1seed{seed}", seed)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_seed[seed].items()), flush=True)
    print(f"\nStage-1 seeds {args.seeds}; avg@k on {plan.eval.bench}, {plan.eval.limit} x {plan.eval.n}\n")
    print("| model | avg@k mean ± std over seeds | per seed |")
    print("|---|---|---|")
    for row in ("sequential (raw)", "parallel"):
        print(f"| base, {row} | {demo_avg(plan, args.demo, 'base', row):.3f} | - |")
    for stage, row in ROWS:
        accs = [per_seed[s][f"{stage} {row}"] for s in args.seeds]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        each = ", ".join(f"{a:.3f}" for a in accs)
        print(f"| {stage}, {row} | {statistics.mean(accs):.3f} ± {sd:.3f} | {each} |")


if __name__ == "__main__":
    main()
