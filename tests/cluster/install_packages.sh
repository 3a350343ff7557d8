#!/bin/bash
# The Debian packages the cluster tests need (tests/cluster/), installed when missing, as root on Debian/Ubuntu
# (CI runs `make test` so). Elsewhere it does nothing: those tests skip with one line saying how to enable them.
set -euo pipefail
PACKAGES=(slurmd slurmctld slurm-client munge pdsh openssh-server)
COMMANDS=(slurmd slurmctld sbatch munged pdsh sshd)
missing=0
for command in "${COMMANDS[@]}"; do
    command -v "$command" > /dev/null || [ -x "/usr/sbin/$command" ] || missing=1
done
[ "$missing" = 1 ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
    echo "cluster tests: not root on Debian/Ubuntu, so ${PACKAGES[*]} are not installed; those tests will skip."
    exit 0
fi
echo "cluster tests: installing ${PACKAGES[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${PACKAGES[@]}"
