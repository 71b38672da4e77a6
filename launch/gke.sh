#!/usr/bin/env bash
# Trains on GKE as a JobSet: a TPU slice (launch/gke/jobset-tpu.yaml) or GPU nodes
# (launch/gke/jobset-gpu.yaml), one pod per host. Fills in the template's placeholders
# from the variables below, failing on any that is unset, and pipes it to
# `kubectl apply -f -`.
#
#   launch/gke.sh tpu [FLAGS...]   train on a TPU slice; FLAGS are added to imagenet-jax train
#   launch/gke.sh gpu [FLAGS...]   train on NUM_NODES GPU nodes, one process per node
#   launch/gke.sh logs             follow process 0's log
#   launch/gke.sh delete           delete the JobSet (its pods and jobs)
#
# A failed or preempted pod restarts the whole JobSet (up to MAX_RESTARTS times) and the run
# resumes from WORKDIR; exit 2 (bad config) and 3 (non-finite numbers) end it.
#
# Variables, both kinds:
#   JOBSET_NAME      name of the JobSet: lowercase letters, digits and '-', at most 40
#   IMAGE            container image with imagenet_jax installed (`pip install '.[tpu]'` or
#                    '.[cuda]') and `imagenet-jax` on its PATH, run from the repository root:
#                    launch/gke/Dockerfile builds one (its header has the commands)
#   BUCKET           Cloud Storage bucket (SERVICE_ACCOUNT needs read-write access to it):
#                    the default workdir is in it, and it is also mounted read-mostly at
#                    /gcs in every pod (Cloud Storage FUSE CSI driver) for datasets
#   WORKDIR          the run's folder (default gs://BUCKET/runs/JOBSET_NAME): written through
#                    the Cloud Storage API, where a checkpoint commits atomically; a /gcs/...
#                    path works too (commits are marked by a file, not a rename)
#   CONFIG           config file in the image (default configs/resnet.py:resnet50)
#   MAX_RESTARTS     JobSet restarts after a failure or preemption (default 10)
#   SERVICE_ACCOUNT  Kubernetes service account of the pods (default: default)
#   NAMESPACE        namespace (default: kubectl's current one)
#   PYTHON           interpreter that fills in the template (default python3; standard library)
#   DRY_RUN=1        print the filled-in manifest (or the kubectl command) instead of running it
# tpu:
#   TPU_ACCELERATOR  node label cloud.google.com/gke-tpu-accelerator: tpu-v5-lite-podslice
#                    (v5e), tpu-v5p-slice, tpu-v6e-slice, tpu-v4-podslice
#   TPU_TOPOLOGY     node label cloud.google.com/gke-tpu-topology, e.g. 2x4, 16x16, 2x2x4
#   CHIPS_PER_HOST   google.com/tpu of each pod: the chips of one TPU VM (default 4; 8 for a
#                    single-host v5e 2x4 on ct5lp-hightpu-8t)
#   NUM_HOSTS        TPU VMs in the slice (default: chips in TPU_TOPOLOGY / CHIPS_PER_HOST)
# gpu:
#   NUM_NODES        GPU nodes, one process each
#   GPUS_PER_NODE    nvidia.com/gpu of each pod (default 8)
#   GPU_ACCELERATOR  node label cloud.google.com/gke-accelerator, e.g. nvidia-h100-80gb
#   COORDINATOR_PORT port of process 0's jax.distributed coordinator (default 8482)
# data service (either kind; imagenet_jax/data/service.py), the input pipelines run on CPU pods:
#   DATA_SERVICE_WORKERS       worker pods, `imagenet-jax data-service worker` (unset: none, the
#                              trainers read in process); a dispatcher pod comes with them, and
#                              the trainers get --config.data_service=grpc://<dispatcher pod>:PORT
#   DATA_SERVICE_MACHINE_TYPE  node label node.kubernetes.io/instance-type of the CPU nodes they
#                              run on, e.g. n2-standard-32 (the cluster needs such a node pool)
#   DATA_SERVICE_CPUS          CPUs each worker pod requests, e.g. 30 (of an n2-standard-32)
#   DATA_SERVICE_PORT          the dispatcher's port (default 5050)
#   The dispatcher keeps its journal in WORKDIR/data_service (fault-tolerant: its jobs survive
#   its restart). The JobSet starts the trainers once the service is up, and deletes the
#   service's pods when the trainers are done.
#
# Single host (a v5e 2x4 slice on one ct5lp-hightpu-8t VM; or one GPU node):
#   export JOBSET_NAME=rn50 IMAGE=us-docker.pkg.dev/my-project/ml/imagenet-jax:tpu BUCKET=my-bucket
#   TPU_ACCELERATOR=tpu-v5-lite-podslice TPU_TOPOLOGY=2x4 CHIPS_PER_HOST=8 \
#     launch/gke.sh tpu --config.dataset=folder:/gcs/imagenet
#   NUM_NODES=1 GPU_ACCELERATOR=nvidia-h100-80gb launch/gke.sh gpu --config.dataset=folder:/gcs/imagenet
#
# Pod slice / multi-node (v5e 16x16: 64 hosts of 4 chips; 4 GPU nodes of 8):
#   TPU_ACCELERATOR=tpu-v5-lite-podslice TPU_TOPOLOGY=16x16 \
#     launch/gke.sh tpu --config.dataset=folder:/gcs/imagenet --config.batch_size=8192
#   NUM_NODES=4 GPU_ACCELERATOR=nvidia-h100-80gb launch/gke.sh gpu --config.batch_size=2048
#   launch/gke.sh logs; launch/gke.sh delete
#
# The same slice fed by 8 data-service workers on n2-standard-32 nodes:
#   DATA_SERVICE_WORKERS=8 DATA_SERVICE_MACHINE_TYPE=n2-standard-32 DATA_SERVICE_CPUS=30 \
#     TPU_ACCELERATOR=tpu-v5-lite-podslice TPU_TOPOLOGY=16x16 \
#     launch/gke.sh tpu --config.dataset=folder:/gcs/imagenet --config.batch_size=8192
set -euo pipefail

