"""Reads through Python that any process can run: a tf.data service worker included.

TFDS's ArrayRecord files and gs:// objects are read by Python code inside the graph. A
`tf.numpy_function` callback lives in the Python of the process that built the graph,
under a token that numbers it ("pyfunc_7"), so a worker process that receives the graph
finds nothing under that token. A named read's token says instead how to open its
reader ('imagenet_jax:array_record:{"paths": [...], "lengths": [...]}'), and
`install()`, called in every process that builds or runs such graphs, lets TensorFlow's
registry of callbacks open the reader on first use from the token alone.

TensorFlow offers no public way to do this: it goes through `script_ops._py_funcs` and
`gen_script_ops.py_func_stateless` (tests/test_private_apis.py pins both).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import gen_script_ops, script_ops

PREFIX = "imagenet_jax:"
_lock = threading.Lock()
_opened: dict[str, Callable] = {}  # token -> its callback, kept for the process's life


def _array_record(arguments: dict) -> Callable[[np.ndarray], np.ndarray]:
    from imagenet_jax.data.records import ArrayRecordShards

    records = ArrayRecordShards(arguments["paths"], arguments["lengths"])
    return lambda indices: np.asarray(records.read(indices), dtype=object)


def _objects(arguments: dict) -> Callable[[np.ndarray], np.ndarray]:
    from imagenet_jax import storage

    storage.configure()
    return lambda paths: np.asarray(storage.read_many([p.decode() for p in paths]), dtype=object)


_OPENERS = {"array_record": _array_record, "objects": _objects}


def _open(token: str) -> Callable | None:
    kind, _, arguments = token[len(PREFIX):].partition(":")
    if kind not in _OPENERS:
        return None
    with _lock:
        if token not in _opened:
            _opened[token] = _OPENERS[kind](json.loads(arguments))
        return _opened[token]


class _Callbacks:
    """TensorFlow's token -> callback map, which also opens named reads by their token."""

    def __init__(self, inner):
        self._inner = inner

    def get(self, token, default=None):
        found = self._inner.get(token)
        if found is None and token.startswith(PREFIX):
            found = _open(token)
        return default if found is None else found

    def __setitem__(self, token, func) -> None:
        self._inner[token] = func

    def __getitem__(self, token):
        return self._inner[token]

    def pop(self, token, default=None):
        return self._inner.pop(token, default)

    def __len__(self) -> int:
        return len(self._inner)


def install() -> None:
    """Lets this process run named reads (idempotent)."""
    registry = script_ops._py_funcs  # noqa: SLF001 - see the module docstring
    with _lock:
        if not isinstance(registry._funcs, _Callbacks):  # noqa: SLF001
            registry._funcs = _Callbacks(registry._funcs)  # noqa: SLF001


def _call(kind: str, arguments: dict, inputs: tf.Tensor) -> tf.Tensor:
    """In-graph: the named read `kind` with `arguments` applied to a vector of inputs,
    giving a string vector of the same length. Stateless: the same inputs give the same
    bytes, so tf.data may reorder and parallelise the calls."""
    install()
    token = f"{PREFIX}{kind}:{json.dumps(arguments, sort_keys=True)}"
    (outputs,) = gen_script_ops.py_func_stateless(input=[inputs], token=token, Tout=[tf.string])
    outputs.set_shape(inputs.shape)
    return outputs


def read_records(paths: list[str], lengths: list[int]) -> Callable[[tf.Tensor], tf.Tensor]:
    """In-graph: int64 indices [n] -> the serialized records at those positions of the
    ArrayRecord shards `paths` (of `lengths` records each)."""
    arguments = {"paths": [str(p) for p in paths], "lengths": [int(n) for n in lengths]}
    return lambda indices: _call("array_record", arguments, indices)


def read_objects(paths: tf.Tensor) -> tf.Tensor:
    """In-graph: object URLs [n] (gs://...) -> their contents [n], fetched concurrently."""
    return _call("objects", {}, paths)
