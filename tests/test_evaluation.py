"""`imagenet-jax eval`: metrics against their formulas, the WordNet hierarchy, evaluation
sets (folders, class subsets, ImageNetV2 and ReaL prepared by TFDS's own builders from
fake downloads), exactness over device counts, and the command's bad inputs."""

import json
import math
import shutil
import subprocess
import sys

import fake_imagenet
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, subprocess_env, tiny_config

from imagenet_jax.data import wordnet
from imagenet_jax.errors import ConfigError
from imagenet_jax.evaluation import scores
from imagenet_jax.evaluation.run import evaluate_run
from imagenet_jax.train import loop
from imagenet_jax.train.steps import ClassMap, score_logits

NUM_VAL = 12  # the first 12 validation images of ImageNet: 12 different classes


# --- metrics, on hand-built numbers ---------------------------------------------------

def test_ece_is_the_weighted_gap_between_accuracy_and_confidence_per_bin():
    confidence = np.array([0.95, 0.95, 0.55, 0.30, 0.0])
    correct = np.array([1, 0, 1, 0, 0], bool)
    ece, bins = scores.expected_calibration_error(confidence, correct)
    # Bins of width 1/15: 0.95 -> bin 14, 0.55 -> 8, 0.30 -> 4, 0.0 -> 0.
    expected = (2 * abs(0.5 - 0.95) + abs(1 - 0.55) + abs(0 - 0.30) + abs(0 - 0.0)) / 5
    assert ece == pytest.approx(expected, abs=1e-12)
    assert bins.counts.tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2]
    assert bins.accuracy[14] == 0.5 and bins.confidence[14] == pytest.approx(0.95)
    assert np.isnan(bins.accuracy[1])
    perfect, _ = scores.expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 1], bool))
    assert perfect == 0.0
    broken, bins = scores.expected_calibration_error(np.array([np.nan, 0.5]),
                                                      np.array([0, 1], bool))
    assert np.isnan(broken) and bins.counts.sum() == 1


def test_score_logits_nll_confidence_and_top_classes_with_a_restriction():
    logits = jnp.array([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0],
                        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],    # ties: lower classes first
                        [0.0, jnp.nan, 0.0, 0.0, 0.0, 0.0]])  # never right
    labels = jnp.array([0, 3, 0])
    out = jax.device_get(score_logits(logits, labels, ClassMap.identity(6)))
    row = np.asarray(logits[0], np.float64)
    log_probs = row - np.log(np.exp(row).sum())
    assert out["nll"][0] == pytest.approx(-log_probs[0], rel=1e-6)
    assert out["confidence"][0] == pytest.approx(math.exp(log_probs[4]), rel=1e-6)
    assert out["top_classes"][0].tolist() == [4, 0, 1, 2, 5]
    assert out["top_classes"][1].tolist() == [0, 1, 2, 3, 4]
    assert out["top_classes"][2].tolist() == [-1] * 5
    assert out["nll"][1] == pytest.approx(math.log(6), rel=1e-6)

    # Only classes 0, 1 and 3 allowed, the set's labels 0,1,2 being those classes.
    allowed = np.array([True, True, False, True, False, False])
    class_map = ClassMap(allowed, np.array([0, 1, 3, -1, -1, -1], np.int32))
    out = jax.device_get(score_logits(logits[:1], jnp.array([2]), class_map))
    kept = np.array([2.0, 1.0, -1.0])
    assert out["label"].tolist() == [3]
    assert out["nll"][0] == pytest.approx(-(kept[2] - np.log(np.exp(kept).sum())), rel=1e-6)
    assert out["top_classes"][0].tolist() == [0, 1, 3, -1, -1]


def test_real_accuracy_scores_against_label_sets_and_skips_empty_ones():
    top = np.array([[3, 1], [2, 0], [5, 4], [1, 2]])
    real = [(3,), (0, 7), (), (2, 1)]
    correct1, scored = scores.real_correct(top, real, 1)
    assert scored.tolist() == [True, True, False, True]
    assert correct1.tolist() == [True, False, False, True]
    correct2, _ = scores.real_correct(top, real, 2)
    assert correct2.tolist() == [True, True, False, True]


