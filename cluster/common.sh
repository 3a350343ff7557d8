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
