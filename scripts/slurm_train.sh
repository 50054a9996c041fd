#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, rendezvous on the first node.
#   sbatch --nodes 4 scripts/slurm_train.sh --config llama8b_cp4.toml --parallelism.context_parallel_degree 8
# On SIGTERM (time limit, scancel) the workers finish the step and save a checkpoint; torchrun waits
# SHUTDOWN_TIMEOUT seconds (default 300) for that, but SLURM kills KillWait seconds (a site setting, often 30)
# after its SIGTERM: for longer saves have the signal sent early, e.g. sbatch --signal=TERM@360.
#SBATCH --job-name=torchtitan_sp
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=1
# Validate once (exit 2 on bad input) with the job's world size before starting every node.
WORLD_SIZE=$((SLURM_NNODES * GPUS_PER_NODE)) NPROC_PER_NODE=$GPUS_PER_NODE python3 -m torchtitan_sp.validate "$@" || { rc=$?; [ "$rc" -eq 3 ] && exit 0; exit "$rc"; }
srun python3 -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:29500" --rdzv_id "$SLURM_JOB_ID" \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" \
    --local-ranks-filter 0 --role rank --tee 3 \
    -m torchtitan_sp.train "$@"
