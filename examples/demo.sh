#!/usr/bin/env bash
# The README's demo: the schema tools on example files, then the whole method on the embedded
# default world (npr demo: base -> Stage 1 -> distill -> Stage 2 -> Stage 3 -> evaluation -> report),
# then the engine benchmark. Rerunning resumes: finished stages are not redone.
set -eu
NPR=$(realpath "${1:-$(command -v npr)}")
cd "$(dirname "$0")"
echo "== npr check good.txt (well-formed two-branch block)"; $NPR check good.txt || true
echo; echo "== npr check bad.txt (a step and the takeaway are missing)"; $NPR check bad.txt || true
echo; echo "== npr topology tiny.txt (positions; steps 1 and 2 share positions and cannot see each other)"
$NPR topology tiny.txt

echo; echo "== npr demo: the whole pipeline on the default world (about 40 CPU minutes; resumable)"
$NPR demo --out ../runs/demo

echo; echo "== npr bench engine --config tiny (random tiny Qwen3; parallel vs sequential vs HF generate)"
$NPR bench engine --config tiny
