# Shared by the launch/slurm/*.sbatch scripts (sourced, never run): environment, rendezvous,
# signal forwarding and requeue. The sbatch scripts hold only #SBATCH resources and one call.
#
# Why srun starts one task per rank (per GPU) rather than one `deepspeed` launcher per node:
# Slurm then signals every rank itself (preemption USR1, time-limit TERM), while the deepspeed
# runner forwards nothing and its launch.py forwards TERM rank by rank with 30 s waits; srun's
# exit status is the ranks' own, and per-rank logs come from `srun --output ...%t`. No ssh/pdsh.

GM_REQUEUE_EXIT=75   # the trainer's exit status after a signal-triggered checkpoint (pipeline/runtime/faults.py)

gm_log() { echo "gristmill[$(date +%H:%M:%S)]: $*"; }

gm_env() {
  # Python: $GRISTMILL_PYTHON, else the checkout's .venv, else python3 on PATH. The checkout must be
  # on a filesystem every node sees (srun runs the same paths there).
  if [ -n "${GRISTMILL_PYTHON:-}" ]; then GM_PY=$GRISTMILL_PYTHON
  elif [ -x "$PWD/.venv/bin/python" ]; then GM_PY=$PWD/.venv/bin/python; export PATH="$PWD/.venv/bin:$PATH"
  else GM_PY=$(command -v python3); fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  # CPU-only nodes: DeepSpeed's CPU accelerator (gloo) instead of probing for a GPU
  if [ -z "${DS_ACCELERATOR:-}" ] && ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
    export DS_ACCELERATOR=cpu
  fi
  # Ops DeepSpeed compiles at run time (CPU Adam for offload, the CPU collective op) go to a folder on
  # each node's own disk: on a shared filesystem, ranks of several nodes would race on one build, and a
  # build for one CPU model crashes (SIGILL) on nodes with another. Same path on every node, each its own.
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/gristmill-torch-extensions-$(id -u)}
  # srun no longer takes --cpus-per-task from the job (Slurm >= 22.05): give the ranks' step the CPUs
  # the job asked for per task, or every rank gets one CPU (ZeRO-3 hooks, NCCL and loader threads starve)
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
}

gm_log_network() {
  # The network settings the ranks inherit (sbatch passes the submitting shell's environment on):
  # NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ... are set by the user or the site, never here.
  local vars
  vars=$(env | grep -E '^(NCCL|GLOO|TORCH_NCCL|UCX|FI)_[A-Z_]*=' | sort | tr '\n' ' ')
  gm_log "network: ${vars:-no NCCL_*/GLOO_* settings (NCCL picks interfaces itself; see README, Run on a cluster)}"
}

gm_job_port() {
  # gm_job_port SALT [EPHEMERAL_RANGE]: a TCP port for this job, the same in every task without talking,
  # outside the kernel's ephemeral range (default 32768-60999), where any outgoing connection may
  # already hold it. SALT varies it (the restart count: a requeued try gets a fresh port).
  local range=${2:-} lo hi base=20000 span
  [ -n "$range" ] || range=$(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo "32768 60999")
  read -r lo hi <<<"$range"
  if [ "$lo" -ge $((base + 1000)) ]; then
    span=$((lo - base))  # below the ephemeral range: 20000-32767 by default
  elif [ "$hi" -le 64535 ]; then
    base=$((hi + 1)) span=$((65536 - hi - 1))  # above it
  else
    span=12768  # the range covers nearly every port: nothing is safe, keep the usual block
    gm_log "warning: the ephemeral port range $lo-$hi leaves no free block; set MASTER_PORT" >&2
  fi
  echo $((base + (SLURM_JOB_ID * 7 + $1) % span))
}

gm_rendezvous() {
  # Rank 0 runs on the allocation's first node; its NodeAddr is what other nodes can reach
  # (it defaults to the node name on most clusters). The port is derived from the job id, so
  # concurrent jobs differ and every task agrees without talking; set MASTER_PORT to force one.
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  addr=$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  export MASTER_ADDR=${addr:-$first}
  export MASTER_PORT=${MASTER_PORT:-$(gm_job_port "${SLURM_RESTART_COUNT:-0}")}
}

