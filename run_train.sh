#!/usr/bin/env bash
# Train on one node: ./run_train.sh [--config NAME.toml] [--section.key value ...]
#   NGPU      processes to start (default: every visible GPU; with none, 4 CPU processes over gloo)
#   LOG_RANK  ranks whose output is shown (default 0; e.g. 0,1)
# Multi-node: see README ("Several nodes") and scripts/slurm_train.sh.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

# A fresh machine with only Python and pip: install what is missing first.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install -q "torch==2.13.0"
fi
if ! "$PYTHON" -c "import torchtitan_sp, torchdata, tiktoken, tensorboard" 2>/dev/null; then
    "$PYTHON" -m pip install -q -e .
fi

if [ -z "${NGPU:-}" ]; then
    NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    [ "$NGPU" -gt 0 ] || NGPU=4
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Validate before starting processes: bad input exits 2 with one line; --help and dry runs end here.
rc=0
WORLD_SIZE=$NGPU "$PYTHON" -m torchtitan_sp.validate "$@" || rc=$?
if [ "$rc" -eq 3 ]; then exit 0; fi
if [ "$rc" -ne 0 ]; then exit "$rc"; fi

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
    --local-ranks-filter "${LOG_RANK:-0}" --role rank --tee 3 \
    -m torchtitan_sp.train "$@"
