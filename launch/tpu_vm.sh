#!/usr/bin/env bash
# Trains on Cloud TPU VMs: a single host (v5litepod-8, v4-8) or a pod slice (v5litepod-256,
# v4-32), requested through a queued resource and driven over `gcloud ... tpu-vm ssh`.
#
#   launch/tpu_vm.sh create            queue the TPU (queued-resources create) and wait until ACTIVE
#   launch/tpu_vm.sh install           on every worker: the code (git clone, or this tree), a venv,
#                                      pip install -e '.[tpu]'
#   launch/tpu_vm.sh run ARGS...       `imagenet-jax ARGS...` on every worker at once, under nohup,
#                                      each worker logging to REMOTE_DIR/logs/imagenet-jax.log
#   launch/tpu_vm.sh logs              follow worker 0's log (WORKER=3 one worker, WORKER=all all)
#   launch/tpu_vm.sh stop              SIGTERM the run on every worker: it saves a checkpoint and
#                                      exits 75; `run` with the same ARGS resumes it. Then ends
#                                      the data service's workers and dispatcher, if any
#   launch/tpu_vm.sh delete            delete the queued resource and its TPU VMs (--force --async)
#
# Every worker runs the same command and JAX joins the slice by itself on Cloud TPU VMs (the
# workers and this host's id come from the TPU metadata), so no --coordinator_address,
# --num_processes or --process_id is passed.
#
# Variables (required: PROJECT, ZONE, TPU_NAME; ACCELERATOR_TYPE for create):
#   PROJECT           Google Cloud project
#   ZONE              zone of the TPU, e.g. us-west4-a (v5e), us-central2-b (v4)
#   TPU_NAME          name of both the queued resource and its TPU node
#   ACCELERATOR_TYPE  v5litepod-8 (one host, 8 chips), v5litepod-256 (64 hosts), v4-8, v4-32, ...
#   RUNTIME_VERSION   TPU software version; by default from ACCELERATOR_TYPE:
#                       v6e-*       -> v2-alpha-tpuv6e
#                       v5p-*       -> v2-alpha-tpuv5
#                       v5litepod-* -> v2-alpha-tpuv5-lite
#                       v4-*, v3-*, v2-* -> tpu-ubuntu2204-base
#   SPOT=1            a Spot TPU (preemptible: a preempted run resumes with `run` after `create`)
#   RESERVED=1        use the project's reservation
#   REPO_URL          git URL to clone on the workers; unset: copy this working tree instead
#   REPO_REF          branch, tag or commit of REPO_URL (default main)
#   REMOTE_DIR        the code's folder on each worker, relative to home (default imagenet_jax)
#   REMOTE_PYTHON     interpreter for the venv on the workers (default python3.11; install puts
#                     it there with apt when missing: the TPU images ship Python 3.10)
#   WORKER            logs: which worker, 0-based, or all (default 0)
#   POLL_S            create: seconds between state checks (default 30)
#   DATA_SERVICE_HOSTS  CPU VMs that run the input pipeline (imagenet_jax/data/service.py), e.g.
#                     "cpu-vm-1 cpu-vm-2": Compute Engine instances in PROJECT and ZONE, reached
#                     with `gcloud compute ssh` and by the TPU VMs at their names (the VPC's DNS)
#   DATA_SERVICE_PORT the dispatcher's port (default 5050)
#   DRY_RUN=1         print every command (one a line, prefixed with "+ ") instead of running it
#
# The workdir: every process writes its part of each checkpoint, so on a pod slice
# --workdir must be one all workers see: a Cloud Storage URL (gs://BUCKET/runs/NAME, the
# usual choice: the VMs' service account reaches it with no set-up) or a shared mount. On a
# single host a local folder (the default runs/NAME) works, and goes away with the VM.
#
# The data service: with DATA_SERVICE_HOSTS, `install` installs the code on those hosts too
# (pip install -e ., the CPU build), and `run train ...` first starts the dispatcher on the
# first of them, waits until it listens, starts `imagenet-jax data-service worker` on each,
# then runs the training with --config.data_service=grpc://FIRST_HOST:PORT. The dispatcher
# lives on a CPU host rather than TPU worker 0: a preempted or recreated TPU does not take it
# and its workers' registrations along, and worker 0's host keeps its CPUs for training. The
# service outlives the training (a later `run` reuses it) until `stop`; its logs are in
# REMOTE_DIR/logs/data-service-*.log on its hosts. The VPC must let the TPU VMs reach the
# hosts' ports (the default network's default-allow-internal rule does).
#
# Single host (v5e, 8 chips):
#   export PROJECT=my-project ZONE=us-west4-a TPU_NAME=rn50 ACCELERATOR_TYPE=v5litepod-8
#   launch/tpu_vm.sh create && launch/tpu_vm.sh install
#   launch/tpu_vm.sh run train --config=configs/resnet.py:resnet50 --config.dataset=folder:/mnt/imagenet
#   launch/tpu_vm.sh logs
#   launch/tpu_vm.sh delete
#
# Pod slice (v4-32: 4 hosts of 4 chips; v5litepod-256: 64 hosts), Spot:
#   export PROJECT=my-project ZONE=us-central2-b TPU_NAME=rn50-pod ACCELERATOR_TYPE=v4-32 SPOT=1
#   export REPO_URL=https://github.com/me/imagenet_jax.git REPO_REF=v0.1.0
#   launch/tpu_vm.sh create && launch/tpu_vm.sh install
#   launch/tpu_vm.sh run train --config=configs/resnet.py:resnet50 --workdir=gs://my-bucket/runs/rn50 \
#       --config.dataset=folder:/mnt/shared/imagenet
#   WORKER=all launch/tpu_vm.sh logs
#
# The pod slice fed by a data service on two CPU VMs (n2-standard-32, say, in the same zone):
#   export DATA_SERVICE_HOSTS="cpu-vm-1 cpu-vm-2"
#   launch/tpu_vm.sh install
#   launch/tpu_vm.sh run train --config=configs/resnet.py:resnet50 --workdir=gs://my-bucket/runs/rn50 \
#       --config.dataset=folder:/mnt/shared/imagenet
#   launch/tpu_vm.sh stop   # the training, then the workers and the dispatcher
set -euo pipefail

