"""CML's network: two subnets with separate parameters whose decoders upsample differently (docs/CML.md).

LA: the V-Net with transposed-convolution upsampling (subnet 0) and the V-Net with trilinear upsampling + a
3x3x3 convolution (subnet 1). ACDC: the U-Net with a 1x1 convolution + bilinear upsampling (subnet 0) and the
U-Net with a transposed convolution (subnet 1). ``forward(x)`` is the test-time prediction, the log of the mean
of the two subnets' softmax, so that the evaluation's sliding window (which takes a softmax of the output) and
slice inference (an argmax) work unchanged; ``forward(x, per_subnet=True)`` gives what training needs.
"""
import math

import torch
from torch import nn

from .unet import UNet
from .vnet import VNet


class TwoSubnets(nn.Module):
    def __init__(self, subnet0: nn.Module, subnet1: nn.Module):
        super().__init__()
        self.subnets = nn.ModuleList([subnet0, subnet1])

    def forward(self, x, per_subnet: bool = False):
        """``log((softmax(D_0(E_0(x))) + softmax(D_1(E_1(x)))) / 2)``; with ``per_subnet``, ``(logits_0, logits_1,
        f_0, f_1)``: each subnet's logits and its encoder's deepest features (the input of L_dis, Eq. 1)."""
        outs = []
        for net in self.subnets:
            feats = net.encode(x)
            outs.append((net.decode(feats), feats[-1]))
        (logits0, f0), (logits1, f1) = outs
        if per_subnet:
            return logits0, logits1, f0, f1
        log_probs = torch.stack([logits0.float().log_softmax(1), logits1.float().log_softmax(1)])
        return torch.logsumexp(log_probs, dim=0) - math.log(2.0)


def build_cml(task: str, n_classes: int = None) -> TwoSubnets:
    """The task's two subnets: 'la' -> two V-Nets (``n_classes``, default 2: LA), 'acdc' -> two 2D U-Nets (4
    classes)."""
    if task == "la":
        n = n_classes or 2
        return TwoSubnets(VNet(n_channels=1, n_classes=n), VNet(n_channels=1, n_classes=n, upsampling="trilinear"))
    if task == "acdc":
        return TwoSubnets(UNet(in_chns=1, class_num=4), UNet(in_chns=1, class_num=4, upsampling="transposed"))
    raise ValueError(f"task {task!r}: expected 'la' or 'acdc'")
