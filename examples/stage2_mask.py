"""Stage 2 with and without the engine-forced tokens in its loss (`sft.mask_forced`), per distilled set.

Parallel SFT trains by default on every response token, the `<step>` + label and `<takeaway>` the
engine forces at decoding time included; RL leaves those out. This trains Stage 2 again with
them masked on the demo's own distilled set (seed 0) and on those of `stage3_seeds.py --redistill`
(seeds 1, 2, ...: run that first), evaluates each model decoding in parallel with the demo's
evaluation settings, and prints both avg@k side by side (the unmasked Stage 2 of each seed is
evaluated here too; seed 0's is read from the demo).

    python examples/stage2_mask.py --demo runs/demo --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

from stage3_seeds import demo_avg, evaluate, link_stages

from npr.pipeline import eval_dir, load_pipeline, run_pipeline
from npr.progress import quiet_libraries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished `npr demo` folder")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: DEMO/mask)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = ap.parse_args()
    quiet_libraries()
    plan, _ = load_pipeline(args.demo / "pipeline.yaml")
    root = Path(__file__).resolve().parents[1] / "npr" / "configs" / "tiny"
    out = args.out or args.demo / "mask"
    rows = []
    for seed in args.seeds:
        source = args.demo if seed == 0 else args.demo / "seeds" / f"redistill-seed{seed}"
        if not (source / "distill").is_dir():
            raise SystemExit(f"{source / 'distill'} not found: run examples/stage3_seeds.py --redistill first")
        folder = out / f"seed{seed}"
        link_stages(folder, source, ("base", "stage1", "distill"))  # the seed's own models and distilled set
        over = (*plan.stage2.overrides, f"run.seed={seed}", "sft.mask_forced=true")
        mine = dataclasses.replace(plan, out=str(folder), stage2=dataclasses.replace(plan.stage2, overrides=over))
        run_pipeline(mine, root, progress=False, only="stage2")
        masked = evaluate(plan, folder / "stage2", out / "eval" / f"masked-seed{seed}", "parallel")["avg@k"]
        if seed == 0 and (eval_dir(args.demo, "stage2", "parallel") / "results.json").is_file():
            plain = demo_avg(plan, args.demo, "stage2", "parallel")
        else:
            plain = evaluate(plan, source / "stage2", out / "eval" / f"plain-seed{seed}", "parallel")["avg@k"]
        rows.append((seed, masked, plain))
        print(f"seed {seed}: masked {masked:.3f}, every token {plain:.3f}", flush=True)
    print("\n| Stage 2, parallel avg@k | mean | per seed |\n|---|---|---|")
    for name, i in (("forced tokens masked", 1), ("every token (default)", 2)):
        values = [r[i] for r in rows]
        print(f"| {name} | {statistics.mean(values):.3f} | " + ", ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