readonly SELF=launch/tpu_vm.sh
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  echo "usage: $SELF create|install|run ARGS...|logs|stop|delete  (see the header of $SELF)" >&2
  exit 2
}

declare -A WHAT=(
  [PROJECT]="the Google Cloud project, e.g. PROJECT=my-project"
  [ZONE]="the TPU's zone, e.g. ZONE=us-west4-a"
  [TPU_NAME]="the name of the queued resource and its TPU, e.g. TPU_NAME=rn50"
  [ACCELERATOR_TYPE]="the TPU type, e.g. ACCELERATOR_TYPE=v5litepod-8 or v4-32"
)


# One word as a shell would need it typed: bare when safe, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, or with DRY_RUN=1 prints it as "+ cmd args" on one line.
run() {
  if dry_run; then
    local line="+" word
    for word in "$@"; do line+=" $(quote "$word")"; done
    echo "$line"
    return 0
  fi
  "$@"
}

default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v4-* | v3-* | v2-*) echo tpu-ubuntu2204-base ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$1; set RUNTIME_VERSION" ;;
  esac
}

gcloud_tpu() {
  run gcloud compute tpus "$@" --project="$PROJECT" --zone="$ZONE"
}

ssh_workers() {  # ssh_workers WORKER COMMAND
  gcloud_tpu tpu-vm ssh "$TPU_NAME" --worker="$1" --command="$2"
}

gcloud_compute() {  # the data service's hosts are plain Compute Engine VMs
  run gcloud compute "$@" --project="$PROJECT" --zone="$ZONE"
}

ssh_host() {  # ssh_host HOST COMMAND
  gcloud_compute ssh "$1" --command="$2"
}

data_service_port() {
  local port=${DATA_SERVICE_PORT:-5050}
  [[ $port =~ ^[1-9][0-9]*$ ]] || die "DATA_SERVICE_PORT=$port: expected a port number"
  echo "$port"
}

