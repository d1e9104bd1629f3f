#!/usr/bin/env bash
# What exists so far, end to end: validate responses and lay out their parallel topology.
set -u
NPR=$(realpath "${1:-$(command -v npr)}")
cd "$(dirname "$0")"
echo "== npr check good.txt (well-formed two-branch block)"; $NPR check good.txt; echo "exit $?"
echo; echo "== npr check bad.txt (a step and the takeaway are missing)"; $NPR check bad.txt; echo "exit $?"
echo; echo "== npr check --json bad.txt"; $NPR check --json bad.txt; echo
echo; echo "== npr topology tiny.txt (positions; steps 1 and 2 share positions and cannot see each other)"
$NPR topology tiny.txt

echo; echo "== npr base (the default world's tiny base model: built once in a few CPU minutes, then reused)"
$NPR base --out ../runs/base
echo; echo "== npr generate on it, NPR instruction, parallel engine"
$NPR generate --model ../runs/base --seed 0 --max-tokens 200 --tree \
  --prompt "solve in parallel : write a guideline of plans , one step per plan , compare them in a takeaway , then box the answer . use 3 5 2 to make 16"

echo; echo "== npr eval on the Countdown test split: parallel vs sequential decoding, same run"
$NPR eval --model ../runs/base --bench countdown --limit 20 --n 4 --max-tokens 256 --compare-sequential --out ../runs/eval
echo; echo "== the raw base model (no structure masking, top-p 1), sequential decoding: the format is often wrong"
$NPR eval --model ../runs/base --bench countdown --limit 20 --n 4 --max-tokens 256 --mode sequential --no-enforce --top-p 1.0 \
  --out ../runs/eval-base-raw

echo; echo "== Stage 1 (NPR-Zero, DAPO) on the default world: the model learns the parallel format (~4 CPU minutes)"
resume=""; [ -f ../runs/stage1/checkpoints/latest.json ] && resume="--resume"
$NPR train rl --config ../configs/tiny/stage1.yaml model.path=../runs/base run.out=../runs/stage1 $resume
echo; echo "== after Stage 1: the same test problems, raw sequential decoding (top-p 1)"
$NPR eval --model ../runs/stage1/checkpoints/step-000040 --bench countdown --limit 20 --n 4 --max-tokens 256 \
  --mode sequential --no-enforce --out ../runs/eval-stage1

echo; echo "== npr bench engine --config tiny (random tiny Qwen3; parallel vs sequential vs HF generate)"
$NPR bench engine --config tiny
