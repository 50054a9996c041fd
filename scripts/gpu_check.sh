#!/usr/bin/env bash
# Every GPU check (one H100): attention parity on the CUDA kernels, training throughput next to
# TorchTitan 0.2.2 on the same card (with and without clipping), ring-attention efficiency, the
# longest sequence on one GPU, and estimated vs measured memory. Results (JSON + logs) go to
# $OUT (default ./outputs/gpu_check); the last thing printed is a summary table.
# All steps at their limits take ~18 minutes, more than one 10-minute device call: split with SKIP, e.g.
#   SKIP="long_seq packed_s131072 memory parity block_mask cp_attention" bash scripts/gpu_check.sh   # ~7 min
#   SKIP="ours_s8192 anchor_s8192 ours_s8192_noclip ablate_reshard ablate_foreach" bash scripts/gpu_check.sh
# (the second call: long sequences, packed text at 128K, memory, parity, BlockMask, ring efficiency)
#
#   bash scripts/gpu_check.sh            # needs: a CUDA GPU, torch >= 2.11, torchdata
# Optional: wheels in .whl/ (torchdata, and torchtitan 0.2.2 with its dependencies for the anchor,
# plus .whl/anchor_torchtitan.py) are installed into /tmp/site first; without the anchor it is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./outputs/gpu_check}
LOGS=${LOGS:-/tmp/gpu_check_logs}  # full logs; $OUT gets their tails (the device returns at most 8 files)
mkdir -p "$OUT" "$LOGS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.log"

step() {  # step NAME SECONDS CMD...: run with a time limit, keep the log, never stop the script
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "    rc=$rc in $((SECONDS - t0))s; tail:"; tail -n 3 "$LOGS/$name.log" | cut -c1-300
}

# Most important first: a call cut short still returns what finished. SKIP="name ..." skips steps.
skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }
skip ours_s8192 || step ours_s8192 110 python3 scripts/bench_train.py --steps 10 --warmup 3 --out "$OUT/ours_s8192.json" \
    --profile "$OUT/profile_s8192.txt"
if [ -f .whl/anchor_torchtitan.py ] && ! skip anchor_s8192; then
    step anchor_s8192 90 env S=8192 COMPILED_ONLY=1 OUT="$OUT" python3 .whl/anchor_torchtitan.py
fi
# The anchor's exact work: it clips no gradients (ours clips at training.max_norm = 1.0 by default).
skip ours_s8192_noclip || step ours_s8192_noclip 100 python3 scripts/bench_train.py --steps 10 --warmup 3 \
    --training.max_norm 0 --out "$OUT/ours_s8192_noclip.json"
# What two of the 2026-11-26 speed changes are worth: each undone alone.
skip ablate_reshard || step ablate_reshard 100 python3 scripts/bench_train.py --steps 10 --warmup 3 \
    --parallelism.fsdp_reshard_after_forward always --out "$OUT/ablate_reshard.json"
skip ablate_foreach || step ablate_foreach 100 python3 scripts/bench_train.py --steps 10 --warmup 3 \
    --optimizer.implementation foreach --out "$OUT/ablate_foreach.json"
skip long_seq || step long_seq 130 python3 scripts/bench_train.py --steps 1 --warmup 1 --compile.enable false \
    --training.seq_len 262144 --activation_checkpoint.mode full --activation_checkpoint.tiled_mlp_shards 8 \
    --out "$OUT/ours_s262144.json"
# Packed real text at 128K on one GPU: FlexAttention with the compiled document BlockMask, in training.
skip packed_s131072 || step packed_s131072 150 python3 scripts/bench_train.py --steps 2 --warmup 1 \
    --compile.enable false --training.dataset stdlib --training.seq_len 131072 \
    --activation_checkpoint.mode full --activation_checkpoint.tiled_mlp_shards 8 --out "$OUT/ours_packed_s131072.json"
skip memory || step memory 60 python3 scripts/bench_memory.py --cases none,full_tiled --out "$OUT/memory.json"
skip parity || step parity 45 python3 scripts/gpu_attention_parity.py --out "$OUT/parity.json"
skip block_mask || step block_mask 60 python3 scripts/bench_block_mask.py --seq 131072 --modes compiled \
    --out "$OUT/block_mask.json"
skip cp_attention || step cp_attention 120 python3 scripts/bench_cp_attention.py --out "$OUT/cp_attention.json"
for f in "$LOGS"/*.log; do echo "=== $f"; tail -n 60 "$f"; done > "$OUT/logs.txt"
python3 scripts/gpu_summary.py "$OUT" "$LOGS" | tee "$OUT/summary.md"
