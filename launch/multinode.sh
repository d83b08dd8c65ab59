#!/usr/bin/env bash
# Run train.py on several machines: the same command on every node, joined by a c10d rendezvous.
#
#   launch/multinode.sh NNODES NODE_RANK RDZV_HOST[:PORT] [train.py flags...]
#
#   # node 0 (its address is the endpoint; it hosts the rendezvous store)
#   launch/multinode.sh 2 0 10.0.0.1:29400 --global-batch-size 256 --run-name big
#   # node 1
#   launch/multinode.sh 2 1 10.0.0.1:29400 --global-batch-size 256 --run-name big
#
# Environment: NPROC_PER_NODE (default: GPUs on this node, else 1), RDZV_ID (default "spine-<run>"; must be the
# same on every node and differ between concurrent jobs), MAX_RESTARTS (default 0), PYTHON_BIN_DIR (default
# .venv/bin). Every node needs the same code and data flags; --checkpoints-dir must be on a file system every
# node sees (rank 0 writes, every rank reads on --resume). With c10d the rendezvous assigns ranks: NODE_RANK is
# passed on, but torchrun only uses it for the static backend.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: launch/multinode.sh NNODES NODE_RANK RDZV_HOST[:PORT] [train.py flags...]" >&2
  exit 2
fi
nnodes=$1 node_rank=$2 endpoint=$3
shift 3
if ! [[ $nnodes =~ ^[1-9][0-9]*$ && $node_rank =~ ^[0-9]+$ ]] || (( node_rank >= nnodes )); then
  echo "multinode.sh: error: NNODES must be a positive integer and NODE_RANK in [0, NNODES), got $nnodes $node_rank" >&2
  exit 2
fi
[[ $endpoint == *:* ]] || endpoint="$endpoint:29400"

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${PYTHON_BIN_DIR:-$root/.venv/bin}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$bin/python" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi

exec "$bin/torchrun" \
  --nnodes="$nnodes" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --node-rank="$node_rank" \
  --rdzv-id="${RDZV_ID:-spine-job}" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$endpoint" \
  --max-restarts="${MAX_RESTARTS:-0}" \
  "$root/train.py" "$@"
