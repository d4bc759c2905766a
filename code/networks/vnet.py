"""The V-Net of the UA-MT lineage (16 base filters, batch norm; 9,448,866 parameters for 1 -> 2 channels).

Encoder stages of 1-2-3-3-3 convolutions joined by stride-2 convolutions, decoder stages of 3-3-2-1
joined by stride-2 transposed convolutions, additive skips, Dropout3d(0.5) on the bottleneck and before the
output convolution when ``has_dropout``. ``forward(x, n_pert=n)`` is CrossMatch's feature-perturbed forward
(networks/feature_perturbation.py); it decodes without the output dropout, as the release does, unless
``pert_out_dropout``. ``upsampling="trilinear"`` joins the decoder stages by trilinear upsampling + a 3x3x3
convolution instead (CML's second subnet: 10,275,746 parameters)."""
from torch import nn

from .feature_perturbation import FeaturePerturbation


def conv_stage(n_convs: int, c_in: int, c_out: int) -> nn.Sequential:
    layers = []
    for i in range(n_convs):
        layers += [nn.Conv3d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 2, stride=2), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))


def up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose3d(c_in, c_out, 2, stride=2), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))


def up_trilinear(c_in: int, c_out: int) -> nn.Sequential:
    """The other decoder's upsampling (CML's second subnet): trilinear (corners aligned), then a 3x3x3 convolution."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True),
                         nn.Conv3d(c_in, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))


UPSAMPLING = {"transposed": up, "trilinear": up_trilinear}


class VNet(nn.Module):
    def __init__(self, n_channels: int = 1, n_classes: int = 2, n_filters: int = 16, has_dropout: bool = True,
                 drop_weak: float = 0.25, drop_strong: float = 0.75, dropout_type: str = "dropout",
                 pert_out_dropout: bool = False, upsampling: str = "transposed"):
        super().__init__()
        f = n_filters
        if upsampling not in UPSAMPLING:
            raise ValueError(f"upsampling {upsampling!r}: expected one of {', '.join(UPSAMPLING)}")
        make_up = UPSAMPLING[upsampling]
        self.enc1 = conv_stage(1, n_channels, f)
        self.down1 = down(f, 2 * f)
        self.enc2 = conv_stage(2, 2 * f, 2 * f)
        self.down2 = down(2 * f, 4 * f)
        self.enc3 = conv_stage(3, 4 * f, 4 * f)
        self.down3 = down(4 * f, 8 * f)
        self.enc4 = conv_stage(3, 8 * f, 8 * f)
        self.down4 = down(8 * f, 16 * f)
        self.enc5 = conv_stage(3, 16 * f, 16 * f)

        self.up5 = make_up(16 * f, 8 * f)
        self.dec4 = conv_stage(3, 8 * f, 8 * f)
        self.up4 = make_up(8 * f, 4 * f)
        self.dec3 = conv_stage(3, 4 * f, 4 * f)
        self.up3 = make_up(4 * f, 2 * f)
        self.dec2 = conv_stage(2, 2 * f, 2 * f)
        self.up2 = make_up(2 * f, f)
        self.dec1 = conv_stage(1, f, f)
        self.out_conv = nn.Conv3d(f, n_classes, 1)

        self.has_dropout, self.pert_out_dropout = has_dropout, pert_out_dropout
        self.dropout = nn.Dropout3d(0.5)
        self.perturb = FeaturePerturbation(3, drop_weak, drop_strong, dropout_type)

    def encode(self, x):
        x1 = self.enc1(x)
        x2 = self.enc2(self.down1(x1))
        x3 = self.enc3(self.down2(x2))
        x4 = self.enc4(self.down3(x3))
        x5 = self.enc5(self.down4(x4))
        if self.has_dropout:
            x5 = self.dropout(x5)
        return [x1, x2, x3, x4, x5]

    def decode(self, feats, out_dropout: bool = True):
        x1, x2, x3, x4, x5 = feats
        x = self.dec4(self.up5(x5) + x4)
        x = self.dec3(self.up4(x) + x3)
        x = self.dec2(self.up3(x) + x2)
        x = self.dec1(self.up2(x) + x1)
        if self.has_dropout and out_dropout:
            x = self.dropout(x)
        return self.out_conv(x)

    def forward(self, x, n_pert: int = 0):
        """Logits for x; with n_pert=n, logits for [x, P_w(last n of x), P_s(last n of x)] (batch B + 2n)."""
        return self.decode(self.perturb.expand(self.encode(x), n_pert), n_pert == 0 or self.pert_out_dropout)
