#!/usr/bin/env bash
# Pretraining on one machine, one process per GPU (or N CPU processes with gloo):
#
#   launch/torchrun.sh N CONFIG [key=value ...]
#   e.g. launch/torchrun.sh 8 configs/pretrain/base.toml out=runs/pretrain/base
#
# Run it from an environment where `torchrun` and mie are installed (`source .venv/bin/activate`), or
# point TORCHRUN at one (TORCHRUN=.venv/bin/torchrun). Everything after CONFIG is passed on as mie
# overrides. On a cluster use launch/slurm/pretrain.sbatch instead (several nodes, requeue).
#
# Stopping it with a checkpoint: `kill -USR1 <pid of this script>` (or -TERM). torchrun forwards SIGTERM,
# and here also SIGUSR1 (--signals-to-handle; without it torchrun dies of SIGUSR1 and leaves its workers
# running unsignalled), to every worker; the workers agree at the next step boundary, write a checkpoint
# and exit 75. torchrun waits up to SHUTDOWN_TIMEOUT seconds for that, then kills them, and itself exits 1
# (to torchrun, 75 is a failed child). Ctrl-C (SIGINT) stops at once, without a checkpoint. Start the same
# command again to continue: checkpoint.resume=auto (the default) takes `latest`.
#
# Settings (environment):
#   TORCHRUN          the torchrun executable (default: torchrun on PATH)
#   SHUTDOWN_TIMEOUT  seconds the workers get to checkpoint after a signal (default 110)
#   OMP_NUM_THREADS   CPU threads per worker (default 1 when N > 1, as torchrun itself would set)
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 NPROC CONFIG [key=value ...]   (NPROC: processes on this machine, e.g. its GPU count)" >&2
    exit 2
fi
nproc=$1
config=$2
shift 2

if [[ "$nproc" -gt 1 ]]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# exec: a signal sent to this script's pid reaches torchrun itself.
exec "${TORCHRUN:-torchrun}" \
    --standalone --nnodes=1 --nproc-per-node="$nproc" \
    --max-restarts=0 \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-110}" \
    -m mie.launch.cli pretrain "$config" "$@"
