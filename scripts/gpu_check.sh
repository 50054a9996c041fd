#!/usr/bin/env bash
# GPU checks on one H200 (or H100), each variant one device call under 8 minutes that installs nothing:
#   VARIANT=speed  (default, ~7.5 min) ours next to TorchTitan 0.2.2 on the 8B-shaped 4-layer stack, full
#                  vocabulary, AdamW: S=8K no AC, 16K and 32K full AC; then the four speed changes of
#                  2026-11-26, each undone alone at 8K (eager loss, foreach clip-then-step, reshard
#                  always, three host syncs per step).
#   VARIANT=short  (~4 min, a rerun) the 8K and 32K pairs only.
#   VARIANT=long   (~5 min) memory at length, one step each: the 4-layer stack at 256K (full AC + tiled
#                  MLP), the whole Llama-3.2-3B with CPU offload at 32K, each with peak device memory, the
#                  estimator's peak and host RSS. The whole Llama-3-8B with CPU offload needs ~120 GiB of
#                  host RAM for its fp32 states alone (the estimator says so; the H200 machine has 128 GiB):
#                  it runs only when named, ONLY=whole_8b_cpu_offload_s32768, as the call's last step.
#                  512K-1M tokens take minutes per step on one GPU: one per call, with ONLY=.
#   VARIANT=checks (~6 min) attention parity on the CUDA kernels, the compiled BlockMask at 128K, ring
#                  efficiency, estimated vs measured memory.
# ONLY="name ..." runs just those steps of the variant, SKIP="name ..." leaves some out.
# Results (JSON, the logs' tails, summary.md) go to $OUT (default ./outputs/gpu_check).
#
# The anchor and torchdata come as wheels in .whl/ (carry: [".whl"]), put on PYTHONPATH as zip files:
#   echo /.whl/ >> .git/info/exclude; cp ../shared/gpu-baseline/anchor_torchtitan.py .whl/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
#     torchtitan==0.2.2 tyro docstring-parser typeguard shtab torchdata
# Without the anchor its steps are skipped; everything else runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./outputs/gpu_check}
LOGS=${LOGS:-/tmp/gpu_check_logs}  # full logs; $OUT gets their tails
VARIANT=${VARIANT:-speed}
mkdir -p "$OUT" "$LOGS"
WHEELS=$(ls "$PWD"/.whl/*.whl 2>/dev/null | tr '\n' ':')
export PYTHONPATH=$PWD:${WHEELS}${PYTHONPATH:-} PYTHONUNBUFFERED=1  # pure-Python wheels import as zip files
ANCHOR=""
if [ -f .whl/anchor_torchtitan.py ]; then  # the shared anchor, compiled runs only (its eager run doubles the time)
    ANCHOR=/tmp/anchor_torchtitan.py
    sed 's/^for compiled in (False, True):/for compiled in (True,):/' .whl/anchor_torchtitan.py > "$ANCHOR"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.log"
free -g | head -2 >> "$LOGS/gpu.log"

wanted() { [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]] && [[ " ${SKIP:-} " != *" $1 "* ]]; }
step() {  # step NAME SECONDS CMD...: run with a time limit, keep the log, never stop the script
    local name=$1 limit=$2; shift 2
    wanted "$name" || return 0
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "    rc=$rc in $((SECONDS - t0))s; tail:"; tail -n 3 "$LOGS/$name.log" | cut -c1-300
}
ours() {  # ours NAME SECONDS [bench_train args...]
    local name=$1 limit=$2; shift 2
    step "$name" "$limit" python3 scripts/bench_train.py --out "$OUT/$name.json" "$@"
}
anchor() {  # anchor NAME SECONDS S AC
    [ -n "$ANCHOR" ] || return 0
    mkdir -p "$OUT/$1"
    step "$1" "$2" env S="$3" AC="$4" OUT="$OUT/$1" python3 "$ANCHOR"
}
FULL_AC=(--activation_checkpoint.mode full)

case $VARIANT in
speed|short)
    # Most important first: a call cut short still returns what finished.
    ours ours_s8192 100 --steps 10 --warmup 3
    anchor anchor_s8192 90 8192 none
    if [ "$VARIANT" = speed ]; then
        ours ours_s16384_fullac 100 --steps 6 --warmup 2 --training.seq_len 16384 "${FULL_AC[@]}"
        anchor anchor_s16384_fullac 90 16384 full
    fi
    ours ours_s32768_fullac 110 --steps 5 --warmup 2 --training.seq_len 32768 "${FULL_AC[@]}"
    anchor anchor_s32768_fullac 100 32768 full
    if [ "$VARIANT" = speed ]; then
        ours ablate_eager_loss 80 --steps 6 --warmup 2 --ablate eager_loss
        ours ablate_foreach 80 --steps 6 --warmup 2 --optimizer.implementation foreach
        ours ablate_reshard 80 --steps 6 --warmup 2 --parallelism.fsdp_reshard_after_forward always
        ours ablate_host_syncs 80 --steps 6 --warmup 2 --ablate host_syncs
    fi ;;
long)
    ours long_4l_s262144 150 --steps 1 --warmup 1 --compile.enable false --training.seq_len 262144 \
        "${FULL_AC[@]}" --activation_checkpoint.tiled_mlp_shards 8
    ours whole_3b_cpu_offload_s32768 150 --steps 1 --warmup 1 --model.flavor 3B --model.n_layers 0 \
        --training.seq_len 32768 "${FULL_AC[@]}" --activation_checkpoint.tiled_mlp_shards 8 \
        --training.enable_cpu_offload true
    if [[ " ${ONLY:-} " == *" whole_8b_cpu_offload_s32768 "* ]]; then  # host RAM: see the header
        ours whole_8b_cpu_offload_s32768 170 --steps 1 --warmup 1 --model.flavor 8B --model.n_layers 0 \
            --training.seq_len 32768 "${FULL_AC[@]}" --activation_checkpoint.tiled_mlp_shards 8 \
            --training.enable_cpu_offload true
    fi ;;
checks)
    step parity 45 python3 scripts/gpu_attention_parity.py --out "$OUT/parity.json"
    step block_mask 60 python3 scripts/bench_block_mask.py --seq 131072 --modes compiled --out "$OUT/block_mask.json"
    step memory 60 python3 scripts/bench_memory.py --cases none,full_tiled --out "$OUT/memory.json"
    step cp_attention 120 python3 scripts/bench_cp_attention.py --out "$OUT/cp_attention.json" ;;
*)
    echo "VARIANT must be speed | short | long | checks, got '$VARIANT'" >&2; exit 2 ;;
esac
for f in "$LOGS"/*.log; do echo "=== $f"; tail -n 60 "$f"; done > "$OUT/logs.txt"
python3 scripts/gpu_summary.py "$OUT" "$LOGS" | tee "$OUT/summary.md"
