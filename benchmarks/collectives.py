"""The collectives of the compiled train step: count and bytes per device, by kind.

Usage (8 fake CPU devices; ResNet-50 at 224 px takes a few minutes a layout on 2 cores):
  .venv/bin/python benchmarks/collectives.py [MODEL] [IMAGE_SIZE] [LAYOUT ...]
LAYOUT is `dp` (mesh data=8, global BatchNorm), `dp_bn1` (data=8, per-device BatchNorm)
or `fsdp` (data=2, fsdp=4, the default fsdp_min_size). Default: resnet50 224 dp dp_bn1 fsdp.

Bytes are the result shapes of the collectives in the compiled HLO (all-reduce: the
array reduced; all-gather: the whole array gathered; reduce-scatter: its input), so
"bytes" is the size of the arrays involved, not what a ring moves over a link.
"""

import os
import sys
import time

os.environ.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                  XLA_FLAGS="--xla_force_host_platform_device_count=8")

from imagenet_jax.bench import hlo  # noqa: E402
from imagenet_jax.config import base_config  # noqa: E402

# (mesh, BatchNorm group in examples: 2 = each device's 16 / 8)
LAYOUTS = {"dp": ({"data": 8, "fsdp": 1}, 0), "dp_bn1": ({"data": 8, "fsdp": 1}, 2),
           "fsdp": ({"data": 2, "fsdp": 4}, 0)}


def compiled_step(dataset: str, model: str, image_size: int, layout: str):
    mesh_sizes, group_size = LAYOUTS[layout]
    config = base_config()
    config.update(model=model, dataset=dataset, image_size=image_size, batch_size=16,
                  eval_batch_size=16, batchnorm_group_examples=group_size)
    config.mesh.update(mesh_sizes)
    return hlo.compiled_train_step(config)


def summary(text: str, param_bytes: int) -> None:
    by_kind = {}
    for kind, instructions in hlo.collectives(text).items():
        # A reduce-scatter's input, not its (1/n) result, is the array reduced.
        by_kind[kind] = [hlo.nbytes(i.rest.split(")")[0]) if kind == "reduce-scatter"
                         else hlo.nbytes(hlo.result_arrays(i)) for i in instructions]
    print(f"  parameter bytes {param_bytes:,}")
    for kind, sizes in sorted(by_kind.items()):
        sizes.sort(reverse=True)
        small = [s for s in sizes if s < 1 << 20]
        print(f"  {kind}: {len(sizes)} ops, {sum(sizes):,} B "
              f"({sum(sizes) / param_bytes:.4f} x parameter bytes); largest {sizes[:3]}; "
              f"{len(small)} under 1 MiB totalling {sum(small):,} B")


def main(argv: list[str]) -> None:
    model = argv[1] if len(argv) > 1 else "resnet50"
    image_size = int(argv[2]) if len(argv) > 2 else 224
    layouts = argv[3:] or list(LAYOUTS)
    for layout in layouts:
        start = time.perf_counter()
        # The synthetic dataset: ImageNet's 1,000 classes, no files.
        text, param_bytes = compiled_step("synthetic", model, image_size, layout)
        print(f"{model} {image_size} px, batch 16 on 8 devices, {layout} "
              f"{LAYOUTS[layout]} ({time.perf_counter() - start:.0f} s):")
        summary(text, param_bytes)


if __name__ == "__main__":
    main(sys.argv)
