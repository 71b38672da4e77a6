"""The grammars of `config.dataset`, `config.randaugment` and `config.data_service`, and
the names of the mesh axes.

A leaf: it imports nothing of imagenet_jax (so config, data and parallel never form a
cycle) and no TensorFlow, so checking a config reports a mistake before anything heavy
loads."""

# The device mesh's axes, major to minor. Both split the batch; parameters are sharded
# over 'fsdp' only (ZeRO-3 style). config.mesh and config.sharding_rules name them.
DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)

DATASET_FORMS = ("'demo', 'demo_transfer' (the fine-tuning demonstration's), "
                 "'folder:/path/to/root' (with root/train/<class>/*, root/val/<class>/*), "
                 "'tfds:NAME' (e.g. tfds:imagenet2012) or 'synthetic[:classes=N,train=N,val=N]'")


def parse_dataset(spec: str) -> tuple[str, str]:
    """Splits `spec` into (kind, argument); raises ValueError naming the valid forms."""
    if spec in ("demo", "demo_transfer", "synthetic"):
        return spec, ""
    kind, sep, arg = spec.partition(":")
    if kind in ("folder", "tfds", "synthetic") and sep and arg:
        return kind, arg
    raise ValueError(f"unknown dataset {spec!r}; valid forms: {DATASET_FORMS}")


MAX_RANDAUGMENT_MAGNITUDE = 30.0  # the RandAugment paper's scale: 10 is AutoAugment's maximum


def parse_randaugment(spec: str) -> tuple[int, float] | None:
    """The config string "N,M" (e.g. "2,9": 2 layers at magnitude 9) as (N, M); "" as None."""
    if not spec.strip():
        return None
    expected = ("expected 'N,M' with N the number of ops per image (an integer >= 1) and M the "
                "magnitude (a number in [0, 30]), e.g. '2,9'; or '' for no RandAugment")
    parts = spec.split(",")
    if len(parts) != 2:
        raise ValueError(f"randaugment {spec!r}: {expected}")
    try:
        num_layers = int(parts[0])
    except ValueError:
        raise ValueError(f"randaugment {spec!r}: N={parts[0].strip()!r} is not an integer; "
                         f"{expected}") from None
    try:
        magnitude = float(parts[1])
    except ValueError:
        raise ValueError(f"randaugment {spec!r}: M={parts[1].strip()!r} is not a number; "
                         f"{expected}") from None
    if num_layers < 1:
        raise ValueError(f"randaugment {spec!r}: N={num_layers} is below 1; {expected}")
    if not 0.0 <= magnitude <= MAX_RANDAUGMENT_MAGNITUDE:
        raise ValueError(f"randaugment {spec!r}: M={magnitude:g} is outside [0, 30]; {expected}")
    return num_layers, magnitude


DATA_SERVICE_FORMS = ("'' (the pipeline in this process), 'local:N' (a dispatcher and N worker "
                      "processes on this host) or 'grpc://HOST:PORT' (an external dispatcher)")


def parse_data_service(spec: str) -> tuple[str, str]:
    """The config string `data_service` as ('', ''), ('local', 'N') or ('grpc', 'HOST:PORT');
    raises ValueError naming the valid forms."""
    if spec == "":
        return "", ""
    kind, sep, argument = spec.partition(":")
    if kind == "local" and sep and argument.isdigit() and int(argument) >= 1:
        return "local", str(int(argument))
    if spec.startswith("grpc://"):
        host, sep, port = spec[len("grpc://"):].rpartition(":")
        if host and sep and port.isdigit() and 0 < int(port) < 65536:
            return "grpc", f"{host}:{port}"
    raise ValueError(f"data_service {spec!r}: expected {DATA_SERVICE_FORMS}")
