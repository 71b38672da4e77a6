"""One process of a 2-process restore: `python tests/restore_agreement.py PORT ID CKPT_DIR`.

Each process restores a small replicated state from its own view of the checkpoint
folder (a stale mount can show one host damaged files that another reads fine) and
prints `restored step N`. Run by tests/test_restore.py.
"""

import sys

import jax
import numpy as np


def main(port: int, process_id: int, directory: str) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               heartbeat_timeout_seconds=10)
    from imagenet_jax.checkpoint import Checkpointer

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    template = {"step": np.int32(0), "w": np.zeros((64,), np.float32)}
    template = jax.tree.map(
        lambda x: jax.make_array_from_callback(x.shape, replicated, lambda _, x=x: x), template)
    checkpointer = Checkpointer(directory, every_steps=1, keep=5, read_attempts=2,
                                retry_delay_s=0.05)
    restored = checkpointer.restore_latest(template)
    checkpointer.close()
    step = int(np.asarray(restored["step"].addressable_data(0)))
    w = float(np.asarray(restored["w"].addressable_data(0))[0])
    print(f"restored step {step} w {w}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
