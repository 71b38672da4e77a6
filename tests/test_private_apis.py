"""The private library APIs this project uses, each pinned so that an upgrade that moves
or changes it fails here, by name, rather than somewhere deep in a run.

- `jax._src.clusters.cloud_tpu_cluster.GceTpuCluster.is_env_present()`, in
  imagenet_jax/parallel/distributed.py (`_on_cloud_tpu_vm`): whether this is a Cloud TPU
  VM, whose hosts are listed in the VM's metadata. JAX has no public call that asks
  whether a cluster is present without joining it.
- `tensorflow.python.ops.script_ops._py_funcs` (TensorFlow's registry of numpy_function
  callbacks, its `_funcs` map) with `gen_script_ops.py_func_stateless`, in
  imagenet_jax/data/named_reads.py: reads through Python that a tf.data service worker
  process can run, opened there from their token. TensorFlow has no public way to run a
  Python read in another process's graph.

That is the whole list: `test_no_other_private_library_api_is_used` scans the project's
code for imports and module attribute paths of a library that name a private part.

Not private, but pinned the same way: imagenet_jax/models/layers.py computes BatchNorm's
training statistics itself (for groups of examples) and must stay nnx.BatchNorm's
arithmetic for one group.
"""

import ast
import inspect
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagenet_jax.models.layers import BatchNorm

REPO = Path(__file__).resolve().parents[1]
PROJECT_CODE = ("imagenet_jax", "configs", "scripts", "benchmarks", "launch")
ALLOWED = {("imagenet_jax/parallel/distributed.py",
            "jax._src.clusters.cloud_tpu_cluster.GceTpuCluster"),
           ("imagenet_jax/data/named_reads.py", "tensorflow.python.ops.script_ops._py_funcs")}


def test_jax_cloud_tpu_detection_is_where_distributed_py_expects_it():
    update = (f"jax {jax.__version__} moved or changed GceTpuCluster.is_env_present: "
              "update _on_cloud_tpu_vm in imagenet_jax/parallel/distributed.py")
    try:
        from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster
    except ImportError as e:
        pytest.fail(f"{update} ({e})")
    is_env_present = getattr(GceTpuCluster, "is_env_present", None)
    assert callable(is_env_present), update
    required = [p for p in inspect.signature(is_env_present).parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert not required, f"{update}: it now takes {required}"


def _is_private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.endswith("__") for part in dotted.split("."))


def _is_library(module: str) -> bool:
    top = module.split(".")[0]
    return top != "imagenet_jax" and top not in sys.stdlib_module_names


def _dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _private_library_references(source: str) -> set[str]:
    """Private parts of libraries named in `source`: in imports, and in attribute paths
    from an imported library (`jax._src.x`)."""
    tree = ast.parse(source)
    library_names, found = {}, set()  # local name -> the library path it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_library(alias.name):
                    local = alias.asname or alias.name.split(".")[0]
                    library_names[local] = alias.name if alias.asname else local
                    found |= {alias.name} if _is_private(alias.name) else set()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_library(node.module):
            for alias in node.names:
                path = f"{node.module}.{alias.name}"
                library_names[alias.asname or alias.name] = path
                found |= {path} if _is_private(path) else set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            parts = _dotted(node)
            if parts and parts[0] in library_names:
                found.add(".".join([library_names[parts[0]], *parts[1:]]))
    return found


def test_tensorflow_runs_a_named_read_it_was_never_given(tmp_path, monkeypatch):
    """A graph naming a read by its token alone (as a data service worker receives it)
    runs: TensorFlow's callback registry asks named_reads for the unknown token."""
    import tensorflow as tf

    from imagenet_jax.data import named_reads

    opened = []

    def open_doubling(arguments):
        opened.append(arguments)
        return lambda values: np.asarray([v * arguments["by"] for v in values], dtype=object)

    monkeypatch.setitem(named_reads._OPENERS, "test_repeat", open_doubling)
    named_reads.install()
    token = named_reads.PREFIX + 'test_repeat:{"by": 2}'
    from tensorflow.python.ops import gen_script_ops

    (out,) = gen_script_ops.py_func_stateless(input=[tf.constant([b"a", b"bc"])], token=token,
                                              Tout=[tf.string])
    assert out.numpy().tolist() == [b"aa", b"bcbc"] and opened == [{"by": 2}]


def test_the_scan_finds_private_imports_and_attribute_paths():
    source = ("import jax\nimport numpy as np\nfrom flax.nnx.nn.normalization import "
              "_normalize\nfrom jax._src import clusters\nx = jax._src.config\n"
              "y = np.__version__\nz = self._private\nimport os\nos._exit(0)\n")
    assert _private_library_references(source) == {
        "flax.nnx.nn.normalization._normalize", "jax._src.clusters", "jax._src"}


def test_no_other_private_library_api_is_used():
    used = {(str(path.relative_to(REPO)), name)
            for folder in PROJECT_CODE for path in sorted((REPO / folder).rglob("*.py"))
            for name in _private_library_references(path.read_text())}
    assert used == ALLOWED, (
        f"private library APIs used {sorted(used - ALLOWED)}, no longer used "
        f"{sorted(ALLOWED - used)}: use a public API, or list it in ALLOWED and this "
        "file's docstring with a test that pins it")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_batchnorm_of_one_group_is_nnx_batchnorm(dtype):
    """Train (twice, so the running averages start from non-initial values) and eval,
    jitted as training runs them: the same outputs, output dtype and running statistics
    as nnx.BatchNorm, to round-off in the output dtype."""
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 6)) * 3 + 1  # mean far from 0
    settings = dict(momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                    scale_init=nnx.initializers.normal(1.0),
                    bias_init=nnx.initializers.normal(1.0))
    ours = BatchNorm(6, num_groups=1, rngs=nnx.Rngs(0), **settings)
    flax_own = nnx.BatchNorm(6, rngs=nnx.Rngs(0), **settings)
    # One group trains through nnx.BatchNorm's own __call__: call the grouped code itself.
    forward = nnx.jit(lambda norm, x: norm._grouped(x)  # noqa: SLF001
                      if isinstance(norm, BatchNorm) and not norm.use_running_average
                      else norm(x))
    output_tolerance = {jnp.float32: 1e-6, jnp.bfloat16: 2.0 ** -8, jnp.float16: 2.0 ** -11}[dtype]
    update = (f"layers.BatchNorm no longer computes what nnx.BatchNorm (flax "
              f"{flax.__version__}) does: update imagenet_jax/models/layers.py")
    for mode, inputs in (("train", x), ("train", x * 0.5 - 2), ("eval", x)):
        getattr(ours, mode)(), getattr(flax_own, mode)()
        got, expected = forward(ours, inputs), forward(flax_own, inputs)
        assert got.dtype == expected.dtype == dtype, update
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                                   rtol=output_tolerance, atol=output_tolerance,
                                   err_msg=f"{mode} output: {update}")
        for name in ("mean", "var"):
            np.testing.assert_allclose(getattr(ours, name)[...], getattr(flax_own, name)[...],
                                       rtol=1e-6, atol=1e-7,
                                       err_msg=f"running {name} after {mode}: {update}")
