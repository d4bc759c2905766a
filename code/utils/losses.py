"""Losses of CrossMatch (docs/METHOD.md).

Dice follows the lineage: soft Dice with squared terms in the denominator and sums over the whole batch,
1 - (2 sum(p t) + eps) / (sum(p^2) + sum(t^2) + eps), on the foreground channel for LA (2 classes) and
averaged over all classes for ACDC (4 classes). The unlabeled criterion ``crit`` is the same Dice against
a hard pseudo-label, with voxels whose teacher confidence is below tau excluded from numerator and
denominator (mask = 0 there)."""
import torch
import torch.nn.functional as F

EPS = 1e-5


def dice_classes(n_classes: int):
    """Channels the Dice is averaged over: the foreground for a binary task, every class otherwise."""
    return (1,) if n_classes == 2 else tuple(range(n_classes))


def dice_loss(logits, target, mask=None):
    """Soft Dice loss of logits (B, C, ...) against an integer map (B, ...); mask (B, ...) in {0, 1} or None."""
    probs = logits.float().softmax(dim=1)
    losses = []
    for c in dice_classes(logits.shape[1]):
        p = probs[:, c]
        t = (target == c).float()
        if mask is not None:
            p, t = p * mask, t * mask
        inter = (p * t).sum()
        losses.append(1.0 - (2.0 * inter + EPS) / ((p * p).sum() + (t * t).sum() + EPS))
    return torch.stack(losses).mean()


def masked_ce_loss(logits, target, mask):
    """Cross-entropy against a hard pseudo-label; masked voxels count as zero (UniMatch's convention)."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * mask).sum() / mask.numel()


def supervised_loss(logits, target):
    """L_sup = (CE + Dice) / 2 on labeled samples."""
    return 0.5 * (F.cross_entropy(logits.float(), target) + dice_loss(logits, target))


UNSUP_CRITERIA = {"dice": dice_loss, "ce": masked_ce_loss}
