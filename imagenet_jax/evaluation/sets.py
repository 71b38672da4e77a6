"""Evaluation sets by name (`imagenet-jax eval --eval=SPEC,...`), mapped onto a model's classes.

  demo, folder:/path, tfds:NAME, synthetic...
      any dataset the trainer reads: its validation split. A folder may also be laid out
      root/<class>/<image> with no split folders (ImageNet-A, -R, -V2 as distributed).
  tfds:imagenet_v2/matched-frequency, /threshold-0.7, /topimages (or /top-images)
      ImageNetV2 (Recht et al. 2019), prepared by TFDS: a new test set drawn as ImageNet's.
  tfds:imagenet2012_real
      ImageNet's validation images with their ReaL labels (Beyer et al. 2020), prepared by
      TFDS from the validation tar and real.json.
  real:/path/real.json
      ReaL labels from the JSON of google-research/reassessed-imagenet (a list per
      validation image ILSVRC2012_val_NNNNNNNN, in order) over the run's own dataset,
      whose validation split must be ImageNet's (files or records named that way).

A set's classes are matched to the model's by name (ImageNet's wnids): every class the
set holds must be one of the model's. A set with fewer classes (a 200-class subset such
as ImageNet-A or -R) has the logits restricted to its classes, as its papers do.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from imagenet_jax import storage
from imagenet_jax.data import sources
from imagenet_jax.errors import ConfigError
from imagenet_jax.spec import parse_dataset
from imagenet_jax.train.steps import ClassMap

IMAGENET_V2 = "imagenet_v2"
IMAGENET_V2_VARIANTS = {"matched-frequency": "matched-frequency",
                        "threshold-0.7": "threshold-0.7",
                        "topimages": "topimages", "top-images": "topimages"}
REAL_TFDS = "imagenet2012_real"
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)
SPEC_FORMS = ("'demo', 'folder:/path', 'tfds:NAME' (e.g. tfds:imagenet2012, "
              "tfds:imagenet_v2/matched-frequency, tfds:imagenet2012_real), "
              "'real:/path/real.json' or 'synthetic[:...]'")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One evaluation set: its examples are `source`'s "val" split."""

    name: str                    # the SPEC it was named by
    kind: str                    # 'val', 'imagenet_v2' or 'real'
    source: sources.Source
    class_names: tuple[str, ...]  # the set's label names, in label order
    class_map: ClassMap          # onto the model's classes
    restricted: bool             # predictions limited to the set's classes
    # ReaL only: each example's acceptable labels, as model classes (by example index).
    real_labels: list[tuple[int, ...]] | None = None
    classes_not_in_model: tuple[str, ...] = ()  # (a TFDS set: allowed if no example has one)


def open_set(spec: str, *, model_classes: tuple[str, ...], run_dataset: str,
             data_dir: str | None) -> EvalSet:
    """Opens `spec` and maps it onto `model_classes`; raises ConfigError for anything the
    user must fix (an unknown or unprepared set, classes the model does not have)."""
    try:
        return _open_set(spec, model_classes, run_dataset, data_dir)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"eval set {spec!r}: {e}") from None


def _open_set(spec: str, model_classes, run_dataset, data_dir) -> EvalSet:
    kind, arg = spec.partition(":")[::2]
    if kind == "real":
        if not arg:
            raise ConfigError(f"eval set {spec!r}: real needs the labels file, "
                              "real:/path/real.json")
        source = _open_val(run_dataset, data_dir)
        real = _real_labels_from_json(arg, source, run_dataset)
        return _mapped(spec, "real", source, model_classes, real_labels=real,
                       real_classes=_imagenet_classes())
    try:
        kind, arg = parse_dataset(spec)
    except ValueError:
        raise ConfigError(f"unknown eval set {spec!r}; valid forms: {SPEC_FORMS}") from None
    if kind == "tfds":
        name = _tfds_name(arg)
        source = _open_tfds(name, data_dir)
        if name.partition(":")[0] == REAL_TFDS:
            real = source.feature_values("val", "real_label")
            names = tuple(source.features["real_label"].feature.names)
            return _mapped(spec, "real", source, model_classes, real_labels=real,
                           real_classes=names)
        set_kind = "imagenet_v2" if name.startswith(IMAGENET_V2) else "val"
        return _mapped(spec, set_kind, source, model_classes)
    return _mapped(spec, "val", _open_val(spec, data_dir), model_classes)


def _tfds_name(name: str) -> str:
    """imagenet_v2/top-images -> imagenet_v2/topimages (TFDS's config name)."""
    base, _, variant = name.partition("/")
    if base.partition(":")[0] != IMAGENET_V2:
        return name
    variant, colon, version = variant.partition(":")
    if variant not in IMAGENET_V2_VARIANTS:
        raise ConfigError(f"unknown ImageNetV2 variant {variant!r}; valid: "
                          f"{', '.join(IMAGENET_V2_VARIANTS)}")
    return f"{base}/{IMAGENET_V2_VARIANTS[variant]}{colon}{version}"


