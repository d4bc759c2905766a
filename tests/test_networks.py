import pytest
import torch

from networks import UNet, VNet, build_model
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


def test_vnet_dropout_is_seeded_in_training_and_off_in_eval():
    """Dropout3d of the V-Net (bottleneck and before the output convolution) draws its masks from the torch RNG:
    the same seed gives the same training forward, another seed another one; eval mode draws nothing."""
    torch.manual_seed(0)
    m = VNet().train()                    # no feature perturbation without n_pert: only the V-Net's dropout draws
    x = torch.randn(2, 1, 32, 32, 16)

    def forward(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return m(x)
    a, b, c = forward(7), forward(7), forward(8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    m.eval()
    e = forward(7)
    assert torch.equal(e, forward(8))
    m.has_dropout = False                 # in eval mode the dropout is the identity
    assert torch.equal(e, forward(9))


def test_vnet_output_dropout_only_in_the_plain_forward():
    """The perturbed (two-pass) forward decodes without the Dropout3d before out_conv, as the release's
    no_drop=True decode; a plain forward (supervised training) keeps it; --pert_out_dropout restores it."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16, 16)
    for pert_out in (False, True):
        m = build_model("la", 0.0, 0.0, pert_out_dropout=pert_out).train()
        calls = []
        m.dropout.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
        m(x)  # plain: bottleneck + output dropout
        assert len(calls) == 2
        calls.clear()
        m(x, n_pert=1)  # perturbed: the bottleneck dropout, the output dropout only with pert_out_dropout
        assert len(calls) == (2 if pert_out else 1)


@pytest.mark.parametrize("task,shape", [("la", (2, 1, 16, 16, 16)), ("acdc", (2, 1, 32, 32))])
def test_feature_perturbations_apply_in_eval_mode_too(task, shape):
    """As in the release (its perturbation modules never leave training mode), an eval-mode perturbed forward
    still perturbs: the CutMix partners' teachers are computed that way; the unperturbed part is the plain
    eval-mode output."""
    torch.manual_seed(0)
    m = build_model(task).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        plain = m(x)
        out = m(x, n_pert=2)
    assert torch.allclose(out[:2], plain, atol=1e-5)
    assert not torch.allclose(out[2:4], plain, atol=1e-3) and not torch.allclose(out[4:], plain, atol=1e-3)
