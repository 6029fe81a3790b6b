"""The device's analysis model: one trunk pass giving the lesion box, its confidence and P(lesion).

Keras assembly of the frozen ImageNet Lite0 trunk, the localiser head and the not-skin head, for
export to a single TFLite file (``training/localiser_train.ensure_localiser``). Its single output is
six numbers in [0, 1], ``[x0, y0, x1, y1, box_confidence, p_lesion_tempered]``, so the order cannot
get lost in conversion (``ood.untemper`` turns the last one into P(lesion)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The trained heads ship with the shared library (the runtime reads the not-skin threshold there too).
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "dermaloop" / "analysis" / "weights"
HEAD_WEIGHTS = WEIGHTS_DIR / "localiser_head.npz"
OUTPUTS = ("x0", "y0", "x1", "y1", "box_confidence", "p_lesion_tempered")


def build_analysis_model(head_weights: str | Path = HEAD_WEIGHTS, ood_file: str | Path | None = None):
    import keras

    from dermaloop.analysis.features import FRAME_SIZE
    from dermaloop.analysis.ood import TEMPER, load_head
    from training.analysis_net import build_head, build_trunk, load_head_weights

    head_weights = Path(head_weights)
    if not head_weights.is_file():
        raise FileNotFoundError(f"{head_weights} missing: run `python -m training.localiser_train --data DIR`")
    with np.load(head_weights) as stored:
        mid = any(k.startswith("loc_mid_reduce") for k in stored.files)
    trunk = build_trunk(mid=mid)
    head = build_head(mid=mid)
    load_head_weights(head, head_weights)
    ood = load_head(str(ood_file) if ood_file else None)
    inputs = keras.Input((FRAME_SIZE, FRAME_SIZE, 3), name="frame")
    if mid:
        fmap, fine = trunk(inputs)
        box = head([fmap, fine])
    else:
        fmap = trunk(inputs)
        box = head(fmap)
    pooled = keras.layers.GlobalAveragePooling2D(name="pooled")(fmap)
    dense = keras.layers.Dense(1, activation="sigmoid", name="not_skin")
    p_lesion = dense(pooled)
    dense.set_weights([np.asarray(ood["w"], np.float32)[:, None] / TEMPER, np.array([ood["b"] / TEMPER], np.float32)])
    outputs = keras.layers.Concatenate(name="analysis")([box, p_lesion])
    return keras.Model(inputs, outputs, name="dermaloop_analysis")
