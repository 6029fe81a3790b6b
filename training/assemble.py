"""Assemble a deployable classifier: raw pixels -> backbone -> logits -> /temperature -> softmax.

The trained parts (fine-tuned top blocks and the ``logits`` layer, or a linear head) are copied by
layer name into a full backbone, so the exported model needs nothing but pixels from
``dermaloop.preprocess`` and outputs calibrated probabilities.
"""

from __future__ import annotations

import numpy as np

from dermaloop import backbones

LOGITS_LAYER = "logits"
PROBS_LAYER = "probabilities"


def full_classifier(name: str, n_classes: int, temperature: float = 1.0, tail_model=None,
                    head: tuple[np.ndarray, np.ndarray] | None = None, with_probabilities: bool = True,
                    size: int | None = None):
    """``tail_model``: fine-tuned tail (see training.finetune); else ``head``: (kernel, bias) of a linear head.
    ``size``: input side, if not the backbone's own."""
    import keras

    base = backbones.build_backbone(name, weights="imagenet", pooling="avg", size=size)
    logits = keras.layers.Dense(n_classes, name=LOGITS_LAYER)(base.output)
    outputs = logits
    if with_probabilities:
        scaled = keras.layers.Rescaling(1.0 / float(temperature), name="temperature")(logits)
        outputs = keras.layers.Softmax(name=PROBS_LAYER)(scaled)
    model = keras.Model(base.input, outputs, name=f"dermaloop_{name}")
    if tail_model is not None:
        copied = backbones.copy_weights_by_name(tail_model, model)
        if copied < 3:
            raise ValueError("the fine-tuned tail shares no layers with the backbone")
    elif head is not None:
        model.get_layer(LOGITS_LAYER).set_weights([np.asarray(head[0]), np.asarray(head[1])])
    else:
        raise ValueError("need a fine-tuned tail or a linear head")
    return model


def ensemble_classifier(primary, others: list, temperature: float = 1.0):
    """One Keras model averaging the temperature-scaled logits of several full classifiers (each
    built by ``full_classifier`` with its own calibration), then a temperature for the average.

    The input is the primary member's; other members get it resized to their own input size inside
    the model, so the worker, the test-time augmentation and the model directory stay unchanged.
    The primary's layers stay at the top level (Grad-CAM explains the ensemble through its feature
    map); the other members are nested models.
    """
    import keras

    x = primary.input
    size = int(x.shape[1])
    scaled = [primary.get_layer("temperature").output]
    for i, member in enumerate(others):
        inner = keras.Model(member.input, member.get_layer("temperature").output, name=f"member{i + 1}_{member.name}")
        own = int(member.input.shape[1])
        y = x if own == size else keras.layers.Resizing(own, own, interpolation="bilinear",
                                                        name=f"member{i + 1}_resize")(x)
        scaled.append(inner(y))
    mean = keras.layers.Average(name="ensemble_logits")(scaled)
    out = keras.layers.Rescaling(1.0 / float(temperature), name="ensemble_temperature")(mean)
    return keras.Model(x, keras.layers.Softmax(name="ensemble_probabilities")(out), name="dermaloop_ensemble")
