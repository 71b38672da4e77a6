"""`imagenet-jax predict`: the most likely classes of image files, by a run's checkpoint.

Each image goes through the run's evaluation transform (central crop, resize) and the
eval step; the classes come out with their probabilities and, where the class ids are
WordNet ids, their names. An unreadable file is reported on its own and the others are
still predicted.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import jax
import numpy as np

from imagenet_jax import saved_run
from imagenet_jax.config import eval_image_size
from imagenet_jax.data import wordnet
from imagenet_jax.data.feeding import make_global_batch
from imagenet_jax.train.steps import ClassMap


def load_image(path: str | os.PathLike, image_size: int, crop_ratio: float) -> np.ndarray:
    """uint8 [size, size, 3] by the eval transform; any format TensorFlow or Pillow reads.
    Raises ValueError naming the file when neither can."""
    import tensorflow as tf

    from imagenet_jax.data import pipeline, preprocess

    pipeline.set_up_host()
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    try:
        return preprocess.eval_image(tf.constant(data), image_size, crop_ratio).numpy()
    except tf.errors.OpError:
        pass  # not a JPEG TensorFlow decodes: through Pillow (PNG, WebP, TIFF, ...)
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=95)
        return preprocess.eval_image(tf.constant(buffer.getvalue()), image_size,
                                     crop_ratio).numpy()
    except Exception as e:  # noqa: BLE001 - any decoder failure: this file is unreadable
        raise ValueError(f"{path}: not an image TensorFlow or Pillow can read "
                         f"({type(e).__name__})") from None


def predict_files(workdir: str | os.PathLike, paths: Sequence[str], *, top: int = 5,
                  step: int | None = None, overrides: dict | None = None) -> dict:
    """{'step', 'predictions': [{'path', 'classes': [{'class', 'name', 'probability'}]}
    or {'path', 'error'}, ...]} in the order of `paths`."""
    restored = saved_run.load_saved_run(workdir, step=step, overrides=overrides)
    config = restored.config
    images, results = [], []
    for path in paths:
        try:
            images.append(load_image(path, eval_image_size(config), config.eval_crop_ratio))
            results.append({"path": str(path)})
        except ValueError as e:
            results.append({"path": str(path), "error": str(e)})
    readable = [r for r in results if "error" not in r]
    if images:
        top_classes, probabilities = _top(restored, np.stack(images))
        for result, classes, probs in zip(readable, top_classes, probabilities, strict=True):
            result["classes"] = [
                {"class": restored.class_names[c], "name": wordnet.class_name(
                    restored.class_names[c]), "probability": float(p)}
                for c, p in zip(classes[:top], probs[:top], strict=True) if c >= 0]
    return {"step": restored.step, "predictions": results}


def _top(restored: saved_run.SavedRun, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eval step's top classes and probabilities for `images`, in batches of at most
    the eval batch size, each padded to a multiple of the devices."""
    devices = restored.mesh.devices.size
    batch_size = min(restored.config.eval_batch_size, -(-len(images) // devices) * devices)
    class_map = ClassMap.identity(len(restored.class_names))
    classes, probabilities = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk)
        batch = {"image": np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)]),
                 "label": np.zeros(batch_size, np.int32),
                 "index": np.arange(batch_size, dtype=np.int32),
                 "mask": np.arange(batch_size) < len(chunk)}
        local = jax.tree.map(lambda x: x[_process_rows(batch_size)], batch)
        out = jax.device_get(restored.run.eval_step(
            restored.state, make_global_batch(local, restored.mesh), class_map))
        classes.append(out["top_classes"][:len(chunk)])
        probabilities.append(out["top_probabilities"][:len(chunk)])
    return np.concatenate(classes), np.concatenate(probabilities)


def _process_rows(batch_size: int) -> slice:
    """This process's rows of a global batch (every process reads every image)."""
    local = batch_size // jax.process_count()
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)
