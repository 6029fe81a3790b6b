"""The TFLite runtime wrapper under concurrent use: the cloud worker checks photos from a pool of
download threads, and a bare interpreter raises (or mixes up tensors) when two threads use it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def tflite_path(tmp_path_factory):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255.0)(inputs))
    outputs = keras.layers.Dense(6, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path_factory.mktemp("tflite") / "small.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, outputs)).convert())
    return path


@pytest.mark.parametrize("copies", [1, 2])
def test_concurrent_calls_give_each_thread_its_own_result(tflite_path, copies):
    from dermaloop.analysis.runtime import TfliteModel

    model = TfliteModel(tflite_path, threads=1, copies=copies)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 32, 32, 3)).astype(np.float32)
    expected = [next(iter(model(x).values())) for x in images]
    assert len({tuple(np.round(e, 5)) for e in expected}) > 1  # the inputs really give different outputs
    errors: list[BaseException] = []
    wrong: list[int] = []

    def run(offset: int) -> None:
        try:
            for _ in range(10):
                for i in range(offset, len(images), 6):
                    got = next(iter(model(images[i]).values()))
                    if not np.allclose(got, expected[i], atol=1e-6):
                        wrong.append(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert not wrong


def test_copies_must_be_positive(tflite_path):
    from dermaloop.analysis.runtime import TfliteModel

    with pytest.raises(ValueError, match="copies"):
        TfliteModel(tflite_path, copies=0)
