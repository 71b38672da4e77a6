"""Test set-up: 8 fake CPU devices, quiet TensorFlow, and a tiny demo dataset."""

import atexit
import fcntl
import os
import shutil
import tempfile

# Before jax is imported anywhere: the suite runs on 8 fake CPU devices, so every
# test can build a 1-device mesh and an 8-device mesh side by side.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole session, its subprocesses included: the CLI runs
# of the same tiny config load the compiled steps instead of compiling them again.
_XLA_CACHE = tempfile.mkdtemp(prefix="imagenet_jax_tests_xla_cache.")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import tiny_config as tiny  # noqa: E402

from imagenet_jax import storage  # noqa: E402
from imagenet_jax.data import demo  # noqa: E402

storage.configure()  # as the CLI does first: gs:// through gcsfs for the whole session

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(devices: int) -> dict:
    """The environment of a CLI subprocess: `devices` fake CPU devices, quiet TensorFlow,
    and (inherited) this session's compilation cache."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


# 10 classes x 40 train and x 7 val images: 70 val examples, not a multiple of any
# batch the tests use, so the last eval batch is always ragged.
TINY_SPLITS = {"train": 40, "val": 7}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_demo")
    demo.write_demo_dataset(root, TINY_SPLITS)
    return root


def tiny_config(dataset_root: Path, **overrides):
    """tests/configs/tiny.py on `dataset_root`, with `overrides` applied."""
    config = tiny.get_config()
    config.dataset = f"folder:{dataset_root}"
    for key, value in overrides.items():
        config[key] = value
    return config


# The large-batch recipe's fields ride on every resumable run, so that the kill-and-resume
# test proves each of them resumes bitwise: LARS, EMA, mixup and CutMix, RandAugment,
# progressive resizing (12 px for epochs 0-1, 16 px for 2-3: two compiled sizes) and
# BatchNorm groups of 8 (each of the 4 devices' examples).
RESUMABLE_RECIPE = {
    "optimizer": "lars", "lars_trust_coefficient": 0.1, "ema_decay": 0.9,
    "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "randaugment": "2,9",
    "batchnorm_group_examples": 8, "progressive_resize.start_size": 12,
    "progressive_resize.end_size": 16, "progressive_resize.start_epoch": 1.0,
    "progressive_resize.end_epoch": 3.0, "progressive_resize.step": 4,
}


def resumable_flags(dataset_root: Path, *extra: str) -> list[str]:
    """CLI flags of the tiny recipe with RESUMABLE_RECIPE for 4 epochs (48 steps), a
    checkpoint every 8 steps (each costs ~0.8 s here: every 4 steps made the run 1.5x
    as long)."""
    recipe = [f"--config.{name}={value}" for name, value in RESUMABLE_RECIPE.items()]
    return ["--config=tests/tiny_config.py", f"--config.dataset=folder:{dataset_root}",
            "--config.num_epochs=4", "--config.checkpoint_every_steps=8", *recipe, *extra]


def resumable_config(dataset_root: Path, **overrides):
    """The config `resumable_flags` gives, as an object."""
    from imagenet_jax.config import set_field

    config = tiny_config(dataset_root, num_epochs=4.0, checkpoint_every_steps=8, **overrides)
    for name, value in RESUMABLE_RECIPE.items():
        set_field(config, name, value)
    return config


@pytest.fixture(scope="session")
def uninterrupted(tiny_dataset, tmp_path_factory) -> Path:
    """A finished run of `resumable_flags` on 4 devices: what resumed runs must equal.
    Made once per session, whichever pytest worker (`make test`'s -n 2) asks first; the
    tests only read it (a finished workdir is never written again)."""
    from chaos import run_to_end

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's own
    workdir = shared / "uninterrupted"
    with open(shared / "uninterrupted.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker waits here while it is made
        if not (shared / "uninterrupted.done").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            run_to_end(resumable_flags(tiny_dataset), workdir, subprocess_env(4))
            (shared / "uninterrupted.done").touch()
    return workdir
