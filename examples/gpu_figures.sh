#!/usr/bin/env bash
# The GPU figures of issue 14, one part per call so each fits a short lease:
#   bash examples/gpu_figures.sh OUT_DIR [part ...]
# parts: parity stress sweep-0.6b sweep-4b decode pages train (default: all, in that order).
# Each part writes OUT_DIR/<part>.json (the figures) and OUT_DIR/<part>.log (what it printed).
set -euo pipefail
out=${1:?usage: gpu_figures.sh OUT_DIR [part ...]}
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(parity stress sweep-0.6b sweep-4b decode pages train)
npr=${NPR:-python3 -m npr}  # from the repository root, as the GPU machine runs it
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv >"$out/gpu.txt" 2>&1 || true

run() {  # run PART CMD...: JSON to PART.json, stderr and timing to PART.log
    local part=$1
    shift
    echo "== $part: $*" | tee -a "$out/$part.log"
    local t0=$SECONDS
    "$@" >"$out/$part.json" 2>>"$out/$part.log"
    echo "== $part: $((SECONDS - t0)) s" | tee -a "$out/$part.log"
}

for part in "${parts[@]}"; do
    case $part in
        # the flex kernel against the sdpa reference on the same replayed trajectories, in bf16
        parity)
            run parity-flex $npr bench engine --config qwen3-0.6b-shape --attention flex --requests 8 --json
            run parity-sdpa $npr bench engine --config qwen3-0.6b-shape --attention sdpa --requests 8 --json ;;
        # the compiled flex kernel under random schedules, arrivals and aborts against the sdpa
        # reference (fp32: bf16 kernels may round a near-tie apart); prints a summary, exits 1 on a failure
        stress)
            echo "== stress" | tee -a "$out/stress.log"
            python3 examples/engine_stress.py --minutes 4 --attention flex 2>&1 | tail -n 40 | tee -a "$out/stress.log" ;;
        sweep-0.6b) run sweep-0.6b $npr bench engine --config qwen3-0.6b-shape --sweep --repeats 3 --json ;;
        sweep-4b) run sweep-4b $npr bench engine --config qwen3-4b-shape --sweep --repeats 2 --json ;;
        decode)
            run decode-0.6b $npr bench decode --config qwen3-0.6b-shape --json
            run decode-4b $npr bench decode --config qwen3-4b-shape --json ;;
        # the flex kernel's key/value block is one page: larger pages, fewer and larger blocks
        pages)
            for ps in 16 64 128; do
                run pages-$ps $npr bench decode --config qwen3-4b-shape --page-size $ps --batch 1 --batch 16 \
                    --prompt-tokens 8192 --no-hf --json
            done ;;
        train)
            run train-4b $npr bench train --config qwen3-4b-shape --length 8192 --length 16384 --length 32768 --json ;;
        *) echo "unknown part: $part (parity, stress, sweep-0.6b, sweep-4b, decode, pages, train)" >&2; exit 2 ;;
    esac
done
