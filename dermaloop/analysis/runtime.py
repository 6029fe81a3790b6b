"""Running a single-input TFLite model (the analysis model) through the project's interpreter factory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def interpreter(path: str | Path, threads: int = 1) -> Any:
    """The project's one interpreter factory (``dermaloop.model_dir.make_interpreter``)."""
    from dermaloop.model_dir import make_interpreter

    return make_interpreter(path, threads)


class TfliteModel:
    """A single-input TFLite model; feeds float pixels [0, 255] (rounded for uint8 inputs)."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.path = Path(path)
        self._interp = interpreter(path, threads)
        self._input = self._interp.get_input_details()[0]
        self._outputs = self._interp.get_output_details()

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
        self._interp.set_tensor(self._input["index"], x)
        self._interp.invoke()
        out = {}
        for d in self._outputs:
            y = self._interp.get_tensor(d["index"])
            if d["dtype"] in (np.uint8, np.int8) and d["quantization"][0]:
                scale, zero = d["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            out[d["name"]] = np.asarray(y, np.float32)[0]
        return out
