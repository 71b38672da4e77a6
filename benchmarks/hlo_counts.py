"""Op counts of the compiled ResNet-50 train step on the CPU backend, 1 and 8 devices."""
import collections
import os
import re

os.environ.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                  XLA_FLAGS="--xla_force_host_platform_device_count=8")

from imagenet_jax.bench import hlo  # noqa: E402
from imagenet_jax.config import base_config  # noqa: E402


def compiled(batch_size, mesh_data):
    config = base_config()
    config.update(model="resnet50", dataset="synthetic", image_size=64, dtype="float32",
                  batch_size=batch_size, eval_batch_size=batch_size)
    config.mesh.data = mesh_data
    return hlo.compiled_train_step(config)


def physical_order(shape):
    """Dimensions from major to minor, size-1 ones left out; None for shapes without a layout."""
    m = re.match(r"\w+\[([0-9,]*)\]\{([0-9,]*)", shape)
    if not m:
        return None
    sizes = [int(d) for d in m.group(1).split(",") if d]
    return [d for d in reversed([int(x) for x in m.group(2).split(",") if x]) if sizes[d] != 1]


def summary(text, param_bytes):
    comps = hlo.computations(text)
    entry = comps["ENTRY"]
    calls = lambda rest: re.search(r"calls=%([\w.\-]+)", rest).group(1)  # noqa: E731
    fusions = [(n, s, rest, comps[calls(rest)]) for n, s, op, rest in entry if op == "fusion"]
    kinds = collections.Counter(re.search(r'kind=(k\w+)', r).group(1) +
                                ("/" + k.group(1) if (k := re.search(r'"kind":"(\w+)"', r)) else "")
                                for _, _, r, _ in fusions)
    print(f"parameter bytes {param_bytes:,}; fusion instructions {len(fusions)} {dict(kinds)}")
    print("entry opcodes:", dict(collections.Counter(op for _, _, op, _ in entry).most_common()))
    transposes = collections.Counter()
    for _, _, _, body in fusions:
        for _, shape, op, rest in body:
            if op == "transpose":
                what = "kernel" if re.match(r"f32\[[137],[137],", shape) else "activation"
                origin = "from jax" if 'op_name="' in rest else "compiler-inserted"
                transposes[(what, origin)] += 1
    print("transposes (entry, fused):",
          sum(op == "transpose" for _, _, op, _ in entry), dict(transposes))
    moving = []  # fused copies whose physical dimension order differs from their operand's
    for name, body in comps.items():
        shapes = {n: shape for n, shape, _, _ in body}
        for _, shape, op, rest in body:
            source = shapes.get(rest.split(")")[0].lstrip("%"))
            if name != "ENTRY" and op == "copy" and source and \
                    physical_order(shape) != physical_order(source):
                moving.append(hlo.nbytes(shape))
    print(f"fused copies that move data (the physical transposes): {len(moving)}, "
          f"{sum(moving) / 2**20:.1f} MiB")
    convs = [r for c in comps.values() for _, _, op, r in c if op == "convolution"]
    print("convolutions:", len(convs), dict(collections.Counter(
        re.search(r"dim_labels=([^, ]+)", r).group(1) for r in convs)))
    ops_of = lambda body: {op for _, _, op, _ in body}  # noqa: E731
    names_of = lambda body: " ".join(r for *_, r in body)  # noqa: E731
    bn_relu = collections.Counter(
        "transpose" in ops_of(b) for *_, b in fusions
        if {"subtract", "multiply", "add", "maximum"} <= ops_of(b) and "relu" in names_of(b)
        and "transpose(" not in names_of(b))
    print("BN: rsqrt fusions", sum("rsqrt" in ops_of(b) for *_, b in fusions),
          "outputs", {s.split("{")[0][:9] for _, s, _, b in fusions if "rsqrt" in ops_of(b)},
          "; normalise+scale+bias+ReLU fusions:", bn_relu[False],
          "plus", bn_relu[True], "recomputing it inside a transpose")
    inputs = {n for n, _, op, _ in entry if op == "parameter"}
    copies = [(s, r) for _, s, op, r in entry
              if op == "copy" and r.split(")")[0].lstrip("%") in inputs]
    print(f"copies of state inputs: {len(copies)}, {sum(hlo.nbytes(s) for s, _ in copies):,} bytes")
    found = hlo.collectives(text)
    all_reduces = sorted((hlo.nbytes(i.shape) for i in found["all-reduce"]), reverse=True)
    print(f"all-reduce: {len(all_reduces)} ops, {sum(all_reduces):,} bytes "
          f"({sum(all_reduces) / param_bytes:.4f} x parameter bytes); largest {all_reduces[:3]}; "
          "all-gather:", [i.shape for i in found["all-gather"]])


summary(*compiled(batch_size=8, mesh_data=1))
summary(*compiled(batch_size=16, mesh_data=-1))
