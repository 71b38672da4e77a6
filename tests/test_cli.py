"""The command line: bad configs fail fast with one clear line and exit code 2; its help
comes from its table of commands."""

import re
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from imagenet_jax.cli import COMMANDS
from imagenet_jax.commands import FLAG_DEFINITIONS
from imagenet_jax.errors import ExitStatus


def run_cli(*args, timeout=120, devices=8):
    return subprocess.run([sys.executable, "-m", "imagenet_jax", *args], cwd=REPO,
                          env=subprocess_env(devices), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("override,message", [
    ("--config.model=resnet5", "unknown model 'resnet5'; valid models: "),
    ("--config.dataset=imagenet", "unknown dataset 'imagenet'; valid forms: "),
    ("--config.batch_size=12", "batch_size=12 is not divisible by the number of devices (8)"),
    ("--config.num_epochs=0", "num_epochs must be positive, got 0"),
    ("--config.profile_num_steps=-1", "profile_num_steps must be >= 0, got -1"),
    ("--config.data_service=local:0", "data_service 'local:0': expected '' (the pipeline"),
    ("--config.no_such_field=1", "no_such_field"),
    ("--config.dataset=folder:/does/not/exist", "/does/not/exist has no train/ directory"),
])
def test_bad_config_exits_2_with_one_line(override, message, tmp_path):
    result = run_cli("train", override, f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("imagenet-jax: error")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before anything ran


def test_unknown_command():
    result = run_cli("trian")
    assert result.returncode == 2
    assert ("unknown command 'trian'; valid commands: train, eval, predict, import, export, "
            "plot, goodput, models, bench") in result.stderr


def test_help_shows_how_to_override():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    assert "--config.FIELD=VALUE" in result.stdout + result.stderr


def test_each_command_takes_only_its_own_flags():
    result = run_cli("train", "--steps=5")
    assert result.returncode == 2
    assert "train takes no --steps; it is a flag of bench" in result.stderr
    help_text = run_cli("plot", "--help").stdout
    assert "--out" in help_text and "--workdir" not in help_text and "--steps" not in help_text


def test_help_lists_every_exit_status_and_command():
    result = run_cli("--help")
    assert result.returncode == ExitStatus.OK, result.stderr[-2000:]
    for status in ExitStatus:
        assert re.search(rf"^ *{status.value} +{re.escape(status.meaning)}$", result.stdout,
                         re.MULTILINE), f"--help does not list exit status {status!r}"
    text = " ".join(result.stdout.split())  # as wrapped to the terminal's width
    for command in COMMANDS.values():
        for usage in command.usage:
            assert f"imagenet-jax {' '.join(usage.split())}" in text, usage
        assert " ".join(command.help.split()) in text, command.name


def test_the_table_defines_each_flag_it_names_and_names_each_defined_flag():
    named = {flag for command in COMMANDS.values() for flag in command.flags}
    assert named - {"config", "config.*"} == set(FLAG_DEFINITIONS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help_lists_exactly_its_flags(name):
    result = run_cli(name, "--help")
    assert result.returncode == ExitStatus.OK, result.stderr[-2000:]
    usage, _, flags = result.stdout.partition("\nFlags:\n")
    assert " ".join(COMMANDS[name].help.split()) in " ".join(usage.split())
    listed = {}
    for line in flags.splitlines():
        flag = re.match(r"  --(config\.FIELD=VALUE|[a-z_]+)", line)[1]
        listed["config.*" if flag == "config.FIELD=VALUE" else flag] = line
    assert list(listed) == [*COMMANDS[name].flags, "verbosity"]
    for flag in COMMANDS[name].flags:
        if flag in FLAG_DEFINITIONS:
            assert FLAG_DEFINITIONS[flag][2] in listed[flag], flag  # its help, whole
