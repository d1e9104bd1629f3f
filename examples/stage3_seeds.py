"""Stage 3 on the default world over several seeds: NPR (PAPO, parallel rollouts) against its
starting point NPR-Beta and against the SR baseline (the same loop with sequential rollouts and
the same budget). Prints mean ± std over seeds of held-out accuracy; every number is measured.

    python examples/stage3_seeds.py --beta runs/demo/stage2 --out runs/stage3-seeds [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from npr.engine import LLM, load
from npr.evaluate import run_eval
from npr.train.config import load_config
from npr.train.rl import train_rl

CONFIG = Path(__file__).resolve().parents[1] / "npr" / "configs" / "tiny" / "stage3.yaml"


def evaluate(model_dir: Path, out: Path, mode: str, problems: int, n: int) -> dict:
    model, tok = load(model_dir, device="cpu")
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 256, "enforce_structure": True}
    res = run_eval(LLM(model, tok, kv_cache_gb=0.5), ["countdown"], out, n, mode, problems, sampling)
    return res["benchmarks"]["countdown"][mode]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beta", type=Path, required=True, help="the Stage-2 (NPR-Beta) model or run folder")
    ap.add_argument("--out", type=Path, default=Path("runs/stage3-seeds"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--sr-seeds", type=int, nargs="*", default=None, help="SR baseline seeds (default: --seeds)")
    ap.add_argument("--problems", type=int, default=200, help="held-out test problems")
    ap.add_argument("--n", type=int, default=4, help="samples per problem")
    ap.add_argument("overrides", nargs="*", help="Stage-3 config overrides (section.key=value)")
    args = ap.parse_args()
    rows = {"NPR-Beta (parallel)": [evaluate(args.beta, args.out / "eval-beta", "parallel", args.problems, args.n)]}
    sr_seeds = args.seeds if args.sr_seeds is None else args.sr_seeds
    for name, mode, seeds in (
        ("NPR (PAPO, parallel)", "parallel", args.seeds),
        ("SR (sequential RL)", "sequential", sr_seeds),
    ):
        for seed in seeds:
            run = args.out / f"{mode}-seed{seed}"
            over = [f"model.path={args.beta}", f"run.out={run}", f"run.seed={seed}", f"rollout.mode={mode}"]
            cfg = load_config(CONFIG, over + args.overrides)
            done = (run / "checkpoints" / "latest.json").exists()
            if not done or json.loads((run / "checkpoints" / "latest.json").read_text())["step"] < cfg.run.steps:
                train_rl(cfg, resume=done)
            rows.setdefault(name, []).append(evaluate(run, run / "eval", mode, args.problems, args.n))
            print(f"{name} seed {seed}: avg@k {rows[name][-1]['avg@k']:.3f}", flush=True)
    print(f"\ncountdown test split: {args.problems} problems x {args.n} samples, seeds {args.seeds}\n")
    print("| model | avg@k (mean ± std over seeds) | best@k | trigger | per seed avg@k |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, rs in rows.items():
        acc = [r["avg@k"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        best = statistics.mean(r["best@k"] for r in rs)
        trig = statistics.mean(r["parallel_trigger_rate"] for r in rs)
        print(f"| {name} | {statistics.mean(acc):.3f} ± {sd:.3f} | {best:.3f} | {trig:.3f} | "
              + ", ".join(f"{a:.3f}" for a in acc) + " |")  # fmt: skip
        summary[name] = {
            "avg@k": acc,
            "best@k": [r["best@k"] for r in rs],
            "trigger": [r["parallel_trigger_rate"] for r in rs],
        }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