def test_wordnet_names_paths_and_lca_heights():
    hierarchy = wordnet.load()
    classes = [w for w, s in hierarchy.synsets.items() if s.is_class]
    assert len(classes) == 1000 and classes == fake_imagenet.imagenet_classes()
    assert wordnet.class_name("n02084071") == "dog" and wordnet.class_name("x7") == "x7"
    assert all(hierarchy.path(w)[-1] == "n00001740" for w in classes)  # all under 'entity'
    husky, malamute, teapot = "n02110185", "n02110063", "n04398044"
    assert hierarchy.lca_height(husky, husky) == 0
    assert hierarchy.lca_height(husky, malamute) == 1  # siblings under 'sled dog'
    assert hierarchy.lca_height(husky, teapot) > hierarchy.lca_height(husky, "n02085620") > 1
    sample = [husky, malamute, teapot, "n01440764", "n09193705", "n02085620"]
    heights = hierarchy.lca_heights(sample)
    for i, a in enumerate(sample):
        for j, b in enumerate(sample):
            assert heights[i, j] == hierarchy.lca_height(a, b)
    assert hierarchy.lca_heights(["n02110185", "not-a-wnid"]) is None


def test_mistake_severity_and_hierarchical_distance():
    heights = np.array([[0, 1, 4], [1, 0, 4], [4, 4, 0]])
    top = np.array([[0, 1], [1, 2], [2, 0], [2, 1]])
    labels = np.array([0, 0, 1, 1])
    severity = scores.mistake_severity(top, labels, heights, k=2)
    assert severity["mean"] == pytest.approx((1 + 4 + 4) / 3)  # mistakes: rows 1, 2, 3
    assert severity["histogram"] == {1: 1, 4: 2}
    # Top-2 heights per row: (0, 1), (1, 4), (4, 1), (4, 0).
    assert severity["hierarchical_distance_at_2"] == pytest.approx((1 + 5 + 5 + 4) / 8)
    # A missing prediction (-1) is in neither: row 1 has one class, row 2 none (a NaN row).
    top = np.array([[0, 1], [2, -1], [-1, -1]])
    severity = scores.mistake_severity(top, np.array([0, 0, 1]), heights, k=2)
    assert severity["mean"] == 4.0 and severity["histogram"] == {4: 1}
    assert severity["hierarchical_distance_at_2"] == pytest.approx((0.5 + 4) / 2)


# --- a run to evaluate ----------------------------------------------------------------

@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """A fake ImageNet download of the classes of its first validation images, the same
    images as a folder dataset, a run trained on it, and ImageNetV2 / ReaL prepared by
    TFDS from those images: everything that eval reads."""
    root = tmp_path_factory.mktemp("eval")
    classes = tuple(sorted(set(fake_imagenet.validation_wnids()[:NUM_VAL])))
    download = fake_imagenet.write_fake_manual_download(
        root / "manual", classes=classes, train_per_class=6, num_val=NUM_VAL)
    folder = root / "folder"
    for split, images in (("train", download.train), ("val", download.val)):
        for image in images:
            (folder / split / image.wnid).mkdir(parents=True, exist_ok=True)
            (folder / split / image.wnid / image.file_name).write_bytes(image.encoded)
    # ReaL labels: image 1 has none (not scored), image 2 two classes, image 3 another one.
    imagenet = fake_imagenet.imagenet_classes()
    real = [[imagenet.index(image.wnid)] for image in download.val]
    real[0] = []
    real[1] = real[1] + [imagenet.index(classes[0])]
    real[2] = [imagenet.index(classes[-1])]
    real_json = root / "real.json"
    real_json.write_text(json.dumps(real))
    data_dir = root / "tfds"
    fake_imagenet.prepare_fake_imagenet_v2(data_dir, list(download.val[:8]))
    fake_imagenet.prepare_fake_imagenet2012_real(data_dir, download, real_json)

    config = tiny_config(folder, eval_batch_size=8, num_epochs=2.0, data_dir=str(data_dir))
    config.mesh.data = 1  # (1 device against 8: test_eval_is_the_same_on_1_and_8_devices)
    workdir = root / "run"
    final = loop.train_and_evaluate(config, workdir)
    return {"root": root, "folder": folder, "workdir": workdir, "final": final,
            "download": download, "real": real, "real_json": real_json, "classes": classes}


