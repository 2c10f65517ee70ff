#!/usr/bin/env bash
# The paper's setting on TWO nodes with 8 GPUs each (16 ranks): run this script on both nodes, with
#
#   NODE_RANK=0|1            this node's index
#   MASTER_ADDR=<address>    node 0's address, reachable from node 1 (the c10d rendezvous / NCCL bootstrap)
#   MASTER_PORT=29500        a free TCP port on node 0
#
#   scripts/launch_2x8.sh [sft|train] [key.sub=value ...]          (default: train)
#
# output_dir (configs/paper_2x8_gpu.yaml: runs/paper_2x8) and the data/model paths must be on a filesystem
# both nodes share: rank 0 writes checkpoints and logs, every rank reads the checkpoint it resumes from, and
# DeepSpeed writes each rank's optimizer partition into the same checkpoint folder. Run make-traces and
# eval on one node (scripts/launch_1x8.sh traces|eval with CONFIG=configs/paper_2x8_gpu.yaml).
# Environment: CONFIG (default configs/paper_2x8_gpu.yaml), NPROC_PER_NODE (8), NNODES (2),
# LAUNCHER=torchrun (default) | deepspeed (needs a hostfile, HOSTFILE, and passwordless ssh: run it on node 0 only).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/paper_2x8_gpu.yaml}
NPROC=${NPROC_PER_NODE:-8}
NNODES=${NNODES:-2}
PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-torchrun}
stage=${1:-train}
[ $# -gt 0 ] && shift
case "$stage" in
  sft|train) ;;
  *) echo "usage: $0 [sft|train] [key.sub=value ...]" >&2; exit 2 ;;
esac

if [ "$LAUNCHER" = deepspeed ]; then
  deepspeed --hostfile "${HOSTFILE:?set HOSTFILE (lines 'host slots=8')}" --num_nodes "$NNODES" \
    --num_gpus "$NPROC" --master_addr "${MASTER_ADDR:?}" --master_port "$PORT" --no_local_rank \
    --module vold "$stage" --config "$CONFIG" "$@"
else
  torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK (0 or 1)}" --nproc_per_node "$NPROC" \
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR (node 0)}" --master_port "$PORT" \
    -m vold "$stage" --config "$CONFIG" "$@"
fi
