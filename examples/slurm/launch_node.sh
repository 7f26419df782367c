#!/usr/bin/env bash
# One torchrun agent on this node; run on every node of the job (srun --ntasks-per-node=1, see
# pretrain_mosaic.sbatch). The agents meet through the c10d rendezvous on HEAD_NODE and start
# NPROC_PER_NODE workers each; a failed worker restarts the whole group up to MAX_RESTARTS
# times, and the workers resume from the latest complete checkpoint (--save D --load D).
#
# Environment: NNODES, NPROC_PER_NODE, HEAD_NODE (a host name or address every node reaches),
# RDZV_PORT, RDZV_ID (the same on every node: the job id), MAX_RESTARTS.
# Arguments: pretrain_mosaic.py's.
#
# tests/faults/test_two_hosts.py runs this very file on two hosts (network namespaces).
set -euo pipefail
: "${NNODES:?}" "${NPROC_PER_NODE:?}" "${HEAD_NODE:?}" "${RDZV_PORT:?}" "${RDZV_ID:?}" "${MAX_RESTARTS:?}"

exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:$RDZV_PORT" --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" pretrain_mosaic.py "$@"
