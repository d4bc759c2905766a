"""CML's own pieces (Wu et al., ACM MM 2024; docs/CML.md): the conflict loss, the CutMix cuboid, the
pseudo-labels and the learning rate. The training loops are written out in train_la_cml.py / train_acdc_cml.py."""
import numpy as np
import torch
import torch.nn.functional as F

from utils.evaluation import largest_connected_component


def conflict_loss(f, f_other):
    """Eq. (1): ``1 + cos(f, sg(f_other))`` at every voxel along the channels, averaged over voxels and samples.
    In [0, 2]: 2 where the two feature vectors point the same way, 0 where opposite, 1 where orthogonal (or
    a vector is zero). The gradient reaches ``f`` only: ``f_other`` is a copy without gradient."""
    a = F.normalize(f.float(), dim=1)
    b = F.normalize(f_other.detach().float(), dim=1)
    return 1.0 + (a * b).sum(1).mean()


def cuboid_mask(spatial, beta: float, device="cpu"):
    """The zero region of CML's mask M (Eqs. 5-9) as a boolean map of shape ``spatial``: a cuboid with sides
    ``int(beta * size)`` at a position drawn uniformly (torch RNG) among those inside the patch. True inside the
    cuboid, where a mixed pair shows its second image; False outside (M = 1), its first image."""
    inside = torch.zeros(tuple(spatial), dtype=torch.bool, device=device)
    window = []
    for size in spatial:
        side = int(size * beta)
        start = int(torch.randint(0, size - side + 1, ()).item())
        window.append(slice(start, start + side))
    inside[tuple(window)] = True
    return inside


def pseudo_labels(logits):
    """The hard pseudo-labels of Eq. (9): the argmax of each sample, then, class by class, only the largest
    connected component of the class (full connectivity) is kept; the rest becomes background. Integer map
    (B, ...) on the logits' device."""
    hard = logits.argmax(1).cpu().numpy()
    out = np.zeros(hard.shape, dtype=np.int64)
    for b in range(len(hard)):
        for c in range(1, logits.shape[1]):
            out[b][largest_connected_component(hard[b] == c)] = c
    return torch.from_numpy(out).to(logits.device)


def cml_lr(args, it: int) -> float:
    """The learning rate of iteration ``it``: ``--base_lr`` through pre-training; in self-training multiplied by
    ``--lr_gamma`` every ``--lr_step`` iterations (0: constant)."""
    if it < args.pre_iterations or not args.lr_step:
        return args.base_lr
    return args.base_lr * args.lr_gamma ** ((it - args.pre_iterations) // args.lr_step)
