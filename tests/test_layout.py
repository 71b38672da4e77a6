"""The import graph the package is built on: what each part may not pull in."""

import json
import subprocess
import sys

from conftest import REPO

# module -> packages it must never import (directly or through others)
FORBIDDEN = {
    "imagenet_jax.config": ("imagenet_jax.data", "imagenet_jax.parallel", "imagenet_jax.train",
                            "imagenet_jax.models"),
    "imagenet_jax.models": ("imagenet_jax.data", "imagenet_jax.train", "imagenet_jax.cli"),
    "imagenet_jax.data.pipeline": ("imagenet_jax.models", "imagenet_jax.train",
                                   "imagenet_jax.cli"),
    "imagenet_jax.checkpoint": ("imagenet_jax.train", "imagenet_jax.cli"),
}


def _imported_by(module: str) -> list[str]:
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('imagenet_jax'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_config_imports_only_the_leaves():
    assert _imported_by("imagenet_jax.config") == [
        "imagenet_jax", "imagenet_jax.config", "imagenet_jax.errors", "imagenet_jax.spec"]
    for leaf in ("imagenet_jax.errors", "imagenet_jax.spec"):  # any part may import these
        assert _imported_by(leaf) == ["imagenet_jax", leaf]


def test_no_part_imports_what_it_must_not():
    for module, forbidden in FORBIDDEN.items():
        if module == "imagenet_jax.config":
            continue  # pinned exactly above
        imported = _imported_by(module)
        bad = [m for m in imported if m.startswith(forbidden)]
        assert not bad, f"{module} imports {bad}"
