#!/usr/bin/env bash
# The paper's setting on ONE node with 8 GPUs: teacher traces, data-parallel SFT, data-parallel GRPO +
# on-policy distillation (DeepSpeed ZeRO-2 by default: configs/paper_1x8_gpu.yaml), then eval.
#
#   scripts/launch_1x8.sh [all|traces|sft|train|eval] [key.sub=value ...]
#
# Environment: CONFIG (default configs/paper_1x8_gpu.yaml), NPROC_PER_NODE (8), MASTER_PORT (29500),
# LAUNCHER=torchrun (default) | deepspeed (the DeepSpeed launcher: `deepspeed --no_local_rank --module vold ...`).
# make-traces and eval run in one process (they sample; they are not data-parallel).
# CPU smoke test of this script (gloo, 2 processes, tiny models; see docs/distributed.md):
#   python -m vold.testing runs/tiny && NPROC_PER_NODE=2 CONFIG=configs/tiny_cpu.yaml scripts/launch_1x8.sh sft
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/paper_1x8_gpu.yaml}
NPROC=${NPROC_PER_NODE:-8}
PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-torchrun}
stage=${1:-all}
[ $# -gt 0 ] && shift

data_parallel() {  # vold <stage> on this node's NPROC processes
  if [ "$LAUNCHER" = deepspeed ]; then
    deepspeed --num_gpus "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" --no_local_rank --module vold "$@"
  else
    torchrun --nnodes 1 --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" -m vold "$@"
  fi
}

output_dir() {  # the last line: importing transformers may log to stdout (e.g. DeepSpeed's accelerator notice)
  python -c "import sys; from vold.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).output_dir)" \
    "$CONFIG" "$@" | tail -n 1
}

case "$stage" in
  traces) python -m vold make-traces --config "$CONFIG" "$@" ;;
  sft) data_parallel sft --config "$CONFIG" "$@" ;;
  train) data_parallel train --config "$CONFIG" "$@" ;;
  eval) python -m vold eval --config "$CONFIG" "eval.model=$(output_dir "$@")/rl/final" "$@" ;;
  all)
    python -m vold make-traces --config "$CONFIG" "$@"
    data_parallel sft --config "$CONFIG" "$@"
    data_parallel train --config "$CONFIG" "$@"
    python -m vold eval --config "$CONFIG" "eval.model=$(output_dir "$@")/rl/final" "$@"
    ;;
  *) echo "usage: $0 [all|traces|sft|train|eval] [key.sub=value ...]" >&2; exit 2 ;;
esac
