#!/usr/bin/env bash
# torchrun launcher for `python -m trainer` (DDP; gloo on CPU, nccl on GPU). Every argument goes to the trainer.
#   NPROC=8 launch/torchrun.sh +experiment=quickstart                      # one node, 8 processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh +experiment=...   # on node 0 (node 1: NODE_RANK=1)
# All ranks of a job share one run directory: TOKENSEL_RUN_ID (set it to the same value on every node), else the
# launcher's job id, else the experiment name -- never the clock.
set -euo pipefail
exec python -m torch.distributed.run \
  --nproc_per_node="${NPROC:-1}" \
  --nnodes="${NNODES:-1}" \
  --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-29500}" \
  -m trainer "$@"