def _open_tfds(name: str, data_dir: str | None):
    from imagenet_jax.data import tfds_source  # TFDS is slow to import: only when used

    return tfds_source.open_tfds(name, data_dir, splits=("val",))


def _open_val(spec: str, data_dir: str | None) -> sources.Source:
    """A dataset the trainer reads, for its validation split only."""
    kind, arg = parse_dataset(spec)
    if kind == "folder":
        return sources.open_eval_folder(arg if storage.is_url(arg) else Path(arg).expanduser())
    if kind == "tfds":
        return _open_tfds(arg, data_dir)
    return sources.get_source(spec, data_dir)


def _mapped(spec: str, kind: str, source, model_classes: tuple[str, ...], *,
            real_labels: list | None = None, real_classes: tuple[str, ...] = ()) -> EvalSet:
    """The set with its labels mapped onto the model's classes by name.

    A folder's classes are the folders it holds, so one the model lacks is an error at
    once. A TFDS set names every class its label can take (ImageNetV2: all 1,000), not
    only those it holds: there a class the model lacks maps to -1, and an example that
    carries one is an error after the pass (`unknown_labels`).
    """
    set_classes = tuple(source.class_names)
    index = {name: i for i, name in enumerate(model_classes)}
    missing = [name for name in set_classes if name not in index]
    if missing and (isinstance(source, sources.FolderSource) or len(missing) == len(set_classes)):
        raise ConfigError(
            f"eval set {spec!r} has {len(missing)} class(es) the model does not have, e.g. "
            f"{', '.join(missing[:5])} (the model's {len(model_classes)} classes are those "
            "of its training set; an eval set's classes must be among them)")
    # Padded to the model's class count: the sets of a model share one compiled step
    # (only a TFDS set naming more classes than the model has needs another).
    label_to_class = np.full(max(len(model_classes), len(set_classes)), -1, np.int32)
    label_to_class[:len(set_classes)] = [index.get(name, -1) for name in set_classes]
    allowed = np.zeros(len(model_classes), bool)
    allowed[label_to_class[label_to_class >= 0]] = True
    if real_labels is not None:
        unknown = sorted({real_classes[c] for labels in real_labels for c in labels} - set(index))
        if unknown:
            raise ConfigError(f"eval set {spec!r}: its ReaL labels name {len(unknown)} class(es) "
                              f"the model does not have, e.g. {', '.join(unknown[:5])}")
        real_labels = [tuple(index[real_classes[c]] for c in labels) for labels in real_labels]
    return EvalSet(spec, kind, source, set_classes, ClassMap(allowed, label_to_class),
                   restricted=not allowed.all(), real_labels=real_labels,
                   classes_not_in_model=tuple(missing))


def unknown_labels(eval_set: EvalSet, labels: np.ndarray) -> None:
    """Raises ConfigError if examples of `eval_set` carry a class the model lacks (-1)."""
    count = int(np.sum(labels < 0))
    if count:
        raise ConfigError(
            f"eval set {eval_set.name!r}: {count} example(s) belong to classes the model does "
            f"not have (it lacks {len(eval_set.classes_not_in_model)} of the set's classes, "
            f"e.g. {', '.join(eval_set.classes_not_in_model[:5])})")


def _imagenet_classes() -> tuple[str, ...]:
    """ImageNet-1k's 1,000 wnids in label order (sorted), as real.json numbers them."""
    from imagenet_jax.data import wordnet

    return tuple(sorted(w for w, s in wordnet.load().synsets.items() if s.is_class))


def _real_labels_from_json(path: str, source, run_dataset: str) -> list[list[int]]:
    """Each example's ReaL labels, found by its file name ILSVRC2012_val_NNNNNNNN."""
    try:
        labels = json.loads(storage.as_path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"real:{path}: cannot read the ReaL labels: {e}") from None
    if not (isinstance(labels, list) and all(isinstance(x, list) for x in labels)):
        raise ConfigError(f"real:{path}: expected a JSON list of label lists, one per "
                          "validation image (google-research/reassessed-imagenet's real.json)")
    names = _file_names(source)
    result = []
    for i, name in enumerate(names):
        match = VAL_FILE.search(name)
        number = int(match.group(1)) if match else 0
        if not 1 <= number <= len(labels):
            raise ConfigError(
                f"real:{path} labels ImageNet's validation images ILSVRC2012_val_00000001 to "
                f"_{len(labels):08d}; the run's dataset {run_dataset!r} has "
                f"{source.describe('val', i)!r} among its validation examples")
        result.append(labels[number - 1])
    return result


def _file_names(source) -> list[str]:
    """The file name of each validation example: from a folder's paths or TFDS's records."""
    if isinstance(source, sources.FolderSource):
        return [str(path).rsplit("/", 1)[-1] for path in source.files["val"]]
    features = getattr(source, "features", None)
    if features is None or "file_name" not in features:
        raise ConfigError(f"real labels need each validation example's file name; "
                          f"{type(source).__name__} records none")
    return [values[0] if values else "" for values in source.feature_values("val", "file_name")]
