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

export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID NODE_RANK=$SLURM_NODEID
LOCAL_WORLD_SIZE=$(tasks_on_node "${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}" "$SLURM_NODEID")
export LOCAL_WORLD_SIZE
# CPU threads per rank: what Slurm gave the task (--cpus-per-task), unless the user chose
if [ -n "${SLURM_CPUS_PER_TASK:-}" ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
fi
exec "$@"
