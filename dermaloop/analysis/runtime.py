"""Running a single-input TFLite model (the analysis model) through the project's interpreter factory.

A TFLite interpreter is not thread-safe: two threads in ``set_tensor``/``invoke`` at once raise
("There is at least 1 reference to internal data ...") or mix up their tensors. The cloud worker
checks photos from a pool of download threads, so each call borrows one interpreter of a small pool
(``copies``, default 1: a plain lock) and gives it back.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import numpy as np


def interpreter(path: str | Path, threads: int = 1) -> Any:
    """The project's one interpreter factory (``dermaloop.model_dir.make_interpreter``)."""
    from dermaloop.model_dir import make_interpreter

    return make_interpreter(path, threads)


class TfliteModel:
    """A single-input TFLite model; feeds float pixels [0, 255] (rounded for uint8 inputs). Safe to
    call from several threads: at most ``copies`` calls run at once, each on its own interpreter."""

    def __init__(self, path: str | Path, threads: int = 1, copies: int = 1) -> None:
        if copies < 1:
            raise ValueError(f"copies must be at least 1, got {copies}")
        self.path = Path(path)
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(copies):
            self._pool.put(interpreter(path, threads))
        first = self._pool.get()
        self._input = first.get_input_details()[0]
        self._outputs = first.get_output_details()
        self._pool.put(first)

    @property
    def input_size(self) -> int:
        return int(self._input["shape"][1])

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(pixels, np.float32)[None]
        dtype = self._input["dtype"]
        if dtype == np.uint8:
            x = np.clip(np.round(x), 0, 255).astype(np.uint8)
        elif dtype == np.int8:
            scale, zero = self._input["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        interp = self._pool.get()  # blocks while every copy is in use
        try:
            interp.set_tensor(self._input["index"], x)
            interp.invoke()
            raw = [interp.get_tensor(d["index"]) for d in self._outputs]  # copies, safe after release
        finally:
            self._pool.put(interp)
        out = {}
        for d, y in zip(self._outputs, raw, strict=True):
            if d["dtype"] in (np.uint8, np.int8) and d["quantization"][0]:
                scale, zero = d["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            out[d["name"]] = np.asarray(y, np.float32)[0]
        return out
