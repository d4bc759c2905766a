"""Feature-level perturbations P_w and P_s of CrossMatch (docs/METHOD.md).

Channel dropout on every encoder output level (all skip features and the bottleneck), with an independent mask
per level and per sample. ``expand`` stacks the perturbed copies on the batch axis, so that one decoder call
decodes the unperturbed batch and both perturbations of its last ``n`` samples (Section III-F). The
perturbations apply whenever they are asked for, in eval mode too, as in the release (whose perturbation
modules never leave training mode): its teachers of the CutMix partner batch are computed that way.
"""
import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("dropout", "alpha", "feature_alpha")


class FeaturePerturbation(nn.Module):
    def __init__(self, dim: int, p_weak: float = 0.25, p_strong: float = 0.75, kind: str = "dropout"):
        super().__init__()
        for name, p in (("--drop_weak", p_weak), ("--drop_strong", p_strong)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} {p}: expected a dropout rate in [0, 1)")
        if kind not in KINDS:
            raise ValueError(f"--dropout_type {kind!r}: expected one of {', '.join(KINDS)}")
        self.p_weak, self.p_strong = p_weak, p_strong
        self.dropout = {"dropout": F.dropout2d if dim == 2 else F.dropout3d, "alpha": F.alpha_dropout,
                        "feature_alpha": F.feature_alpha_dropout}[kind]

    def weak(self, f):
        return self.dropout(f, self.p_weak, training=True)

    def strong(self, f):
        return self.dropout(f, self.p_strong, training=True)

    def expand(self, feats, n: int):
        """Each level f (batch B) -> cat([f, P_w(f[-n:]), P_s(f[-n:])]) (batch B + 2n)."""
        if n <= 0:
            return list(feats)
        return [torch.cat([f, self.weak(f[-n:]), self.strong(f[-n:])]) for f in feats]
