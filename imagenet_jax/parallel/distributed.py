"""Joining the processes of a multi-host job: `jax.distributed.initialize`, explicit or detected.

One process per host. With a coordinator address, the number of processes and this
process's id (flags, or the local launcher) it joins that job; with none, it joins the
cluster JAX detects (Cloud TPU VM pod slices, SLURM, Open MPI, ...) when one is
present, and otherwise runs alone. Connecting is bounded in time, and a peer that
stops answering is noticed within `heartbeat_timeout_s`, so no process waits forever.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging

from imagenet_jax.errors import JobUnavailable


@dataclasses.dataclass(frozen=True)
class JobSpec:
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 100

    @property
    def explicit(self) -> bool:
        return self.coordinator_address is not None


def detected_cluster() -> str | None:
    """The kind of multi-process cluster this process runs in, from its environment."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return "slurm"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "cloud_tpu"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "open_mpi"
    if _on_cloud_tpu_vm():
        return "cloud_tpu"
    return None


def _on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM (queued resources or `tpu-vm create`), whose host list lives in the
    VM's metadata rather than the environment. JAX's own check: it looks for a TPU
    locally before asking the metadata server, so elsewhere it costs nothing. Joining
    even a single-host VM's one-process job is harmless, and on a pod slice it is what
    lets every host agree on a preemption checkpoint."""
    try:
        # The project's one private JAX import (tests/test_private_apis.py pins it). No
        # public call asks whether a cluster is present: `jax.distributed.initialize()`
        # detects and joins in one step, and its error when nothing is detected cannot be
        # told from a failure to join.
        from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster
    except ImportError as e:
        logging.warning("Cannot detect a Cloud TPU VM (%s: JAX moved GceTpuCluster; update "
                        "imagenet_jax/parallel/distributed.py). Pass --coordinator_address, "
                        "--num_processes and --process_id to join a pod slice.", e)
        return False
    try:
        return bool(GceTpuCluster.is_env_present())
    except Exception:  # noqa: BLE001 - no detection means no cluster, never a crash
        return False


def initialize(spec: JobSpec) -> None:
    """Joins the job described by `spec` or detected; a no-op for a single process."""
    if spec.explicit:
        if spec.num_processes is None or spec.process_id is None:
            raise JobUnavailable("--coordinator_address needs --num_processes and --process_id")
        if not 0 <= spec.process_id < spec.num_processes:
            raise JobUnavailable(f"--process_id={spec.process_id} is not in "
                                   f"[0, {spec.num_processes})")
        kwargs = dict(coordinator_address=spec.coordinator_address,
                      num_processes=spec.num_processes, process_id=spec.process_id)
        where = f"coordinator {spec.coordinator_address}"
    elif cluster := detected_cluster():
        kwargs, where = {}, f"the {cluster} cluster's coordinator"
    else:
        return
    try:
        jax.distributed.initialize(**kwargs,
                                   initialization_timeout=spec.initialization_timeout_s,
                                   heartbeat_timeout_seconds=spec.heartbeat_timeout_s)
    except Exception as e:  # noqa: BLE001 - every failure to join reads the same to a user
        raise JobUnavailable(
            f"could not join the job through {where} within "
            f"{spec.initialization_timeout_s} s: {type(e).__name__}: {str(e)[:300]}") from None
    logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
