"""Training throughput of the two fine-tuning phases, for docs/BENCHMARKS.md.

One run on this machine, each backbone at its own input size, batches of 32 of random pixels
(the step's cost does not depend on the content): the top-block step on cached stage-5 maps
(``training.finetune``, the baseline) against the whole-network step on images
(``training.finetune_images``), and a plain forward pass. The real epochs also decode and augment
JPEGs on a background thread; their times are in each model card's ``whole_network_history``.

    .venv/bin/python bench/bench_training_step.py [--backbones lite0,lite2] [--steps 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _images_per_second(fn, batch: int, steps: int) -> float:
    fn()  # trace + warm up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def measure(name: str, batch: int, steps: int) -> dict[str, float]:
    import tensorflow as tf

    from dermaloop import backbones
    from training.embeddings import TAIL_STAGE
    from training.finetune import EpochLoop, FinetuneConfig, build_tail_classifier
    from training.finetune_images import FullFinetuneConfig, build_full_network

    size = backbones.input_size(name)
    rng = np.random.default_rng(0)
    labels = np.arange(batch) % 7
    idx = np.arange(batch)
    y = tf.constant(labels)
    out: dict[str, float] = {}

    full = build_full_network(name, 7, 0.3)
    loop = EpochLoop(full, labels, idx, labels, 7, FullFinetuneConfig(), 1e-4, 1e-4, "/tmp/bench-step", "", False)
    x = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
    out["whole network train step"] = _images_per_second(lambda: loop.step(x, y), batch, steps)
    forward = tf.function(lambda t: full(t, training=False))
    out["forward pass"] = _images_per_second(lambda: forward(x), batch, steps)

    start = backbones.stage_end_block(name, TAIL_STAGE) + 1
    probe = backbones.build_backbone(name, pooling="avg")
    shape = tuple(int(d) for d in probe.get_layer(f"block{start - 1}_add").output.shape[1:])
    tail = build_tail_classifier(name, start, shape, 7, 0.3)
    tloop = EpochLoop(tail, labels, idx, labels, 7, FinetuneConfig(), 3e-3, 3e-4, "/tmp/bench-step", "", False)
    m = tf.constant(rng.normal(0, 1, (batch, *shape)).astype(np.float32))
    out["top-block train step (cached maps)"] = _images_per_second(lambda: tloop.step(m, y), batch, steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="lite0,lite2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    print(f"cores: {len(os.sched_getaffinity(0))}, batch {args.batch}, median of {args.steps} steps")
    print("| backbone | step | images/s |\n|---|---|---:|")
    for name in args.backbones.split(","):
        for step, ips in measure(name, args.batch, args.steps).items():
            print(f"| {name} | {step} | {ips:.1f} |")


if __name__ == "__main__":
    main()
