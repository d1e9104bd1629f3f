"""The pipeline report: a table per stage and decoding mode, learning curves, an example tree.

Everything is read from what the run wrote (eval results.json and samples.jsonl, training
metrics.jsonl): no number is typed in.
"""

from __future__ import annotations

import json
from pathlib import Path

from npr import grammar
from npr.data import read_appended

COLUMNS = [
    ("avg@k", "avg@k", "{:.3f}"),
    ("best@k", "best@k", "{:.3f}"),
    ("format-valid", "format_valid_rate", "{:.3f}"),
    ("trigger", "parallel_trigger_rate", "{:.3f}"),
    ("genuine parallel", "genuine_parallel_rate", "{:.3f}"),
    ("tokens", "mean_total_tokens", "{:.1f}"),
    ("critical path", "mean_critical_path_tokens", "{:.1f}"),
    ("parallelism", "token_parallelism", "{:.2f}"),
    ("tokens/s", "tokens_per_s", "{:.0f}"),
]
CURVES = {
    "stage1": ["reward_mean", "accuracy", "format_valid_rate", "parallel_trigger_rate"],
    "stage2": ["loss"],
    "stage3": ["reward_mean", "accuracy", "format_valid_rate", "parallel_trigger_rate"],
    "sr": ["reward_mean", "accuracy", "format_valid_rate"],
}


def stage_rows(evals: dict[str, dict[str, dict]]) -> list[dict]:
    """evals[stage][mode] = metrics.summarize output -> one row per (stage, mode), with the speedup."""
    rows = []
    for stage, modes in evals.items():
        par, seq = modes.get("parallel"), modes.get("serial")
        speedup = None
        if par and seq and par.get("wall_time_s") and seq.get("wall_time_s"):
            speedup = seq["wall_time_s"] / par["wall_time_s"]
        for mode, m in modes.items():
            row = {"stage": stage, "mode": mode, **{key: m.get(key) for _, key, _ in COLUMNS}}
            row["speedup"] = speedup if mode == "parallel" else None
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ["stage", "decoding"] + [name for name, _, _ in COLUMNS] + ["speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["stage"], r["mode"]]
        cells += ["-" if r[key] is None else fmt.format(r[key]) for _, key, fmt in COLUMNS]
        cells.append("-" if r["speedup"] is None else f"{r['speedup']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tree_text(response: str, width: int = 90) -> str:
    """A response drawn as a tree: blocks, their plans, the parallel steps, the takeaway."""

    def cut(s: str) -> str:
        s = " ".join(s.split())
        return s if len(s) <= width else s[: width - 3] + "..."

    resp = grammar.parse(response)
    lines = ["response"]
    for i, b in enumerate(resp.blocks):
        last = i == len(resp.blocks) - 1 and not resp.texts[-1].strip()
        lines.append(f"{'└' if last else '├'}── block {i + 1}: {len(b.plans)} plans")
        pad = "    " if last else "│   "
        items = [("plan", p) for p in b.plans] + [("step", s) for s in b.steps]
        items += [("takeaway", b.takeaway)] if b.takeaway else []
        for j, (kind, piece) in enumerate(items):
            branch = "└── " if j == len(items) - 1 else "├── "
            label = f" {piece.label}" if piece.label is not None else ""
            tag = " ║ parallel" if kind == "step" and len(b.steps) > 1 else ""
            lines.append(f"{pad}{branch}{kind}{label}{tag}: {cut(piece.body)}")
    if resp.texts[-1].strip():
        lines.append(f"└── answer: {cut(resp.texts[-1])}")
    return "\n".join(lines)


def plot_curves(run_dirs: dict[str, Path], out: Path) -> list[str]:
    """One PNG per training stage with its learning curves; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for stage, keys in CURVES.items():
        if stage not in run_dirs:
            continue
        m = read_appended(run_dirs[stage] / "metrics.jsonl")
        keys = [k for k in keys if any(k in x for x in m)]
        if not m or not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(x["step"], x[k]) for x in m if k in x]
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_title(k.replace("_", " "), fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        fig.suptitle(stage)
        fig.tight_layout()
        name = f"curves_{stage}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
    return names


def plot_stages(rows: list[dict], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for mode, marker in (("sequential (plain prompt)", "^"), ("sequential", "o"), ("parallel", "s")):
        mine = [r for r in rows if r["mode"] == mode]
        ax.plot([r["stage"] for r in mine], [r["avg@k"] for r in mine], marker=marker, label=f"{mode} avg@k")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_stage.png", dpi=90)
    plt.close(fig)
    return "accuracy_by_stage.png"


def example(samples: list[dict]) -> dict | None:
    """A correct response whose blocks ran in parallel (else any parallel one)."""
    par = [s for s in samples if s.get("parallel_blocks", 0) > 0 and "response" in s]
    good = [s for s in par if s.get("correct")]
    return (good or par or [None])[0]


def write_report(out: Path, evals: dict, run_dirs: dict[str, Path], example_samples: list[dict], info: dict) -> dict:
    rows = stage_rows(evals)
    curves = plot_curves(run_dirs, out)
    stages_png = plot_stages(rows, out) if rows else None
    ex = example(example_samples)
    data = {"rows": rows, "info": info, "example": ex and {k: ex[k] for k in ("problem_id", "prompt", "response")}}
    (out / "report.json").write_text(json.dumps(data, indent=1))
    lines = ["# NPR pipeline report", "", info.get("title", ""), "", table(rows), ""]
    lines += [
        "Decoding: sequential (raw) = the model alone, nothing enforced and no latency budget (does it",
        "write the format itself?); sequential (plain prompt) = asked to solve step by step, without the",
        "NPR instruction; sequential = the schema enforced, decoded one token after another; parallel =",
        "the engine, steps of a block decoded as concurrent branches; serial = the parallel row's schema",
        "decoded one token after another with no latency budget (the speedup's reference). Every other",
        "row has the same latency budget (critical path). Same problems and seeds in every mode.",
        "avg@k / best@k: mean and any-correct over k samples per problem; format-valid: the response",
        "passes the format check; trigger: at least one block ran as >= 2 concurrent branches; speedup:",
        "wall-clock time of serial over parallel decoding. sr = the sequential-RL baseline (sequential",
        "SFT + RL on the same data and budgets). Definitions: README, Metrics.",
        "",
    ]
    if stages_png:
        lines += [f"![accuracy by stage]({stages_png})", ""]
    lines += ["## Learning curves", ""] + [f"![{c}]({c})" for c in curves] + [""]
    for stage, d in run_dirs.items():
        m = read_appended(d / "metrics.jsonl")
        if m:
            first, last = m[0], m[-1]
            keys = [k for k in CURVES.get(stage, []) if k in first and k in last]
            change = ", ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in keys)
            lines.append(f"- {stage}: {len(m)} steps; {change}")
    if ex:
        lines += ["", "## An example trajectory (Stage 3, parallel decoding)", "",
                  f"Problem: {ex['prompt']}  (correct: {bool(ex.get('correct'))})", "", "```",
                  tree_text(ex["response"]), "```"]  # fmt: skip
    lines += ["", *(f"- {k}: {v}" for k, v in info.items() if k != "title")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return data
