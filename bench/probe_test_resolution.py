"""Probe: does the cloud model do better when photos are fed at a higher resolution than it was
trained at (the "FixRes" effect of training on random 70-100 % crops)?

An offline experiment, not part of any runtime. Each network of a model directory's cloud model is
rebuilt at ``--sizes`` (other ensemble members scaled in proportion: a Lite0 member gets 224 x S / 260),
the trained weights copied in, and the real runtime (``CloudModel.predict`` with the card's TTA) runs on
the model's own calib and val splits, with the shared preprocessing at that size. Balanced accuracy is
noisy at calib size (12 df and 14 vasc images: one image moves it by more than a point), so the smoother
balanced log-loss and macro AUC are reported beside it. Only calib chooses; val is reported.
Results: docs/MODEL_REPORT.md.

    .venv/bin/python bench/probe_test_resolution.py --model var/models/ham-l2full12-mel \\
        --data ../shared/data/ham10000 --sizes 260,300
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score


def _temperature(layer) -> float:
    return 1.0 / float(layer.scale)


def rebuilt_cloud(saved, members: list[str], size: int):
    """The saved cloud Keras model (a ``full_classifier`` or an ``ensemble_classifier``) rebuilt with
    input side ``size``. ``members``: the backbones in the card's order, primary first; the others keep
    their size relative to the primary's."""
    import keras

    from training.assemble import ensemble_classifier, full_classifier

    k = int(saved.output_shape[-1])
    own = int(saved.input.shape[1])
    primary = full_classifier(members[0], k, _temperature(saved.get_layer("temperature")), tail_model=saved,
                              size=size)
    nested = [layer for layer in saved.layers if isinstance(layer, keras.Model)]
    if not nested:
        return primary
    others = [full_classifier(name, k, _temperature(net.get_layer("temperature")), tail_model=net,
                              size=round(int(net.input.shape[1]) * size / own))
              for name, net in zip(members[1:], nested, strict=True)]
    return ensemble_classifier(primary, others, _temperature(saved.get_layer("ensemble_temperature")))


def scores(probs: np.ndarray, labels: np.ndarray, policy) -> dict[str, float]:
    k = probs.shape[1]
    weights = 1.0 / np.bincount(labels, minlength=k)[labels]
    return {"BA": balanced_accuracy_score(labels, probs.argmax(1)),
            "BA of the call": balanced_accuracy_score(labels, policy.decide(probs)),
            "balanced log-loss": log_loss(labels, probs, sample_weight=weights, labels=range(k)),
            "macro AUC": roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=range(k))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--sizes", default="260,300", help="input sides to try, comma-separated")
    args = parser.parse_args()
    import dataclasses

    import keras

    from dermaloop.model_dir import load_cloud_model
    from training.datasets import open_dataset
    from training.evaluate import own_split, predict_dataset

    runtime = load_cloud_model(args.model)
    cloud = runtime.model_dir.section("cloud")
    saved, members = runtime.model, cloud.get("ensemble", {}).get("members", [cloud["backbone"]])
    ds = open_dataset(args.data, runtime.taxonomy)
    parts = {part: own_split(ds, args.model, part) for part in ("calib", "val")}
    for size in (int(s) for s in args.sizes.split(",")):
        runtime.model = rebuilt_cloud(saved, members, size)
        runtime.preprocess = dataclasses.replace(runtime.preprocess, size=size)
        for part, subset in parts.items():
            probs, labels, _ = predict_dataset(runtime, subset, desc=f"{part} at {size} px")
            figures = ", ".join(f"{k} {v:.4f}" for k, v in scores(probs, labels, runtime.policy).items())
            print(f"{size} px, {part} ({len(labels)} images): {figures}", flush=True)
        keras.backend.clear_session()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
