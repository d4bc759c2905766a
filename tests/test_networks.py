import copy
from unittest import mock

import pytest
import torch

from networks import UNet, VNet, build_model
from networks import vnet as vnet_module
from networks.feature_perturbation import FeaturePerturbation


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_lineage():
    assert n_params(VNet(n_channels=1, n_classes=2)) == 9_448_866
    assert n_params(UNet(in_chns=1, class_num=4)) == 1_813_764


@pytest.mark.parametrize("task,shape", [("la", (3, 1, 32, 32, 16)), ("acdc", (3, 1, 32, 32))])
def test_perturbed_forward_shapes(task, shape):
    torch.manual_seed(0)
    m = build_model(task).train()
    x = torch.randn(shape)
    assert m(x).shape[0] == 3
    out = m(x, n_pert=2)
    assert out.shape == (3 + 2 * 2, m.out_conv.out_channels, *shape[2:])


def channel_masks(t):
    """(B, C) boolean: which channels survived a channel dropout of an all-ones input."""
    return t.flatten(2).amax(-1) > 0


@pytest.mark.parametrize("dim", [2, 3])
def test_masks_differ_per_level_and_per_sample_and_first_part_untouched(dim):
    torch.manual_seed(0)
    pert = FeaturePerturbation(dim, 0.25, 0.75).train()
    spatial = (4,) * dim
    feats = [torch.ones(5, c, *spatial) for c in (64, 64, 128)]
    out = pert.expand(feats, n=3)
    for f, o in zip(feats, out):
        assert o.shape == (5 + 6, *f.shape[1:])
        assert torch.equal(o[:5], f)                  # the unperturbed batch is untouched
        weak, strong = o[5:8], o[8:11]
        # surviving channels are rescaled by 1/(1-p), dropped ones are zero
        for part, p in ((weak, 0.25), (strong, 0.75)):
            kept = part[part != 0]
            assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
        mw, ms = channel_masks(weak), channel_masks(strong)
        assert not torch.equal(mw[0], mw[1]) and not torch.equal(ms[0], ms[1])  # per sample
        assert mw.float().mean() > ms.float().mean()                           # weak keeps more
    m0 = [channel_masks(o[5:8])[:, :64] for o in out[:2]]
    assert not torch.equal(m0[0], m0[1])                                        # per level


@pytest.mark.parametrize("task,shape", [("la", (4, 1, 32, 32, 16)), ("acdc", (4, 1, 32, 32))])
def test_labeled_part_is_never_perturbed(task, shape):
    """With batch norm frozen, the first B outputs of the perturbed forward equal the plain forward."""
    torch.manual_seed(0)
    m = build_model(task).eval()
    m.perturb.train()                                  # perturbations on, everything else deterministic
    x = torch.randn(shape)
    with torch.no_grad():
        plain = m(x)
        out = m(x, n_pert=2)
    assert torch.allclose(out[:4], plain, atol=1e-5)
    assert not torch.allclose(out[4:6], plain[2:], atol=1e-3)   # P_w of the last two changed them
    assert not torch.allclose(out[6:8], plain[2:], atol=1e-3)   # P_s too


@pytest.mark.parametrize("kind", ["dropout", "alpha", "feature_alpha"])
def test_dropout_types_build_and_run(kind):
    m = build_model("acdc", dropout_type=kind).train()
    assert m(torch.randn(2, 1, 32, 32), n_pert=1).shape == (4, 4, 32, 32)


def test_bad_dropout_settings_name_the_flag():
    with pytest.raises(ValueError, match="--dropout_type"):
        build_model("la", dropout_type="gaussian")
    with pytest.raises(ValueError, match="--drop_strong"):
        build_model("la", drop_strong=1.0)


class PlainVNet(torch.nn.Module):
    """A copy of a VNet with the lineage's plain modules: nn.ReLU in the up blocks, and the dropout + output
    convolution run directly (their activations kept) instead of recomputed in the backward pass."""

    def __init__(self, model):
        super().__init__()
        self.net = copy.deepcopy(model)
        for name in ("up2", "up3", "up4", "up5"):
            getattr(self.net, name)[2] = torch.nn.ReLU(inplace=True)

    def forward(self, x, n_pert=0):
        with mock.patch.object(vnet_module, "checkpoint", lambda fn, *a, **kw: fn(*a)):
            return self.net(x, n_pert=n_pert)


def forward_backward(model, x, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    y = model(x, n_pert=1)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), {n.removeprefix("net."): p.grad.clone() for n, p in model.named_parameters()}


def test_vnet_memory_rewrites_give_bitwise_the_plain_outputs_and_gradients():
    torch.manual_seed(0)
    lean = VNet().train()
    plain = PlainVNet(lean)
    x = torch.randn(2, 1, 32, 32, 16)
    y_lean, g_lean = forward_backward(lean, x, seed=7)
    y_plain, g_plain = forward_backward(plain, x, seed=7)
    assert torch.equal(y_lean, y_plain)
    for name in g_plain:
        assert torch.equal(g_lean[name], g_plain[name]), name
    # the dropout masks are really drawn (another seed gives other outputs), and eval mode agrees too
    y_other, _ = forward_backward(lean, x, seed=8)
    assert not torch.equal(y_other, y_lean)
    lean.eval()
    plain = PlainVNet(lean).eval()   # same batch-norm running statistics
    with torch.no_grad():
        assert torch.equal(lean(x), plain(x))


def saved_bytes(model, x):
    """Bytes of the distinct storages autograd keeps for the backward pass of one perturbed forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x, n_pert=1)
    return sum(storages.values()), y


def test_vnet_keeps_less_for_backward_than_the_plain_modules():
    torch.manual_seed(0)
    lean = VNet().train()
    plain = PlainVNet(lean)
    x = torch.randn(2, 1, 32, 32, 32)
    lean_bytes, _ = saved_bytes(lean, x)
    plain_bytes, _ = saved_bytes(plain, x)
    # full resolution, 16 channels, 4 decoder samples: the up2 ReLU result (4 bytes -> 1) and the dropped-out
    # copy before the output convolution (4 -> 0) are the two largest of the savings
    full_map = 4 * 16 * 32 * 32 * 32 * 4
    assert plain_bytes - lean_bytes >= full_map * (1 + 0.75)