def test_eval_command_prints_the_json_and_draws_reliability(imagenet_like, tmp_path):
    subset = tmp_path / "subset"  # ImageNet-R's layout: root/<wnid>/<image>, fewer classes
    for wnid in imagenet_like["classes"][:3]:
        shutil.copytree(imagenet_like["folder"] / "val" / wnid, subset / wnid)
    workdir = imagenet_like["workdir"]
    folder = imagenet_like["folder"]
    process = subprocess.run(
        [sys.executable, "-m", "imagenet_jax", "eval", f"--workdir={workdir}",
         f"--eval=folder:{folder},folder:{subset}", "--json"],
        cwd=REPO, env=subprocess_env(2), capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    final = imagenet_like["final"]
    assert result["step"] == final["step"]
    full, part = result["sets"]
    for key in ("name", "num_examples", "top1", "top5", "nll", "ece", "mistake_severity",
                "per_class_top1"):
        assert key in full and key in part
    # The same numbers as the train loop's own final evaluation.
    assert full["num_examples"] == NUM_VAL == final["num_examples"]
    assert full["top1"] == pytest.approx(final["top1"]) and full["top5"] == pytest.approx(
        final["top5"])
    assert full["nll"] == pytest.approx(final["loss"], rel=1e-5)
    assert set(full["per_class_top1"]) == set(imagenet_like["classes"])
    assert full["mistake_severity"] is not None and full["restricted"] is False
    # The subset: logits restricted to its 3 classes, which only removes wrong answers.
    assert part["restricted"] is True and part["num_classes"] == 3
    assert set(part["per_class_top1"]) == set(imagenet_like["classes"][:3])
    for wnid, value in part["per_class_top1"].items():
        assert value >= full["per_class_top1"][wnid]
    assert (workdir / "eval" / f"{result['step']}.json").exists()
    pngs = sorted((workdir / "eval").glob(f"{result['step']}.*.reliability.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert json.loads((workdir / "eval" / f"{result['step']}.json").read_text())["sets"][0][
        "top1"] == full["top1"]


def test_eval_is_the_same_on_1_and_8_devices(imagenet_like):
    spec = f"folder:{imagenet_like['folder']}"
    one = evaluate_run(imagenet_like["workdir"], [spec], overrides={"mesh.data": 1})
    eight = evaluate_run(imagenet_like["workdir"], [spec], overrides={"mesh.data": 8})
    a, b = one["sets"][0], eight["sets"][0]
    assert jax.device_count() == 8
    for key in ("num_examples", "top1", "top5", "per_class_top1", "mistake_severity"):
        assert a[key] == b[key], key
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
    assert a["ece"] == pytest.approx(b["ece"], abs=1e-5)


def test_imagenet_v2_and_real_sets(imagenet_like):
    folder = f"folder:{imagenet_like['folder']}"
    real_json = f"real:{imagenet_like['real_json']}"
    workdir = imagenet_like["workdir"]
    result = evaluate_run(workdir, [folder, "tfds:imagenet_v2/matched-frequency",
                                    "tfds:imagenet2012_real", real_json])
    val, v2, real_tfds, real_file = result["sets"]
    assert v2["kind"] == "imagenet_v2" and v2["num_examples"] == 8
    assert v2["reference"] == folder and v2["top1_drop"] == pytest.approx(
        val["top1"] - v2["top1"])
    # ReaL prepared by TFDS and ReaL from the JSON over the folder: the same images, labels.
    assert real_tfds["num_examples"] == real_file["num_examples"] == NUM_VAL - 1
    for key in ("top1", "top5", "original_top1"):
        assert real_tfds[key] == pytest.approx(real_file[key]), key
    assert real_file["original_top1"] == pytest.approx(val["top1"])

    # ReaL top-1 by hand from the predictions of the folder's images.
    from imagenet_jax.data import loader
    from imagenet_jax.evaluation import sets
    from imagenet_jax.evaluation.predictions import collect_predictions
    from imagenet_jax.saved_run import load_saved_run

    restored = load_saved_run(workdir, step=result["step"])
    eval_set = sets.open_set(folder, model_classes=restored.class_names, run_dataset=folder,
                             data_dir=None)
    source = eval_set.source
    predictions = collect_predictions(
        restored.run.eval_step, restored.state,
        loader.eval_batches(source, restored.config, restored.mesh), eval_set.class_map)
    model_classes = restored.class_names
    imagenet = fake_imagenet.imagenet_classes()
    hits = scored = 0
    for index, top in zip(predictions.index, predictions.top_classes, strict=True):
        number = int(source.files["val"][index].rsplit("_", 1)[-1].split(".")[0])
        acceptable = {model_classes.index(imagenet[c]) for c in imagenet_like["real"][number - 1]}
        if acceptable:
            scored += 1
            hits += int(top[0] in acceptable)
    assert real_file["top1"] == pytest.approx(hits / scored)


def test_eval_refuses_bad_inputs_with_one_line(imagenet_like, tmp_path):
    workdir = imagenet_like["workdir"]
    with pytest.raises(ConfigError, match="unknown eval set 'imagenet-v9'"):
        evaluate_run(workdir, ["imagenet-v9"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no run"):
        evaluate_run(empty, ["demo"])
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    shutil.copy(workdir / "config.json", no_checkpoint)
    with pytest.raises(ConfigError, match="has no checkpoint"):
        evaluate_run(no_checkpoint, [f"folder:{imagenet_like['folder']}"])
    with pytest.raises(ConfigError, match="no checkpoint of step 3; its steps: "):
        evaluate_run(workdir, [f"folder:{imagenet_like['folder']}"], step=3)
    other = tmp_path / "other_classes" / "n99999999"
    other.mkdir(parents=True)
    shutil.copy(next((imagenet_like["folder"] / "val").rglob("*.JPEG")), other)
    with pytest.raises(ConfigError, match="1 class.* the model does not have, e.g. n99999999"):
        evaluate_run(workdir, [f"folder:{other.parent}"])

    process = subprocess.run(
        [sys.executable, "-m", "imagenet_jax", "eval", f"--workdir={workdir}",
         "--eval=imagenet-v9"], cwd=REPO, env=subprocess_env(1), capture_output=True,
        text=True, timeout=300)
    assert process.returncode == 2
    errors = [line for line in process.stderr.splitlines() if "imagenet-jax: error" in line]
    assert len(errors) == 1 and "unknown eval set 'imagenet-v9'" in errors[0]


def test_predict_names_the_classes_and_the_unreadable_file(imagenet_like, tmp_path):
    image = next((imagenet_like["folder"] / "val").rglob("*.JPEG"))
    png = tmp_path / "picture.png"  # another format, read through Pillow
    from PIL import Image
    Image.open(image).save(png)
    corrupt = tmp_path / "corrupt.JPEG"
    corrupt.write_bytes(image.read_bytes()[:100])
    process = subprocess.run(
        [sys.executable, "-m", "imagenet_jax", "predict",
         f"--workdir={imagenet_like['workdir']}", str(image), str(corrupt), str(png),
         "--top=3", "--json"],
        cwd=REPO, env=subprocess_env(2), capture_output=True, text=True, timeout=300)
    assert process.returncode == 1, process.stderr[-3000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    first, bad, other = result["predictions"]
    assert [c["name"] for c in first["classes"]] == [
        wordnet.class_name(c["class"]) for c in first["classes"]]
    assert len(first["classes"]) == 3 and all(c["class"] in imagenet_like["classes"]
                                              for c in first["classes"])
    probabilities = [c["probability"] for c in first["classes"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1
    assert other["classes"] == first["classes"] or other["classes"][0]["class"] == first[
        "classes"][0]["class"]
    assert "error" in bad and str(corrupt) in bad["error"]
    errors = [line for line in process.stderr.splitlines() if "imagenet-jax: error" in line]
    assert len(errors) == 1 and str(corrupt) in errors[0]
