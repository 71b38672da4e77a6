"""Evaluating a run's checkpoint the way ImageNet's history asks: several evaluation sets
(ImageNet's val, ImageNetV2, ReaL labels, class subsets such as ImageNet-A/-R), and
metrics beyond top-k (NLL, calibration, per-class accuracy, WordNet mistake severity).

  scores.py       the metrics, on per-example predictions (numpy), each with its source
  predictions.py  per-example predictions gathered from the eval step over a set
  sets.py         evaluation sets by name, their labels mapped to the model's classes
  report.py       the table, the JSON and the reliability diagrams
  run.py          `evaluate_run`: the `imagenet-jax eval` command
"""