readonly SELF=launch/gke.sh
readonly COMMON_VARIABLES="JOBSET_NAME IMAGE BUCKET WORKDIR CONFIG MAX_RESTARTS SERVICE_ACCOUNT"
readonly DATA_SERVICE_VARIABLES="DATA_SERVICE_WORKERS DATA_SERVICE_MACHINE_TYPE DATA_SERVICE_CPUS
  DATA_SERVICE_PORT DATA_SERVICE_JOURNAL DATA_SERVICE_ADDRESS"
templates=$(cd "$(dirname "$0")" && pwd)/gke
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  echo "usage: $SELF tpu|gpu [IMAGENET_JAX_FLAGS...] | logs | delete  (see the header of $SELF)" >&2
  exit 2
}

declare -A WHAT=(
  [JOBSET_NAME]="the JobSet's name, e.g. JOBSET_NAME=rn50"
  [IMAGE]="the container image, e.g. IMAGE=us-docker.pkg.dev/my-project/ml/imagenet-jax:tpu"
  [BUCKET]="the Cloud Storage bucket of the workdir (also mounted at /gcs), e.g. BUCKET=my-bucket"
  [TPU_ACCELERATOR]="the TPU node label, e.g. TPU_ACCELERATOR=tpu-v5-lite-podslice"
  [TPU_TOPOLOGY]="the slice's topology, e.g. TPU_TOPOLOGY=16x16"
  [NUM_NODES]="the number of GPU nodes, e.g. NUM_NODES=4"
  [GPU_ACCELERATOR]="the GPU node label, e.g. GPU_ACCELERATOR=nvidia-h100-80gb"
  [DATA_SERVICE_MACHINE_TYPE]="the data service's CPU machine type, e.g. DATA_SERVICE_MACHINE_TYPE=n2-standard-32"
  [DATA_SERVICE_CPUS]="the CPUs of each data-service worker pod, e.g. DATA_SERVICE_CPUS=30"
)

require_count() {  # require_count NAME...: each a whole number of at least 1
  local name
  for name in "$@"; do
    [[ ${!name} =~ ^[1-9][0-9]*$ ]] || die "$name=${!name}: expected a whole number >= 1"
  done
}


