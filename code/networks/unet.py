"""The 2D U-Net of the SSL4MIS lineage (channels 16-32-64-128-256; 1,813,764 parameters for 1 -> 4 classes).

Blocks of two conv-BN-LeakyReLU with dropout between them (encoder rates 0.05/0.1/0.2/0.3/0.5, decoder 0),
max-pool down, 1x1 conv + bilinear up, concatenated skips, a 3x3 output convolution. ``upsampling="transposed"``
upsamples by a stride-2 transposed convolution instead (CML's second subnet: 1,944,324 parameters).
``forward(x, n_pert=n)`` is CrossMatch's feature-perturbed forward: see networks/feature_perturbation.py."""
import torch
from torch import nn

from .feature_perturbation import FeaturePerturbation


def conv_block(c_in: int, c_out: int, p_drop: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(),
        nn.Dropout(p_drop),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU())


class UpBlock(nn.Module):
    def __init__(self, c_deep: int, c_skip: int, c_out: int, transposed: bool = False):
        super().__init__()
        if transposed:  # CML's second subnet: one stride-2 transposed convolution
            self.reduce = nn.Identity()
            self.up = nn.ConvTranspose2d(c_deep, c_skip, 2, stride=2)
        else:
            self.reduce = nn.Conv2d(c_deep, c_skip, 1)
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = conv_block(2 * c_skip, c_out, 0.0)

    def forward(self, deep, skip):
        return self.conv(torch.cat([skip, self.up(self.reduce(deep))], dim=1))


class UNet(nn.Module):
    def __init__(self, in_chns: int = 1, class_num: int = 4, features=(16, 32, 64, 128, 256),
                 encoder_dropout=(0.05, 0.1, 0.2, 0.3, 0.5), drop_weak: float = 0.25, drop_strong: float = 0.75,
                 dropout_type: str = "dropout", upsampling: str = "bilinear"):
        super().__init__()
        f, d = features, encoder_dropout
        if upsampling not in ("bilinear", "transposed"):
            raise ValueError(f"upsampling {upsampling!r}: expected 'bilinear' or 'transposed'")
        t = upsampling == "transposed"
        self.enc = nn.ModuleList([conv_block(in_chns, f[0], d[0])] +
                                 [conv_block(f[i - 1], f[i], d[i]) for i in range(1, 5)])
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList([UpBlock(f[4], f[3], f[3], t), UpBlock(f[3], f[2], f[2], t),
                                  UpBlock(f[2], f[1], f[1], t), UpBlock(f[1], f[0], f[0], t)])
        self.out_conv = nn.Conv2d(f[0], class_num, 3, padding=1)
        self.perturb = FeaturePerturbation(2, drop_weak, drop_strong, dropout_type)

    def encode(self, x):
        feats = [self.enc[0](x)]
        for block in self.enc[1:]:
            feats.append(block(self.pool(feats[-1])))
        return feats

    def decode(self, feats):
        x = feats[4]
        for block, skip in zip(self.ups, reversed(feats[:4])):
            x = block(x, skip)
        return self.out_conv(x)

    def forward(self, x, n_pert: int = 0):
        """Logits for x; with n_pert=n, logits for [x, P_w(last n of x), P_s(last n of x)] (batch B + 2n)."""
        return self.decode(self.perturb.expand(self.encode(x), n_pert))
