#!/bin/bash
# DeepSpeed's ssh launcher (`deepspeed --hostfile H pretrain.py …`, pdsh over ssh) passes on to the ranks only
# the variables whose names start with NCCL, PYTHON, UCX, MV2 or MLFLOW (deepspeed/launcher/runner.py): a
# GLOO_SOCKET_IFNAME or OMP_NUM_THREADS set where you launch reaches no rank. It also exports every KEY=VALUE line
# of .deepspeed_env, read from $HOME and then from the current folder (or of the file DS_ENV_FILE names). This
# writes there the variables of your shell that the ranks need, so that they reach every node:
#     export GLOO_SOCKET_IFNAME=eth1 OMP_NUM_THREADS=1
#     bash cluster/deepspeed_env.sh && deepspeed --hostfile hosts pretrain.py …
# antismooth stops at start-up, naming the node and the variable, when the nodes still disagree.
set -euo pipefail
out=${DS_ENV_FILE:-.deepspeed_env}
NAMES="GLOO_SOCKET_IFNAME TP_SOCKET_IFNAME OMP_NUM_THREADS MKL_NUM_THREADS LD_LIBRARY_PATH CUDA_HOME \
CUDA_VISIBLE_DEVICES DEEPSPEED_TIMEOUT WDS_SEED CUBLAS_WORKSPACE_CONFIG NVIDIA_TF32_OVERRIDE \
TORCH_ALLOW_TF32_CUBLAS_OVERRIDE HF_HOME"
PREFIXES="TORCH_NCCL_ TORCH_DISTRIBUTED_ ANTISMOOTH_"
: > "$out.tmp"
for name in $(compgen -e | sort); do
    wanted=0
    for n in $NAMES; do [ "$name" = "$n" ] && wanted=1; done
    for p in $PREFIXES; do [[ "$name" == "$p"* ]] && wanted=1; done
    [ "$wanted" = 1 ] || continue
    value=${!name}
    if [[ "$value" =~ [[:space:]] ]]; then   # DeepSpeed writes `export KEY=VALUE;` unquoted for pdsh
        echo "cluster/deepspeed_env.sh: $name holds white space, which DeepSpeed's launcher cannot pass on; skipped." >&2
        continue
    fi
    printf '%s=%s\n' "$name" "$value" >> "$out.tmp"
done
mv "$out.tmp" "$out"
echo "cluster/deepspeed_env.sh: $(wc -l < "$out") variables in $out: $(cut -d= -f1 "$out" | tr '\n' ' ')"
