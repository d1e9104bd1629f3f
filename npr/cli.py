"""The `npr` command line."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import typer

from npr import grammar, topology
from npr.tags import TAGS

app = typer.Typer(
    help="NPR: teach language models to reason in parallel (Map-Process-Reduce) and run them fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


def main() -> None:
    app()