gm_check_gpus() {
  # One task per GPU is the layout; say so when the resources ask for something else.
  local tasks=${SLURM_NTASKS_PER_NODE:-} gpus=${SLURM_GPUS_ON_NODE:-}
  if [ -n "$gpus" ] && [ -n "$tasks" ] && [ "$gpus" != "$tasks" ]; then
    gm_log "warning: $gpus GPUs but $tasks tasks per node; give --ntasks-per-node equal to --gpus-per-node"
  fi
}

gm_forward() {
  # Trap handler: remember the signal and pass it to the ranks (srun forwards it to every task).
  # shellcheck disable=SC2034  # GM_INTERRUPTED is read by gm_wait
  GM_SIGNAL=$1 GM_INTERRUPTED=1
  gm_log "got SIG$1; forwarding it to the ranks"
  [ -n "${GM_STEP_PID:-}" ] && kill -s "$1" "$GM_STEP_PID" 2>/dev/null
  return 0
}

gm_wait() {
  # `wait` returns early (status > 128) whenever a trap runs: then wait again, which blocks while the
  # step still runs and otherwise returns its real status.
  local rc
  while true; do
    GM_INTERRUPTED=0
    wait "$1"
    rc=$?
    if [ "$GM_INTERRUPTED" = 1 ] && [ "$rc" -gt 128 ]; then continue; fi
    return "$rc"
  done
}

gm_requeue_or_exit() {
  # Requeue after the preemption/time-limit warning (USR1, see --signal) or when the ranks say they
  # stopped to be resumed; never after TERM, which is what `scancel` sends to end a job for good.
  local rc=$1
  trap - USR1 TERM
  if [ "${GM_SIGNAL:-}" = USR1 ] || { [ "$rc" = "$GM_REQUEUE_EXIT" ] && [ "${GM_SIGNAL:-}" != TERM ]; }; then
    gm_log "ranks stopped (status $rc); requeueing job $SLURM_JOB_ID, it resumes from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    gm_log "scontrol requeue failed; resubmit to resume"
    exit "$rc"
  fi
  if [ "$rc" = 0 ]; then gm_log "done"; else gm_log "ranks failed (status $rc); see the rank*.log files"; fi
  exit "$rc"
}

gm_train_job() {
  # gm_train_job pretrain|finetune ENTRY CONFIG [key.sub=value ...]: the whole job of a training sbatch.
  local kind=$1 entry=$2
  shift 2
  if [ $# -lt 1 ]; then
    echo "usage: sbatch [resources] launch/slurm/$kind.sbatch CONFIG [key.sub=value ...]" >&2
    exit 2
  fi
  local config=$1
  shift
  gm_env
  local run_dir try=${SLURM_RESTART_COUNT:-0}
  run_dir=$("$GM_PY" launch/slurm/run_dir.py "$kind" --config "$config" "$@") || exit 2
  local logs="$run_dir/logs/slurm-$SLURM_JOB_ID/try$try"
  mkdir -p "$logs"
  gm_log "$kind job $SLURM_JOB_ID (try $try) on $SLURM_JOB_NODELIST; logs in $logs"
  exec >>"$logs/job.log" 2>&1
  gm_rendezvous
  gm_check_gpus
  gm_log "$kind: config $config $*; ${SLURM_NTASKS:-?} ranks on ${SLURM_JOB_NUM_NODES:-?} nodes, ${SLURM_CPUS_PER_TASK:-1} CPUs each; rank 0 at $MASTER_ADDR:$MASTER_PORT"
  gm_log_network
  trap 'gm_forward USR1' USR1
  trap 'gm_forward TERM' TERM
  # --wait: once a rank has exited, the others get 120 s to follow before srun ends them (a crashed
  # rank leaves the rest blocked in a collective; a coordinated stop ends them within seconds).
  srun --wait=120 --output="$logs/rank%t.log" bash launch/slurm/srun_rank.sh \
    "$GM_PY" "$entry" --config "$config" "$@" &
  GM_STEP_PID=$!
  gm_wait "$GM_STEP_PID"
  gm_requeue_or_exit $?
}
