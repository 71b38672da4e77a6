#!/usr/bin/env bash
# Runs `imagenet-jax ARGS...` as N processes on this machine, each with its own fake CPU
# devices, joined through jax.distributed on 127.0.0.1: a multi-host rehearsal on one box,
# the way the tests run it.
#
#   launch/local.sh N ARGS...        e.g. launch/local.sh 2 train --workdir=runs/demo2
#
# Variables:
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 2)
#   COORDINATOR_PORT     port of process 0's coordinator (default: a free one)
#   PYTHON               interpreter (default: .venv/bin/python if present, else python3)
#   MAX_RESTARTS         restart the whole job this many times after a failure (default 0);
#                        a restarted job resumes from its last checkpoint. Exit codes 2
#                        (bad config) and 3 (non-finite numbers) are never retried.
#   HEARTBEAT_TIMEOUT_S  a silent peer ends the job after this long (default 30)
#   DRY_RUN=1            print the commands instead of running them
#
# Each process's output is prefixed with its id. The launcher exits with the first
# failing process's status (after stopping the others), or 0.
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N ARGS...  (N processes of imagenet-jax ARGS)" >&2
  exit 2
fi
num_processes=$1
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
devices=${DEVICES_PER_PROCESS:-2}
max_restarts=${MAX_RESTARTS:-0}
heartbeat=${HEARTBEAT_TIMEOUT_S:-30}
# The caller's own XLA_FLAGS are kept; a device count in them is replaced.
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g' <<<"${XLA_FLAGS:-}")
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"
xla_flags=$(tr -s ' ' <<<"$xla_flags" | sed -E 's/^ //')
if [[ -n ${PYTHON:-} ]]; then
  python=$PYTHON
elif [[ -x $repo/.venv/bin/python ]]; then
  python=$repo/.venv/bin/python
else
  python=python3
fi

free_port() {
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}

run_job() {
  local port=${COORDINATOR_PORT:-$(free_port)}
  pids=()
  for ((i = 0; i < num_processes; i++)); do
    local cmd=("$python" -m imagenet_jax "$@" "--coordinator_address=127.0.0.1:$port"
               "--num_processes=$num_processes" "--process_id=$i"
               "--heartbeat_timeout_s=$heartbeat")
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      echo "XLA_FLAGS='$xla_flags' JAX_PLATFORMS=cpu ${cmd[*]}"
      continue
    fi
    XLA_FLAGS="$xla_flags" JAX_PLATFORMS=cpu \
      "${cmd[@]}" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
    pids+=($!)
  done
  [[ ${DRY_RUN:-0} == 1 ]] && return 0
  # The first process to fail stops the others: they would otherwise wait on it until
  # the heartbeat timeout.
  local status=0 code finished
  while ((${#pids[@]} > 0)); do
    code=0
    wait -n -p finished "${pids[@]}" || code=$?
    local remaining=()
    for pid in "${pids[@]}"; do [[ $pid == "$finished" ]] || remaining+=("$pid"); done
    pids=("${remaining[@]}")
    if ((code != 0)); then
      status=$code
      stop_all
      wait || true
      break
    fi
  done
  return "$status"
}

trap stop_all INT TERM
attempt=0
while true; do
  status=0
  run_job "$@" || status=$?
  if [[ $status == 0 || $status == 2 || $status == 3 || $attempt -ge $max_restarts ]]; then
    exit "$status"
  fi
  attempt=$((attempt + 1))
  echo "launch/local.sh: job failed with status $status; restart $attempt of $max_restarts" >&2
done
