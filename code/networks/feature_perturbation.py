"""Feature-level perturbations P_w and P_s of CrossMatch (docs/METHOD.md).

Channel dropout on every encoder output level (all skip features and the bottleneck), with an independent
mask per level and per sample. ``expand`` stacks the perturbed copies on the batch axis so that one decoder
call decodes the unperturbed batch and both perturbations of its last ``n`` samples (Section III-F)."""
import torch
from torch import nn

KINDS = ("dropout", "alpha", "feature_alpha")


def make_dropout(kind: str, p: float, dim: int) -> nn.Module:
    if kind == "dropout":
        return (nn.Dropout2d if dim == 2 else nn.Dropout3d)(p)
    if kind == "alpha":
        return nn.AlphaDropout(p)
    if kind == "feature_alpha":
        return nn.FeatureAlphaDropout(p)
    raise ValueError(f"--dropout_type {kind!r}: expected one of {', '.join(KINDS)}")


class FeaturePerturbation(nn.Module):
    def __init__(self, dim: int, p_weak: float = 0.25, p_strong: float = 0.75, kind: str = "dropout"):
        super().__init__()
        for name, p in (("--drop_weak", p_weak), ("--drop_strong", p_strong)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} {p}: expected a dropout rate in [0, 1)")
        self.weak = make_dropout(kind, p_weak, dim)
        self.strong = make_dropout(kind, p_strong, dim)

    def expand(self, feats, n: int):
        """Each level f (batch B) -> cat([f, P_w(f[-n:]), P_s(f[-n:])]) (batch B + 2n)."""
        if n <= 0:
            return list(feats)
        return [torch.cat([f, self.weak(f[-n:]), self.strong(f[-n:])]) for f in feats]
