# Sourced by the SLURM scripts of this folder: the run's settings and the rendezvous, in one place.
# Everything here may be overridden from the environment: RUN=/shared/runs/x sbatch cluster/slurm_torchrun.sbatch
set -euo pipefail

# What every node must see at the same path: this repository, the shards, and the run folder (--output:
# checkpoints, `latest` and pruning are written by rank 0 alone; start-up stops if a node sees another folder).
REPO=${REPO:-$SLURM_SUBMIT_DIR}   # submit from the repository root
DATA=${DATA:-/shared/shards/imagenet}
RUN=${RUN:-/shared/runs/attnscale_small_24}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
MODEL=${MODEL:-attnscale_small_24}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TRAIN_ARGS=(--deepspeed_config "$DS_CONFIG" --model "$MODEL" --data "$DATA" --output "$RUN" ${EXTRA_ARGS:-})

# Rank 0's node and a port every node derives alike from the job id.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# The network interface the nodes reach each other on, if not the default route's (ip -br addr shows them):
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # the loader workers are processes; no thread oversubscription
cd "$REPO"
mkdir -p "$RUN"

# Preemption and the time limit (docs/reliability.md, "Signals, the time limit and requeue"). The recipes ask
# SLURM for USR2 LEAD seconds before the limit (`--signal=B:USR2@LEAD`): it reaches this batch shell alone, which
# forwards it to the step; srun passes it to every process of the step (launchers ignore it, see run_step).
# pretrain.py then saves at the next step boundary on every rank and exits with 75, "saved, resubmit me", and
# the job requeues itself (same job id; --open-mode=append keeps one log), at most MAX_REQUEUES times.
# SIGTERM (preemption, the limit itself) means "save now" too.
MAX_REQUEUES=${MAX_REQUEUES:-20}

# Run the step in the background so that bash runs its traps while it waits, forward USR2 and TERM to it, and
# requeue the job when the step says it saved. Usage: run_step srun … ; its exit status is the step's.
run_step() {
    # Rank 0 writes $RUN/resubmit beside exiting with 75, once every rank agreed to stop: the one sign to requeue
    # on (torchrun turns a worker's 75 into 1; srun returns the highest status, so one rank's 75 beside rank 0's 2,
    # a setting to fix, is no sign).
    rm -f "$RUN/resubmit"
    "$@" &
    local step=$! status=0
    trap 'echo "cluster/common.sh: USR2 received, passed on to the step" >&2; kill -USR2 $step 2>/dev/null || true' USR2
    trap 'echo "cluster/common.sh: TERM received, passed on to the step" >&2; kill -TERM $step 2>/dev/null || true' TERM
    while :; do
        status=0
        wait "$step" || status=$?
        kill -0 "$step" 2>/dev/null || break   # wait returned for a trapped signal: the step still runs
    done
    trap - USR2 TERM
    if [ -e "$RUN/resubmit" ]; then
        local restarts=${SLURM_RESTART_COUNT:-0}
        if [ "$restarts" -lt "$MAX_REQUEUES" ]; then
            echo "cluster/common.sh: the run saved and asked to be resubmitted: requeueing job $SLURM_JOB_ID" \
                 "(restart $((restarts + 1)) of at most MAX_REQUEUES=$MAX_REQUEUES)." >&2
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        fi
        echo "cluster/common.sh: the run saved, but job $SLURM_JOB_ID was requeued MAX_REQUEUES=$MAX_REQUEUES" \
             "times already: submit it again to continue." >&2
    fi
    return "$status"
}
