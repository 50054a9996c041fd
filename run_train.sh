#!/usr/bin/env bash
# Train on one node: ./run_train.sh [--config NAME.toml] [--section.key value ...]
# Relative paths (--config ./my.toml, dataset, dump folder) are relative to where you run it;
# a bare --config name is looked up in this repo's train_configs/.
#   NGPU              processes to start (default: every visible GPU; with none, 4 CPU processes over gloo)
#   LOG_RANK          ranks whose output is shown (default 0; e.g. 0,1)
#   SHUTDOWN_TIMEOUT  seconds the workers get after SIGTERM or Ctrl-C to finish the step and save a checkpoint
#                     before they are killed (default 300); the run then exits 143
#   NNODES            nodes (default 1). With more, run the same command with the same NNODES and
#   RDZV_ENDPOINT     HOST:PORT on every node (c10d rendezvous: the first launcher to arrive serves it)
#   RDZV_TIMEOUT      seconds to wait for every node to arrive (default 600)
#   PYTHON            interpreter (default: the active environment's python3, else .venv if made, else python3)
# Ctrl-C with checkpoint.enable: the workers finish the step, save and exit 130; a second Ctrl-C aborts.
# Multi-node: see README ("Several nodes") and scripts/slurm_train.sh.
set -euo pipefail
REPO=$(cd "$(dirname "$0")" && pwd)
# This checkout's package, not another one that happens to be installed.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

bad_input() { echo "error: $1" >&2; exit 2; }

# A fresh machine with only Python and pip: install what is missing first (into $REPO/.venv when the
# system's Python is externally managed; scripts/python_env.sh says which Python is used and why).
source "$REPO/scripts/python_env.sh"
DEPS="torchtitan_sp torchdata tiktoken tensorboard"
missing=$("$PYTHON" -c 'import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError:
        print(name)' torch $DEPS 2>/dev/null) || bad_input "PYTHON=$PYTHON does not run"
if [[ " $missing " == *" torch "* ]]; then
    pip_install torch "torch is not installed for $PYTHON; a few GB, once" "torch==2.13.0"
fi
if [ -n "${missing/torch/}" ]; then
    pip_install "${DEPS// /, }" "missing: $(echo $missing); this package's dependencies" -e "$REPO"
fi

if [ -z "${NGPU:-}" ]; then
    export TORCHTITAN_SP_NGPU_DEFAULTED=1  # validation then says to set NGPU when the world size does not fit
    NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    [ "$NGPU" -gt 0 ] || NGPU=4
fi
[[ "$NGPU" =~ ^[1-9][0-9]*$ ]] || bad_input "NGPU=$NGPU: must be a whole number >= 1 (processes to start)"
LOG_RANK=${LOG_RANK:-0}
[[ "$LOG_RANK" =~ ^[0-9]+(,[0-9]+)*$ ]] || bad_input "LOG_RANK=$LOG_RANK: must be ranks like 0 or 0,1"
for r in ${LOG_RANK//,/ }; do
    [ "$((10#$r))" -lt "$NGPU" ] || bad_input "LOG_RANK=$LOG_RANK: each rank must be below NGPU=$NGPU"
done
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}
[[ "$SHUTDOWN_TIMEOUT" =~ ^[0-9]+$ ]] || bad_input "SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT: must be whole seconds"
NNODES=${NNODES:-1}
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || bad_input "NNODES=$NNODES: must be a whole number >= 1 (nodes)"
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}
[[ "$RDZV_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || bad_input "RDZV_TIMEOUT=$RDZV_TIMEOUT: must be whole seconds >= 1"
LAUNCH=(--standalone)
if [ "$NNODES" -gt 1 ]; then
    [[ "${RDZV_ENDPOINT:-}" =~ ^[^:]+:[0-9]+$ ]] ||
        bad_input "RDZV_ENDPOINT=${RDZV_ENDPOINT:-}: with NNODES=$NNODES, give HOST:PORT of the rendezvous (same on all nodes)"
    LAUNCH=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT"
            --rdzv_conf "join_timeout=$RDZV_TIMEOUT")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} NNODES RDZV_TIMEOUT RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
# Coloured metric lines only on a terminal (the workers' own stdout is torchrun's pipe, so they ask here).
if [ -z "${TORCHTITAN_SP_COLOR:-}" ]; then
    if [ -t 1 ]; then export TORCHTITAN_SP_COLOR=1; else export TORCHTITAN_SP_COLOR=0; fi
fi

# Validate before starting processes: bad input exits 2 with one line; --help and dry runs end here.
rc=0
WORLD_SIZE=$((NGPU * NNODES)) NPROC_PER_NODE=$NGPU "$PYTHON" -m torchtitan_sp.validate "$@" || rc=$?
if [ "$rc" -eq 3 ]; then exit 0; fi
if [ "$rc" -ne 0 ]; then exit "$rc"; fi

# torchrun, except that a stop by signal exits 128 + signal (143 for SIGTERM) instead of a traceback:
# torchrun has then passed the signal on and waited up to SHUTDOWN_TIMEOUT for the workers to save.
# Workers signalled directly save, then exit 143 (SIGTERM) or 130 (Ctrl-C) themselves: a stop, not a failure.
# A failure: one line per failed rank, a rank killed by a signal first (SIGKILL: likely the OOM killer);
# the tracebacks stay in each rank's error file.
exec "$PYTHON" -c '
import atexit, os, shutil, sys, tempfile
# torchrun copies the first failure'"'"'s error file here (instead of logging that the launcher has none)
parent = tempfile.mkdtemp()
atexit.register(shutil.rmtree, parent, True)
os.environ["TORCHELASTIC_ERROR_FILE"] = os.path.join(parent, "error.json")
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
from torch.distributed.run import main
try:
    main()
except SignalException as e:
    sys.exit(128 + e.sigval)
except RendezvousTimeoutError:
    nnodes, endpoint, timeout = (os.environ[k] for k in ("NNODES", "RDZV_ENDPOINT", "RDZV_TIMEOUT"))
    print(f"error: not every node arrived at the rendezvous {endpoint} within RDZV_TIMEOUT={timeout} s: run the "
          f"same command with NNODES={nnodes} and RDZV_ENDPOINT={endpoint} on each of the {nnodes} nodes",
          file=sys.stderr)
    sys.exit(1)
except ChildFailedError as e:
    codes = {f.exitcode for f in e.failures.values()}
    if codes in ({143}, {130}):
        sys.exit(codes.pop())
    print(f"error: the run failed on {len(e.failures)} rank(s):", file=sys.stderr)
    for rank, f in sorted(e.failures.items(), key=lambda kv: (kv[1].exitcode >= 0, kv[1].timestamp, kv[0])):
        if f.exitcode < 0:
            what = f"killed by {f.signal_name()} (pid {f.pid})"
            if f.signal_name() == "SIGKILL":
                what += "; it may have been the out-of-memory killer (see dmesg or journalctl -k)"
        else:
            message = f.message["message"] if isinstance(f.message, dict) else str(f.message)
            first_line = (message.splitlines() or [""])[0]
            what = f"exit code {f.exitcode}: {first_line}"
            if os.path.isfile(f.error_file):
                what += f" (traceback: {f.error_file})"
        print(f"  rank {rank}: {what}", file=sys.stderr)
    sys.exit(1)
' "${LAUNCH[@]}" --nproc_per_node="$NGPU" --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
    --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
    -m torchtitan_sp.train "$@"
