from .cml import TwoSubnets, build_cml
from .unet import UNet
from .vnet import VNet


def build_model(task: str, drop_weak: float = 0.25, drop_strong: float = 0.75, dropout_type: str = "dropout",
                pert_out_dropout: bool = False, n_classes: int = None):
    """The task's network: 'la' -> 3D V-Net (``n_classes``, default 2: LA), 'acdc' -> 2D U-Net (4 classes)."""
    kw = dict(drop_weak=drop_weak, drop_strong=drop_strong, dropout_type=dropout_type)
    if task == "la":
        return VNet(n_channels=1, n_classes=n_classes or 2, pert_out_dropout=pert_out_dropout, **kw)
    if task == "acdc":
        return UNet(in_chns=1, class_num=4, **kw)
    raise ValueError(f"task {task!r}: expected 'la' or 'acdc'")
