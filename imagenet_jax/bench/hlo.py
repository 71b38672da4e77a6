"""Reading compiled HLO text: instructions by computation, collectives, array bytes.

`jitted.lower(...).compile().as_text()` is the program XLA runs. The tests and the
scripts in benchmarks/ read it to pin what the compiler did (collectives, copies,
transposes, fusions), not what the Python asked for.
"""

import collections
import math
import re
from typing import NamedTuple

import jax
import ml_collections

# `  %name = SHAPE opcode(operands), attributes`; a tuple SHAPE is parenthesised.
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (\S+|\(.*?\)) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|bf16|[fsu]\d+(?:e\d+m\d+\w*)?)\[([0-9,]*)\]")  # f8e4m3fn too
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")


class Instruction(NamedTuple):
    name: str
    shape: str  # the result: `f32[16,1000]{1,0}`, or a tuple of such
    opcode: str
    rest: str  # operands, then attributes


def computations(hlo: str) -> dict[str, list[Instruction]]:
    """{computation name: its instructions}; the entry computation is 'ENTRY'."""
    found, current = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.endswith("{"):
            current = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
            found[current] = []
        elif current and (m := _INSTRUCTION.match(line)):
            found[current].append(Instruction(*m.groups()))
    return found


def collectives(hlo: str) -> dict[str, list[Instruction]]:
    """{opcode: instructions} of the collectives anywhere in the program; an async
    pair (`all-reduce-start`/`-done`) counts once, under its plain opcode."""
    found = collections.defaultdict(list)
    for body in computations(hlo).values():
        for instruction in body:
            opcode = instruction.opcode.removesuffix("-start")
            if opcode in COLLECTIVES:
                found[opcode].append(instruction)
    return found


def arrays(shapes: str) -> list[tuple[str, tuple[int, ...]]]:
    """(element type, dimensions) of every array in HLO shape text, tuples included."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(shapes)]


def result_arrays(instruction: Instruction) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays a collective produces. An async `all-gather-start` returns its operands
    and its results together; only the results (the second half) are what it gathers."""
    found = arrays(instruction.shape)
    return found[len(found) // 2:] if instruction.opcode == "all-gather-start" else found


def nbytes(shapes: str | list[tuple[str, tuple[int, ...]]]) -> int:
    """The bytes of every array in HLO shape text, or in `arrays`' list (pred: 1 byte;
    fN, sN, uN, f8e4m3fn...: N bits, rounded up to whole bytes per array)."""
    listed = arrays(shapes) if isinstance(shapes, str) else shapes
    return sum(-(-_bits(dtype) * math.prod(dims) // 8) for dtype, dims in listed)


def _bits(dtype: str) -> int:
    return 8 if dtype == "pred" else int(re.match(r"[a-z]+?(\d+)", dtype).group(1))


def compiled_train_step(config: ml_collections.ConfigDict) -> tuple[str, int]:
    """The HLO text of `config`'s compiled train step, on a synthetic batch, and the bytes
    of its parameters: built exactly as a run builds it (`assemble.plan`, `assemble.build`)."""
    from imagenet_jax.bench.train import synthetic_batches
    from imagenet_jax.parallel import mesh_from_shape
    from imagenet_jax.train import assemble

    _, derived = assemble.plan(config)
    mesh = mesh_from_shape(derived.mesh_shape, derived.dcn_data)
    run = assemble.build(config, derived, mesh)
    batch = next(synthetic_batches(config, derived, mesh))
    param_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(run.state.params))
    return run.train_step.lower(run.state, batch).compile().as_text(), param_bytes