kubectl_cmd() {
  local cmd=(kubectl)
  [[ -n ${NAMESPACE:-} ]] && cmd+=(--namespace="$NAMESPACE")
  cmd+=("$@")
  if dry_run; then
    echo "+ ${cmd[*]}"
    return 0
  fi
  "${cmd[@]}"
}

check_name() {
  require JOBSET_NAME
  # Pod host names, the longest JOBSET_NAME-data-dispatcher-0-0, must stay within 63 characters.
  [[ $JOBSET_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#JOBSET_NAME} -le 40 ]] ||
    die "JOBSET_NAME=$JOBSET_NAME: use lowercase letters, digits and '-' (a letter first), at most 40"
}

common_variables() {
  check_name
  require IMAGE BUCKET
  export WORKDIR=${WORKDIR:-gs://$BUCKET/runs/$JOBSET_NAME}
  export CONFIG=${CONFIG:-configs/resnet.py:resnet50}
  export MAX_RESTARTS=${MAX_RESTARTS:-10}
  export SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-default}
  [[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS: expected a whole number"
  export JOBSET_NAME IMAGE BUCKET
}

tpu_variables() {
  require TPU_ACCELERATOR TPU_TOPOLOGY
  [[ $TPU_TOPOLOGY =~ ^[1-9][0-9]*(x[1-9][0-9]*)+$ ]] ||
    die "TPU_TOPOLOGY=$TPU_TOPOLOGY: expected chips per dimension, e.g. 2x4 or 2x2x4"
  export CHIPS_PER_HOST=${CHIPS_PER_HOST:-4}
  require_count CHIPS_PER_HOST
  local chips=1 dims dim
  IFS=x read -ra dims <<<"$TPU_TOPOLOGY"
  for dim in "${dims[@]}"; do chips=$((chips * dim)); done
  ((chips % CHIPS_PER_HOST == 0)) ||
    die "TPU_TOPOLOGY=$TPU_TOPOLOGY has $chips chips, not a multiple of CHIPS_PER_HOST=$CHIPS_PER_HOST"
  export NUM_HOSTS=${NUM_HOSTS:-$((chips / CHIPS_PER_HOST))}
  require_count NUM_HOSTS
  export TPU_ACCELERATOR TPU_TOPOLOGY
}

gpu_variables() {
  require NUM_NODES GPU_ACCELERATOR
  export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
  export COORDINATOR_PORT=${COORDINATOR_PORT:-8482}
  require_count NUM_NODES GPUS_PER_NODE COORDINATOR_PORT
  export NUM_NODES GPU_ACCELERATOR
}

data_service_variables() {
  require DATA_SERVICE_MACHINE_TYPE DATA_SERVICE_CPUS
  export DATA_SERVICE_PORT=${DATA_SERVICE_PORT:-5050}
  require_count DATA_SERVICE_WORKERS DATA_SERVICE_PORT
  [[ $DATA_SERVICE_CPUS =~ ^([0-9]+(\.[0-9]+)?|[0-9]+m)$ ]] ||
    die "DATA_SERVICE_CPUS=$DATA_SERVICE_CPUS: expected a CPU count, e.g. 30, 7.5 or 7500m"
  # The journal goes through the Cloud Storage API, as the workdir: /gcs is BUCKET's mount.
  local workdir=${WORKDIR%/}
  case $workdir in
    gs://*) export DATA_SERVICE_JOURNAL=$workdir/data_service ;;
    /gcs/*) export DATA_SERVICE_JOURNAL=gs://$BUCKET/${workdir#/gcs/}/data_service ;;
    *) die "WORKDIR=$WORKDIR: with DATA_SERVICE_WORKERS the dispatcher keeps its journal in" \
           "the workdir, which must be in Cloud Storage: gs://BUCKET/... or /gcs/..." ;;
  esac
  # JobSet's DNS name of pod 0 of job 0 of replicated job data-dispatcher
  # (launch/gke/data-service.yaml), the subdomain being the JobSet's name.
  export DATA_SERVICE_ADDRESS=$JOBSET_NAME-data-dispatcher-0-0.$JOBSET_NAME:$DATA_SERVICE_PORT
  export DATA_SERVICE_WORKERS DATA_SERVICE_MACHINE_TYPE DATA_SERVICE_CPUS
}

# render TEMPLATE "NAME..." "PART..." [FLAG...]: the template with each line "#@part PART"
# replaced by the file PART beside it (indented as the line) when PART is one of PART..., else
# dropped; then each ${NAME} replaced by $NAME (escaped for the double-quoted YAML strings they
# sit in) and the line "#@extra_args" by one list item per FLAG. A placeholder not in NAME...
# or with no value is an error; $(NAME) is left to Kubernetes, which expands it from the
# container's environment.
render() {
  "${PYTHON:-python3}" - "$@" <<'PY'
import json, os, re, sys

template, names, parts, flags = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4:]
text = open(template).read()
placed = set()


def part(match):
    indent, name = match.groups()
    if name not in parts:
        return ""
    placed.add(name)
    lines = open(os.path.join(os.path.dirname(template), name)).read().splitlines(keepends=True)
    return "".join(indent + line for line in lines)


text = re.sub(r"^( *)#@part (\S+)\n", part, text, flags=re.M)
if set(parts) - placed:
    sys.exit(f"launch/gke.sh: error: {template} has no line #@part {' '.join(sorted(set(parts) - placed))}")
used = set(re.findall(r"\$\{(\w+)\}", text))
unknown = sorted(used - set(names))
if unknown:
    sys.exit(f"launch/gke.sh: error: {template} uses {', '.join(unknown)}, which gke.sh does not set")
missing = sorted(name for name in used if not os.environ.get(name))
if missing:
    sys.exit(f"launch/gke.sh: error: {template} needs {', '.join(missing)}, which is not set")
text = re.sub(r"\$\{(\w+)\}", lambda m: json.dumps(os.environ[m.group(1)])[1:-1], text)


def extra_args(match):
    return "".join(f"{match.group(1)}- {json.dumps(flag)}\n" for flag in flags)


text = re.sub(r"^( *)#@extra_args\n", extra_args, text, flags=re.M)
if "${" in text:
    sys.exit(f"launch/gke.sh: error: a placeholder in {template} is malformed: ...{text[text.index('${'):][:40]}")
sys.stdout.write(text)
PY
}

apply() {  # apply KIND "NAME..." [FLAG...]
  local kind=$1 names=$2 parts="" manifest
  shift 2
  if [[ -n ${DATA_SERVICE_WORKERS:-} ]]; then
    data_service_variables
    names+=" $DATA_SERVICE_VARIABLES"
    parts=data-service.yaml
    set -- "--config.data_service=grpc://$DATA_SERVICE_ADDRESS" "$@"
  fi
  manifest=$(render "$templates/jobset-$kind.yaml" "$names" "$parts" "$@")
  if dry_run; then
    printf '%s\n' "$manifest"
    return 0
  fi
  printf '%s\n' "$manifest" | kubectl_cmd apply -f -
  echo "$SELF: follow it with: JOBSET_NAME=$JOBSET_NAME $SELF logs" >&2
}

(($# > 0)) || usage
command=$1
shift
case $command in
  tpu)
    common_variables
    tpu_variables
    apply tpu "$COMMON_VARIABLES TPU_ACCELERATOR TPU_TOPOLOGY CHIPS_PER_HOST NUM_HOSTS" "$@"
    ;;
  gpu)
    common_variables
    gpu_variables
    apply gpu "$COMMON_VARIABLES NUM_NODES GPUS_PER_NODE GPU_ACCELERATOR COORDINATOR_PORT" "$@"
    ;;
  logs)
    check_name
    kubectl_cmd logs --follow --tail=200 \
      --selector="jobset.sigs.k8s.io/jobset-name=$JOBSET_NAME,jobset.sigs.k8s.io/replicatedjob-name=workers,batch.kubernetes.io/job-completion-index=0"
    ;;
  delete)
    check_name
    kubectl_cmd delete jobset "$JOBSET_NAME"
    ;;
  *) usage ;;
esac
