#!/usr/bin/env bash
# One training rank under srun: torch.distributed's env from Slurm's task ids, then exec the command
# (so signals reach Python directly). MASTER_ADDR/MASTER_PORT come from the batch script.
#
#   srun bash launch/slurm/srun_rank.sh python launch/pretrain.py --config configs/pretrain/<x>.yaml
set -euo pipefail

# tasks on node $2 from a Slurm task-count list such as "2(x3),1" (node ids count from 0)
tasks_on_node() {
  local item count reps node=0
  for item in ${1//,/ }; do
    count=${item%%(*}
    reps=1
    [[ $item == *"(x"* ]] && reps=${item#*(x} && reps=${reps%)}
    if (( $2 < node + reps )); then echo "$count"; return; fi
    node=$((node + reps))
  done
  echo 1
}

# LOCAL_RANK picks the GPU (cuda:LOCAL_RANK) among those the task sees. With --gpus-per-task, --gpu-bind
# or a site-wide binding each task sees only its own GPU(s) in CUDA_VISIBLE_DEVICES, so its Slurm local
# id would be out of range: the task then uses the first device it sees.
local_device() {
  local visible=${CUDA_VISIBLE_DEVICES:-} count
  if [ -z "$visible" ] || [ "$visible" = NoDevFiles ]; then echo "$SLURM_LOCALID"; return; fi
  count=$(tr ',' '\n' <<<"$visible" | grep -c .)
  if (( count < LOCAL_WORLD_SIZE || count == 1 )); then echo 0; else echo "$SLURM_LOCALID"; fi
}

export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS NODE_RANK=$SLURM_NODEID
LOCAL_WORLD_SIZE=$(tasks_on_node "${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}" "$SLURM_NODEID")
LOCAL_RANK=$(local_device)
export LOCAL_WORLD_SIZE LOCAL_RANK
if [ "$LOCAL_RANK" != "$SLURM_LOCALID" ]; then
  echo "gristmill: rank $RANK sees only CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES; it uses the first (LOCAL_RANK=0)" >&2
fi
# CPU threads per rank: what Slurm gave the task (--cpus-per-task), unless the user chose
if [ -n "${SLURM_CPUS_PER_TASK:-}" ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
fi
exec "$@"
