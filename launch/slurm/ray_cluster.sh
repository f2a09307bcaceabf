# Sourced by prepare_data.sbatch after common.sh: a Ray cluster over the allocation for the job's
# lifetime. The head runs on the first node and one worker on each other node, each an srun step
# running `ray start --block`; ending those steps ends Ray (their processes belong to the steps).
# Every Ray file goes to a per-job temp dir, so nothing of a Ray instance outside the job is touched
# (not even /tmp/ray/ray_current_cluster, which a plain `ray.init()` would read).

gm_ray_start() {
  # gm_ray_start LOGDIR: start head + workers, export GM_RAY_ADDRESS, return once all nodes joined.
  local logs=$1 nodes head addr ip port cpus tmp
  nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  head=$(echo "$nodes" | head -n1)
  GM_RAY_NODES=$(echo "$nodes" | wc -l)
  addr=$(scontrol show node "$head" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  addr=${addr:-$head}
  ip=$(getent ahostsv4 "$addr" | awk '{print $1; exit}')  # Ray wants an IP, NodeAddr may be a name
  addr=${ip:-$addr}
  port=${GM_RAY_PORT:-$(gm_job_port 3)}
  cpus=${SLURM_CPUS_ON_NODE:-1}
  tmp=${GM_RAY_TMPDIR:-/tmp/gm-ray-$SLURM_JOB_ID}  # short: Ray's unix socket paths must fit 107 bytes
  export GM_RAY_ADDRESS=$addr:$port
  # Ray >= 2.5x authenticates with a token: one per job, given to every step through the environment
  # (srun exports it), so this job's cluster takes no work from anyone else and the token in the
  # user's ~/.ray is neither needed nor used.
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN
  RAY_AUTH_TOKEN=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
  local common=(--block --num-cpus="$cpus" --temp-dir="$tmp" --disable-usage-stats)
  gm_log "ray: head on $head at $GM_RAY_ADDRESS, $GM_RAY_NODES nodes x $cpus CPUs, temp dir $tmp"
  srun --nodes=1 --ntasks=1 --nodelist="$head" --output="$logs/ray-head.log" \
    ray start --head --port="$port" --include-dashboard=false "${common[@]}" &
  GM_RAY_PIDS=($!)
  if [ "$GM_RAY_NODES" -gt 1 ]; then
    srun --nodes=$((GM_RAY_NODES - 1)) --ntasks=$((GM_RAY_NODES - 1)) --ntasks-per-node=1 --exclude="$head" \
      --output="$logs/ray-worker%t.log" ray start --address="$GM_RAY_ADDRESS" "${common[@]}" &
    GM_RAY_PIDS+=($!)
  fi
  # in the background, so that a signal to this script is handled while we wait
  "$GM_PY" launch/slurm/ray_wait.py "$GM_RAY_ADDRESS" --nodes "$GM_RAY_NODES" --timeout "${GM_RAY_WAIT:-300}" &
  GM_DRIVER_PID=$!
  gm_wait "$GM_DRIVER_PID"
}

gm_any_alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

gm_ray_stop() {
  # End the Ray steps: TERM to an srun makes Slurm end its step, which kills every process in it
  # (`ray start` and the GCS, raylet and workers it started); KILL to srun after 30 s if needed.
  # Runs from the EXIT trap too, so also after a failure.
  local _
  [ "${#GM_RAY_PIDS[@]}" -gt 0 ] || return 0
  gm_log "ray: stopping the cluster"
  kill -s TERM "${GM_RAY_PIDS[@]}" 2>/dev/null
  for _ in $(seq 60); do
    gm_any_alive "${GM_RAY_PIDS[@]}" || break
    sleep 0.5
  done
  gm_any_alive "${GM_RAY_PIDS[@]}" && kill -s KILL "${GM_RAY_PIDS[@]}" 2>/dev/null
  wait "${GM_RAY_PIDS[@]}" 2>/dev/null
  GM_RAY_PIDS=()
  gm_log "ray: stopped"
}

gm_data_signal() {
  # Trap handler: stop what the job waits on (the join barrier or the driver) now; after USR1 (time
  # limit near, preemption) the job requeues.
  # shellcheck disable=SC2034  # GM_INTERRUPTED is read by gm_wait
  GM_SIGNAL=$1 GM_INTERRUPTED=1
  gm_log "got SIG$1; stopping the data-prep driver"
  [ -n "${GM_DRIVER_PID:-}" ] && kill -s TERM "$GM_DRIVER_PID" 2>/dev/null
  return 0
}

gm_ray_job() {
  # gm_ray_job ENTRY CONFIG [key.sub=value ...]: the whole prepare_data job.
  local entry=$1
  shift
  if [ $# -lt 1 ]; then
    echo "usage: sbatch [resources] launch/slurm/prepare_data.sbatch CONFIG [key.sub=value ...]" >&2
    exit 2
  fi
  local config=$1
  shift
  gm_env
  local out rc
  out=$("$GM_PY" launch/slurm/run_dir.py data --config "$config" "$@") || exit 2
  local logs="$out/logs/slurm-$SLURM_JOB_ID/try${SLURM_RESTART_COUNT:-0}"
  mkdir -p "$logs"
  gm_log "data job $SLURM_JOB_ID on $SLURM_JOB_NODELIST; logs in $logs"
  exec >>"$logs/job.log" 2>&1
  GM_RAY_PIDS=()
  trap gm_ray_stop EXIT
  trap 'gm_data_signal USR1' USR1
  trap 'gm_data_signal TERM' TERM
  if gm_ray_start "$logs" && [ -z "${GM_SIGNAL:-}" ]; then
    "$GM_PY" "$entry" --config "$config" "$@" "ray.address=$GM_RAY_ADDRESS" &
    GM_DRIVER_PID=$!
    gm_wait "$GM_DRIVER_PID"
    rc=$?
  else
    rc=1
  fi
  gm_ray_stop
  if [ "${GM_SIGNAL:-}" = USR1 ]; then
    gm_log "requeueing job $SLURM_JOB_ID; the rerun skips the shards already written"
    trap - USR1 TERM EXIT
    scontrol requeue "$SLURM_JOB_ID" && exit 0
  fi
  if [ "$rc" = 0 ]; then gm_log "done"; else gm_log "data prep failed (status $rc)"; fi
  exit "$rc"
}
