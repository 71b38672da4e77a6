"""The `config.dataset` grammar, apart from the sources so that checking a config does
not import TensorFlow (2-3 s): a mistake is reported before anything heavy loads."""

DATASET_FORMS = ("'demo', 'folder:/path/to/root' (with root/train/<class>/*, root/val/<class>/*), "
                 "'tfds:NAME' (e.g. tfds:imagenet2012) or 'synthetic[:classes=N,train=N,val=N]'")


def parse_dataset(spec: str) -> tuple[str, str]:
    """Splits `spec` into (kind, argument); raises ValueError naming the valid forms."""
    if spec in ("demo", "synthetic"):
        return spec, ""
    kind, sep, arg = spec.partition(":")
    if kind in ("folder", "tfds", "synthetic") and sep and arg:
        return kind, arg
    raise ValueError(f"unknown dataset {spec!r}; valid forms: {DATASET_FORMS}")
