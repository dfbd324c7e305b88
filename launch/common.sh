# Shared by the launchers: builds the `deepspeed` launcher arguments from the environment.
#   NPROC_PER_NODE  processes per node (default: number of GPUs, else 1)
#   HOSTFILE        MPI-style hostfile for multi-node runs (launched over pdsh/ssh by default)
#   NUM_NODES       use the first N hosts of HOSTFILE
#   NODE_RANK       set on every node to start each node's launcher yourself (SLURM, k8s): --no_ssh mode
#   MASTER_ADDR     address of node 0 (multi-node), MASTER_PORT (default 29500)
#   DS_ACCELERATOR  cpu forces CPU + gloo; default: cuda + nccl when a GPU is visible
#   PYTHON          interpreter with mope-dist installed (default: python on PATH)
set -euo pipefail

if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: $(basename "$0") CONFIG.yaml [section.key=value ...] (config file '${1:-}' not found)" >&2
  exit 2
fi

if [ -z "${DS_ACCELERATOR:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ "${DS_ACCELERATOR:-}" != "cpu" ] && command -v nvidia-smi >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L | wc -l)
  else
    NPROC_PER_NODE=1
  fi
fi

# CPU ranks share the node's cores: more compute threads than cores makes every rank spin-wait.
if [ "${DS_ACCELERATOR:-}" = "cpu" ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  cores=$(nproc)
  export OMP_NUM_THREADS=$(( cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1 ))
fi

launcher_args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank)
if [ -n "${HOSTFILE:-}" ]; then
  launcher_args+=(--hostfile "$HOSTFILE" --num_gpus "$NPROC_PER_NODE")
  [ -n "${NUM_NODES:-}" ] && launcher_args+=(--num_nodes "$NUM_NODES")
  [ -n "${MASTER_ADDR:-}" ] && launcher_args+=(--master_addr "$MASTER_ADDR")
  [ -n "${NODE_RANK:-}" ] && launcher_args+=(--no_ssh --node_rank "$NODE_RANK")
else
  launcher_args+=(--num_gpus "$NPROC_PER_NODE")
fi
PYTHON=${PYTHON:-python}
deepspeed_cmd=("$PYTHON" -m deepspeed.launcher.runner)

# Bad configuration, an output dir of another run, an unusable ImageFolder proxy/eval set: one line
# and exit 2 here, before any process is launched (mope_dist/recipes/preflight.py).
"$PYTHON" -m mope_dist.recipes.preflight "$@"

# pass_sigterm PID: SIGTERM to the deepspeed launcher PID's local launch.py, which passes it on to every
# rank's process tree; to the launcher itself when it runs none here (it drives remote nodes over pdsh
# and signals them itself, or launch.py has not started yet). Chosen when the signal comes: a hostfile
# filtered to one host runs launch.py locally, and there the launcher has no SIGTERM handler.
pass_sigterm() {
  "$PYTHON" - "$1" 2>/dev/null <<'EOF' || kill -TERM "$1" 2>/dev/null
import sys

import psutil

def runs_launch(process):
    try:
        return "deepspeed.launcher.launch" in process.cmdline()
    except psutil.Error:  # exited meanwhile
        return False


launcher = psutil.Process(int(sys.argv[1]))
for process in [c for c in launcher.children() if runs_launch(c)] or [launcher]:
    process.terminate()
EOF
}

# run_launcher ARGS...: the deepspeed launcher with ARGS, as a child of this script, which waits for it
# and exits with its status. A SIGTERM sent to this script alone (Kubernetes signals a container's PID
# 1; `kill` of the script) reaches the ranks (pass_sigterm); they save a preemption checkpoint
# (distill.preempt_grace_s) while this script keeps the container alive, and it exits 143 once the
# launcher is done. Over pdsh the launcher exits about a second after signalling the remote ranks, so
# there this script does not outlive their save: each node's own container must (run one launcher per
# node with NODE_RANK for that). A SIGTERM to the whole job (SLURM) reaches each process as well.
run_launcher() {
  "${deepspeed_cmd[@]}" "${launcher_args[@]}" "$@" &
  local pid=$! rc terminated=0
  trap 'terminated=1; pass_sigterm '"$pid" TERM
  while :; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # else `wait` was cut short by the trap: keep waiting
  done
  [ "$terminated" = 1 ] && exit 143
  exit "$rc"
}
