"""CutMix boxes for the strong views, drawn from the torch RNG (re-seeded every iteration, utils/training.py).

A box covers a fraction U(lo, hi) of the patch (default 0.02 to 0.4) with aspect ratios U(0.3, 1/0.3):
in 2D the ratio of its two sides, in 3D the ratio x:y and the ratio of the in-plane size to z. Sides are
rounded and clipped to the patch, so the realised fraction can differ slightly from the drawn one."""
import math

import torch


def _box_sides(spatial, frac, ratios):
    if len(spatial) == 2:
        g = (math.sqrt(ratios[0]), 1 / math.sqrt(ratios[0]))
    else:
        r1, r2 = ratios
        g = (math.sqrt(r1) * r2 ** (1 / 3), r2 ** (1 / 3) / math.sqrt(r1), r2 ** (-2 / 3))
    scale = frac ** (1 / len(spatial))
    return [min(max(1, round(s * scale * gi)), s) for s, gi in zip(spatial, g)]


def sample_boxes(n: int, spatial, p: float = 0.5, frac=(0.02, 0.4), ratio=(0.3, 1 / 0.3), device="cpu"):
    """Boolean masks (n, *spatial) on ``device``; each sample gets a box with probability p, else an all-False mask.
    The draws are host numbers (the CPU generator); the masks are made where they are used, with no copy."""
    masks = torch.zeros((n, *spatial), dtype=torch.bool, device=device)
    for i in range(n):
        if torch.rand(()).item() >= p:
            continue
        f = frac[0] + (frac[1] - frac[0]) * torch.rand(()).item()
        rs = [ratio[0] + (ratio[1] - ratio[0]) * torch.rand(()).item() for _ in range(len(spatial) - 1)]
        sides = _box_sides(spatial, f, rs)
        starts = [int(torch.randint(0, s - b + 1, ()).item()) for s, b in zip(spatial, sides)]
        masks[(i, *[slice(a, a + b) for a, b in zip(starts, sides)])] = True
    return masks


def partner_index(n: int, device="cpu"):
    """For each sample, another sample of the same batch to paste from (a random non-zero cyclic shift)."""
    if n < 2:
        return None
    shift = int(torch.randint(1, n, ()).item())
    return (torch.arange(n, device=device) + shift) % n
