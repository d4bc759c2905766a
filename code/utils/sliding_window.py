"""LA sliding-window inference (SPEC.md 4).

A volume ``(X, Y, Z)`` is covered by windows of ``patch_size = (px, py, pz)``; along an axis of size ``s``
(after padding) with patch ``p`` and stride ``t`` there are ``ceil((s - p) / t) + 1`` windows starting at
``min(t * i, s - p)``, the lineage's positions: regular steps, the last one flush with the end. ``stride_xy``
is used on the first two axes, ``stride_z`` on the third. Volumes smaller than the patch on an axis are
zero-padded symmetrically (the extra voxel, if odd, at the end) and the result is cropped back. The softmax
of every window is added into a probability map and divided by the number of windows covering each voxel;
the label map is its argmax. The accumulation lives on ``device``.
"""
import math
from itertools import product
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def window_starts(size: int, patch: int, stride: int) -> list:
    """Start offsets of the windows along one axis (``size >= patch``)."""
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch {patch}; pad it first")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    n = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(n)]


def sliding_window_inference(model: torch.nn.Module, image, patch_size: Sequence[int] = (112, 112, 80),
                             stride_xy: int = 18, stride_z: int = 4, device="cpu", sw_batch: int = 1,
                             amp_dtype: Optional[torch.dtype] = None):
    """Predict one volume with a model mapping ``(B, 1, x, y, z)`` to logits ``(B, C, x, y, z)``.

    ``image``: ``(X, Y, Z)`` array. ``sw_batch`` windows go through the model per forward call (the model is
    put in eval mode, and left there, so the result does not depend on it). ``amp_dtype`` (``torch.bfloat16``/``torch.float16``)
    runs the forward under autocast; the softmax and the accumulation stay float32.
    Returns ``(probabilities (C, X, Y, Z) float32 numpy, label map (X, Y, Z) uint8 numpy)``."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or len(patch_size) != 3:
        raise ValueError(f"expected a 3D image and a 3D patch, got {image.shape} and {tuple(patch_size)}")
    if sw_batch < 1:
        raise ValueError(f"sw_batch must be >= 1, got {sw_batch}")
    device = torch.device(device)
    size = image.shape
    pad = [max(p - s, 0) for s, p in zip(size, patch_size)]
    before = [q // 2 for q in pad]
    image = np.pad(image, [(b, q - b) for b, q in zip(before, pad)], mode="constant", constant_values=0)
    strides = (stride_xy, stride_xy, stride_z)
    starts = list(product(*(window_starts(s, p, t) for s, p, t in zip(image.shape, patch_size, strides))))
    px, py, pz = patch_size

    model.eval()
    with torch.inference_mode():
        volume = torch.from_numpy(image).to(device)
        probs = None  # (C, X, Y, Z), allocated once the number of classes is known
        count = torch.zeros(image.shape, dtype=torch.float32, device=device)
        for i in range(0, len(starts), sw_batch):
            chunk = starts[i:i + sw_batch]
            x = torch.stack([volume[a:a + px, b:b + py, c:c + pz] for a, b, c in chunk])[:, None]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
            p = F.softmax(logits.float(), dim=1)
            if probs is None:
                probs = torch.zeros((p.shape[1],) + image.shape, dtype=torch.float32, device=device)
            for (a, b, c), pw in zip(chunk, p):
                probs[:, a:a + px, b:b + py, c:c + pz] += pw
                count[a:a + px, b:b + py, c:c + pz] += 1
        probs /= count
        crop = tuple(slice(b, b + s) for b, s in zip(before, size))
        probs = probs[(slice(None),) + crop]
        labels = probs.argmax(dim=0).to(torch.uint8)
        return probs.cpu().numpy(), labels.cpu().numpy()
