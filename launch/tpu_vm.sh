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
#                                      exits 75; `run` with the same ARGS resumes it
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
#   DRY_RUN=1         print every command (one a line, prefixed with "+ ") instead of running it
#
# The workdir: every process writes its part of each checkpoint, so on a pod slice
# --workdir must be one all workers see: a Cloud Storage URL (gs://BUCKET/runs/NAME, the
# usual choice: the VMs' service account reaches it with no set-up) or a shared mount. On a
# single host a local folder (the default runs/NAME) works, and goes away with the VM.
#
# Single host (v5e, 8 chips):
#   export PROJECT=my-project ZONE=us-west4-a TPU_NAME=rn50 ACCELERATOR_TYPE=v5litepod-8
#   launch/tpu_vm.sh create && launch/tpu_vm.sh install
#   launch/tpu_vm.sh run train --config=configs/resnet50.py --config.dataset=folder:/mnt/imagenet
#   launch/tpu_vm.sh logs
#   launch/tpu_vm.sh delete
#
# Pod slice (v4-32: 4 hosts of 4 chips; v5litepod-256: 64 hosts), Spot:
#   export PROJECT=my-project ZONE=us-central2-b TPU_NAME=rn50-pod ACCELERATOR_TYPE=v4-32 SPOT=1
#   export REPO_URL=https://github.com/me/imagenet_jax.git REPO_REF=v0.1.0
#   launch/tpu_vm.sh create && launch/tpu_vm.sh install
#   launch/tpu_vm.sh run train --config=configs/resnet50.py --workdir=gs://my-bucket/runs/rn50 \
#       --config.dataset=folder:/mnt/shared/imagenet
#   WORKER=all launch/tpu_vm.sh logs
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
  local dir python=${REMOTE_PYTHON:-python3.11} fetch_code
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
    run rm -f "$archive"
    fetch_code="mkdir -p $dir && tar -C $dir -xzf imagenet_jax.tgz && rm imagenet_jax.tgz"
  fi
  # The TPU images ship Python 3.10; imagenet_jax needs 3.11.
  ssh_workers all "set -eu; command -v $python >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $python $python-venv; }; $fetch_code; cd $dir; [ -x .venv/bin/python ] || $python -m venv .venv; .venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q -e '.[tpu]'; echo \"\$(hostname): jax \$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
}

run_training() {
  (($# > 0)) || die "run needs the imagenet-jax arguments, e.g. run train --config=configs/resnet50.py"
  local dir args="" arg pid=logs/imagenet-jax.pid log=logs/imagenet-jax.log
  dir=$(remote_dir)
  for arg in "$@"; do args+=" $(quote "$arg")"; done
  # A TPU is held by one process at a time: refuse to start next to a live run. The pid
  # file may name a process that ended and whose pid was reused: only an imagenet-jax
  # process counts (here and in stop).
  ssh_workers all "set -eu; cd $dir; mkdir -p logs; if [ -f $pid ] && grep -qa imagenet-jax \"/proc/\$(cat $pid)/cmdline\" 2>/dev/null; then echo \"\$(hostname): imagenet-jax is already running; $SELF stop ends it\" >&2; exit 1; fi; echo \"=== \$(date -u +%FT%TZ) started\" >> $log; nohup .venv/bin/imagenet-jax$args >> $log 2>&1 < /dev/null & echo \$! > $pid"
}

logs() {
  local dir
  dir=$(remote_dir)
  ssh_workers "${WORKER:-0}" \
    "tail -n 200 -F $dir/logs/imagenet-jax.log | sed -u \"s/^/[\$(hostname)] /\""
}

stop() {
  local dir
  dir=$(remote_dir)
  ssh_workers all "p=\$(cat $dir/logs/imagenet-jax.pid 2>/dev/null) || exit 0; if grep -qa imagenet-jax /proc/\$p/cmdline 2>/dev/null; then kill -TERM \$p 2>/dev/null || true; fi"
}

delete() {
  gcloud_tpu queued-resources delete "$TPU_NAME" --force --async --quiet
}

(($# > 0)) || usage
command=$1
shift
require PROJECT ZONE TPU_NAME
case $command in
  create) create ;;
  install) install ;;
  run) run_training "$@" ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  *) usage ;;
esac