create() {
  require ACCELERATOR_TYPE
  local runtime
  runtime=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}
  local flags=(--node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE"
               --runtime-version="$runtime")
  [[ ${SPOT:-0} == 1 && ${RESERVED:-0} == 1 ]] && die "SPOT=1 and RESERVED=1 exclude each other"
  [[ ${SPOT:-0} == 1 ]] && flags+=(--spot)
  [[ ${RESERVED:-0} == 1 ]] && flags+=(--reserved)
  gcloud_tpu queued-resources create "$TPU_NAME" "${flags[@]}"
  wait_until_active
}

wait_until_active() {
  local describe=(queued-resources describe "$TPU_NAME" --format='value(state.state)')
  if dry_run; then
    gcloud_tpu "${describe[@]}"  # polled every POLL_S seconds until ACTIVE
    return 0
  fi
  local state previous=""
  while true; do
    state=$(gcloud_tpu "${describe[@]}")
    if [[ $state != "$previous" ]]; then
      echo "$SELF: $TPU_NAME is $state" >&2
      previous=$state
    fi
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING)
        die "queued resource $TPU_NAME is $state; see: gcloud compute tpus queued-resources" \
            "describe $TPU_NAME --project=$PROJECT --zone=$ZONE" ;;
    esac
    sleep "${POLL_S:-30}"
  done
}

remote_dir() {
  local dir=${REMOTE_DIR:-imagenet_jax}
  [[ $dir =~ ^[A-Za-z0-9_./-]+$ ]] || die "REMOTE_DIR=$dir: use letters, digits and _./- only"
  echo "$dir"
}

# The remote commands are one line each, so that DRY_RUN prints one line a command.
install() {
  local dir python=${REMOTE_PYTHON:-python3.11} fetch_code setup report host
  dir=$(remote_dir)
  [[ $python =~ ^[A-Za-z0-9_.-]+$ ]] ||
    die "REMOTE_PYTHON=$python: give an interpreter's name, e.g. python3.11"
  if [[ -n ${REPO_URL:-} ]]; then
    # Fetching the ref and checking out FETCH_HEAD works alike for a branch, a tag or a
    # commit, on a fresh clone or an old one.
    fetch_code="{ [ -d $dir/.git ] || git clone --quiet $(quote "$REPO_URL") $dir; }"
    fetch_code+="; git -C $dir fetch --quiet origin $(quote "${REPO_REF:-main}")"
    fetch_code+="; git -C $dir checkout --quiet --detach FETCH_HEAD"
  else
    local repo archive
    repo=$(cd "$(dirname "$0")/.." && pwd)
    archive=${TMPDIR:-/tmp}/imagenet_jax-$TPU_NAME.tgz
    run tar -C "$repo" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache -czf "$archive" .
    gcloud_tpu tpu-vm scp "$archive" "$TPU_NAME:imagenet_jax.tgz" --worker=all
    for host in "${data_service_hosts[@]}"; do
      gcloud_compute scp "$archive" "$host:imagenet_jax.tgz"
    done
    run rm -f "$archive"
    fetch_code="mkdir -p $dir && tar -C $dir -xzf imagenet_jax.tgz && rm imagenet_jax.tgz"
  fi
  # The TPU images ship Python 3.10; imagenet_jax needs 3.11.
  setup="set -eu; command -v $python >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $python $python-venv; }; $fetch_code; cd $dir; [ -x .venv/bin/python ] || $python -m venv .venv; .venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q -e"
  report="echo \"\$(hostname): jax \$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
  ssh_workers all "$setup '.[tpu]'; $report"
  for host in "${data_service_hosts[@]}"; do
    ssh_host "$host" "$setup .; $report"  # the input pipeline needs no accelerator's extra
  done
}

run_training() {
  (($# > 0)) || die "run needs the imagenet-jax arguments, e.g. run train --config=configs/resnet.py:resnet50"
  local dir args="" arg pid=logs/imagenet-jax.pid log=logs/imagenet-jax.log
  dir=$(remote_dir)
  if [[ $1 == train && ${#data_service_hosts[@]} -gt 0 ]]; then
    start_data_service
    set -- "$@" "--config.data_service=grpc://${data_service_hosts[0]}:$(data_service_port)"
  fi
  for arg in "$@"; do args+=" $(quote "$arg")"; done
  # A TPU is held by one process at a time: refuse to start next to a live run. The pid
  # file may name a process that ended and whose pid was reused: only an imagenet-jax
  # process counts (here and in stop).
  ssh_workers all "set -eu; cd $dir; mkdir -p logs; if [ -f $pid ] && grep -qa imagenet-jax \"/proc/\$(cat $pid)/cmdline\" 2>/dev/null; then echo \"\$(hostname): imagenet-jax is already running; $SELF stop ends it\" >&2; exit 1; fi; echo \"=== \$(date -u +%FT%TZ) started\" >> $log; nohup .venv/bin/imagenet-jax$args >> $log 2>&1 < /dev/null & echo \$! > $pid"
}

# The remote command that starts `imagenet-jax data-service ROLE FLAGS...` under nohup, unless
# its pid file names a live one (as for the training): a later `run` reuses the service.
start_service_command() {  # start_service_command ROLE FLAG...
  local role=$1 dir args="" arg
  shift
  dir=$(remote_dir)
  for arg in "$@"; do args+=" $(quote "$arg")"; done
  local pid=logs/data-service-$role.pid log=logs/data-service-$role.log
  echo "set -eu; cd $dir; mkdir -p logs; if [ -f $pid ] && grep -qa imagenet-jax \"/proc/\$(cat $pid)/cmdline\" 2>/dev/null; then echo \"\$(hostname): the data-service $role is already running\" >&2; else echo \"=== \$(date -u +%FT%TZ) started\" >> $log; nohup .venv/bin/imagenet-jax data-service $role$args >> $log 2>&1 < /dev/null & echo \$! > $pid; fi"
}

# The dispatcher first, and listening (bash's /dev/tcp), before anything reaches for it: a
# worker would retry, but a trainer that finds no dispatcher ends at once (exit 2).
start_data_service() {
  local dispatcher=${data_service_hosts[0]} port host dir
  port=$(data_service_port)
  dir=$(remote_dir)
  ssh_host "$dispatcher" "$(start_service_command dispatcher --port="$port"); i=0; until (: < /dev/tcp/127.0.0.1/$port) 2>/dev/null; do if [ \$i -ge 120 ] || ! kill -0 \$(cat logs/data-service-dispatcher.pid) 2>/dev/null; then echo \"\$(hostname): the data-service dispatcher is not listening on port $port; see $dir/logs/data-service-dispatcher.log\" >&2; exit 1; fi; i=\$((i + 1)); sleep 1; done"
  for host in "${data_service_hosts[@]}"; do
    ssh_host "$host" "$(start_service_command worker --dispatcher="$dispatcher:$port" --worker_host="$host")"
  done
}

logs() {
  local dir
  dir=$(remote_dir)
  ssh_workers "${WORKER:-0}" \
    "tail -n 200 -F $dir/logs/imagenet-jax.log | sed -u \"s/^/[\$(hostname)] /\""
}

# The remote command that sends SIGTERM to the process logs/NAME.pid names, if an imagenet-jax.
stop_command() {  # stop_command NAME
  local dir
  dir=$(remote_dir)
  echo "p=\$(cat $dir/logs/$1.pid 2>/dev/null) || exit 0; if grep -qa imagenet-jax /proc/\$p/cmdline 2>/dev/null; then kill -TERM \$p 2>/dev/null || true; fi"
}

# The training first, which then saves its checkpoint with batches it has or makes itself;
# then the data service, its workers before their dispatcher.
stop() {
  local host
  ssh_workers all "$(stop_command imagenet-jax)"
  for host in "${data_service_hosts[@]}"; do
    ssh_host "$host" "$(stop_command data-service-worker)"
  done
  if ((${#data_service_hosts[@]} > 0)); then
    ssh_host "${data_service_hosts[0]}" "$(stop_command data-service-dispatcher)"
  fi
}

delete() {
  gcloud_tpu queued-resources delete "$TPU_NAME" --force --async --quiet
}

(($# > 0)) || usage
command=$1
shift
require PROJECT ZONE TPU_NAME
read -ra data_service_hosts <<<"${DATA_SERVICE_HOSTS:-}"
for host in "${data_service_hosts[@]}"; do
  [[ $host =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "DATA_SERVICE_HOSTS: $host is not a Compute Engine instance name (lowercase letters, digits, '-')"
done
case $command in
  create) create ;;
  install) install ;;
  run) run_training "$@" ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  *) usage ;;
esac
