"""CML (train_la_cml.py, train_acdc_cml.py; docs/CML.md): the two subnets, the losses of Eqs. (1)-(11) against
hand and NumPy computations with stub networks, the pre-training / self-training switch (also across a resume),
the averaged two-subnet evaluation, the flags, and two-iteration runs through the command line (on real data too
when LA_ROOT / ACDC_ROOT are set, as in test_real_data.py)."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

import train_acdc_cml
import train_la_cml
from networks import TwoSubnets, UNet, VNet, build_cml
from test_cli import check_run_folder, py, run
from test_losses import np_ce, np_dice, np_softmax
from test_real_data import ACDC_ROOT, LA_ROOT, _run, needs_acdc, needs_la
from test_resume import Interrupt, assert_same_training_state, interrupt_at
from utils.checkpoint import load_checkpoint
from utils.cml import cml_lr, conflict_loss, cuboid_mask, pseudo_labels
from utils.data import read_list
from utils.evaluation import predict_slices, sliding_window
from utils.training import iteration_seed


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# -------------------------------------------------------------------------------------------- the subnets
def test_parameter_counts_and_separate_parameters():
    la, acdc = build_cml("la"), build_cml("acdc")
    # V-Net 9,448,866; its trilinear twin replaces four 2x2x2 transposed convolutions by 3x3x3 convolutions:
    # + (256*128 + 128*64 + 64*32 + 32*16) * (27 - 8) = 826,880
    assert [n_params(s) for s in la.subnets] == [9_448_866, 10_275_746]
    # U-Net 1,813,764; a 2x2 transposed convolution in place of each 1x1 one: + 3 * (256*128 + ... + 32*16) = 130,560
    assert [n_params(s) for s in acdc.subnets] == [1_813_764, 1_944_324]
    assert n_params(la) == 9_448_866 + 10_275_746 and n_params(acdc) == 1_813_764 + 1_944_324
    for model in (la, acdc):
        storages = [{p.data_ptr() for p in s.parameters()} for s in model.subnets]
        assert not storages[0] & storages[1]                       # no parameter shared
    assert isinstance(la.subnets[0].up5[0], nn.ConvTranspose3d) and isinstance(la.subnets[1].up5[0], nn.Upsample)
    assert la.subnets[1].up5[0].mode == "trilinear" and isinstance(la.subnets[1].up5[1], nn.Conv3d)
    assert isinstance(acdc.subnets[0].ups[0].up, nn.Upsample) and isinstance(acdc.subnets[0].ups[0].reduce, nn.Conv2d)
    assert isinstance(acdc.subnets[1].ups[0].up, nn.ConvTranspose2d)
    # a loss on one subnet's output trains that subnet only
    torch.manual_seed(0)
    logits0, logits1, f0, f1 = acdc(torch.randn(2, 1, 32, 32), per_subnet=True)
    assert f0.shape == f1.shape == (2, 256, 2, 2) and logits0.shape == logits1.shape == (2, 4, 32, 32)
    logits0.sum().backward()
    assert all(p.grad is not None for p in acdc.subnets[0].parameters())
    assert all(p.grad is None for p in acdc.subnets[1].parameters())


def test_bad_upsampling_names_the_choices():
    with pytest.raises(ValueError, match="trilinear"):
        VNet(upsampling="nearest")
    with pytest.raises(ValueError, match="transposed"):
        UNet(upsampling="nearest")


# ------------------------------------------------------------------------------------------ Eq. (1): L_dis
def test_conflict_loss_by_hand():
    f = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]]).T.reshape(1, 2, 3, 1)  # 3 voxels, 2 channels
    assert conflict_loss(f, f).item() == pytest.approx(2.0)                 # identical: 1 + cos 0 = 2
    assert conflict_loss(f, -0.5 * f).item() == pytest.approx(0.0)          # opposite, any length: 1 - 1 = 0
    g = torch.tensor([[1.0, 0.0], [5.0, 0.0], [-1.0, 1.0]]).T.reshape(1, 2, 3, 1)
    # voxel by voxel: cos 1, cos 0, cos 0 -> 1 + 1/3
    assert conflict_loss(f, g).item() == pytest.approx(1 + 1 / 3)
    # a zero feature vector has no direction: cos 0 there
    assert conflict_loss(torch.zeros(1, 2, 1, 1), f[..., :1, :]).item() == pytest.approx(1.0)
    # the other subnet's feature is a copy without gradient (Eq. 1's f-bar)
    a, b = f.clone().requires_grad_(), g.clone().requires_grad_()
    conflict_loss(a, b).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad is None


# ------------------------------------------------------------------------------------- the cuboid and Eq. 9
def test_cuboid_mask_sides_and_positions():
    torch.manual_seed(0)
    m = cuboid_mask((6, 9, 3), 2 / 3)                # sides int(6 * 2/3) = 4, int(9 * 2/3) = 6, int(3 * 2/3) = 2
    idx = torch.nonzero(m)
    lo, hi = idx.min(0).values, idx.max(0).values
    assert (hi - lo + 1).tolist() == [4, 6, 2] and int(m.sum()) == 4 * 6 * 2   # one solid cuboid
    # the same draws as the function: a start per axis, uniform in [0, size - side]
    torch.manual_seed(0)
    assert lo.tolist() == [int(torch.randint(0, s - b + 1, ()).item()) for s, b in ((6, 4), (9, 6), (3, 2))]
    starts = set()
    for _ in range(200):
        m = cuboid_mask((8, 8), 0.5)
        assert int(m.sum()) == 16
        starts.add(tuple(torch.nonzero(m).min(0).values.tolist()))
    assert starts == {(i, j) for i in range(5) for j in range(5)}    # every position, flush with the end too


def test_largest_component_pseudo_labels():
    """argmax, then per class its largest connected component (diagonal neighbours connect); the rest is 0."""
    hard = np.array([[1, 1, 0, 0, 1],
                     [0, 1, 0, 2, 0],
                     [0, 0, 1, 0, 2],      # (2, 2) touches (1, 1) diagonally: 4 voxels of class 1 joined
                     [3, 0, 0, 0, 0]])     # the single voxel of class 1 at (0, 4) is another component
    logits = torch.from_numpy(np.eye(4)[hard].transpose(2, 0, 1)[None] * 5.0)
    expected = np.array([[1, 1, 0, 0, 0],
                         [0, 1, 0, 2, 0],
                         [0, 0, 1, 0, 2],
                         [3, 0, 0, 0, 0]])
    out = pseudo_labels(torch.cat([logits, logits.flip(-1)]))
    assert out.dtype == torch.int64 and out.shape == (2, 4, 5)
    assert out[0].tolist() == expected.tolist() and out[1].tolist() == expected[:, ::-1].tolist()
    # 3D, two classes: the larger of two blobs stays; an empty class stays empty
    vol = torch.zeros(1, 2, 6, 6, 6)
    vol[0, 1, :2, :2, :2] = vol[0, 1, 4:, 4:, 3:] = 1.0
    got = pseudo_labels(vol)[0]
    assert int(got.sum()) == 2 * 2 * 3 and got[4:, 4:, 3:].all()
    assert pseudo_labels(torch.zeros(1, 2, 3, 3, 3).index_fill_(1, torch.tensor([0]), 1.0)).sum() == 0


class Stub(nn.Module):
    """Stands for TwoSubnets: returns (logits0, logits1, f0, f1) from a list, one entry per call, each logit and
    feature times a trainable 1; records the inputs and whether gradients were on."""

    def __init__(self, outputs):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.outputs, self.inputs, self.grad_on = outputs, [], []

    def forward(self, x, per_subnet=False):
        assert per_subnet
        self.inputs.append(x.clone())
        self.grad_on.append(torch.is_grad_enabled())
        return tuple(t * self.scale for t in self.outputs[len(self.inputs) - 1])


def cml_args(**kw):
    base = dict(seed=1337, base_lr=0.01, pre_iterations=0, lr_step=0, lr_gamma=0.1, u_weight=0.5, dis_weight=0.1,
                mask_ratio=0.5, amp="none", memory_format="auto")
    return SimpleNamespace(**{**base, **kw})


def onehot_logits(labels, n_classes=4, scale=4.0):
    return torch.from_numpy(np.eye(n_classes)[np.asarray(labels, dtype=np.int64)].transpose(0, 3, 1, 2) * scale).float()


def test_heterogeneous_targets_by_hand(monkeypatch):
    """A 2 x 4 case, 4 classes. Labeled images u = 1, v = 2 (labels all 1 and all 2); unlabeled p = 10, q = 20.
    Cuboid: columns 1 and 2. Pseudo-labels: subnet 0 says p = 1, q = 2; subnet 1 says p = 3, q = 0."""
    inside = torch.tensor([[False, True, True, False]] * 2)
    monkeypatch.setattr(train_acdc_cml, "cuboid_mask", lambda spatial, beta, device: inside)
    seen = []
    real_loss = train_acdc_cml.supervised_loss

    def recording_loss(logits, target):
        seen.append(target.clone())
        return real_loss(logits, target)
    monkeypatch.setattr(train_acdc_cml, "supervised_loss", recording_loss)
    feat = torch.randn(1, 8, 1, 1)
    pl = onehot_logits([np.full((2, 4), 1), np.full((2, 4), 2)]), onehot_logits([np.full((2, 4), 3), np.zeros((2, 4))])
    any_logits = torch.zeros(1, 4, 2, 4)
    stub = Stub([(any_logits, any_logits, feat, feat), (*pl, feat.repeat(2, 1, 1, 1), feat.repeat(2, 1, 1, 1)),
                 (any_logits, any_logits, feat, -feat)])
    batch = {"x_l": torch.cat([torch.full((1, 1, 2, 4), 1.0), torch.full((1, 1, 2, 4), 2.0)]),
             "y_l": torch.stack([torch.full((2, 4), 1), torch.full((2, 4), 2)]),
             "x_w": torch.cat([torch.full((1, 1, 2, 4), 10.0), torch.full((1, 1, 2, 4), 20.0)])}
    opt = torch.optim.SGD(stub.parameters(), lr=0.01)
    logs, shown = train_acdc_cml.train_iteration(stub, opt, batch, 0, cml_args(), torch.device("cpu"))
    assert stub.grad_on == [True, False, True]       # the pseudo-labels come from a pass without gradients
    # Eq. 5 / 8: outside the cuboid the first image of the pair, inside the second
    assert stub.inputs[0][0, 0].tolist() == [[1, 2, 2, 1]] * 2
    assert stub.inputs[1][:, 0, 0, 0].tolist() == [10, 20]                    # the unmixed unlabeled images
    assert stub.inputs[2][0, 0].tolist() == [[10, 20, 20, 10]] * 2
    # Eq. 6 for both subnets, then Eq. 9: subnet 0 learns subnet 1's label of p outside (3), its own of q inside
    # (2); subnet 1 learns subnet 0's label of p outside (1), its own of q inside (0)
    assert [t[0].tolist() for t in seen] == [[[1, 2, 2, 1]] * 2, [[1, 2, 2, 1]] * 2,
                                             [[3, 2, 2, 3]] * 2, [[1, 0, 0, 1]] * 2]
    assert shown["y_l"][0].tolist() == [[1, 2, 2, 1]] * 2
    assert logs["pl_agree"].item() == 0.0 and logs["loss_dis_l"].item() == pytest.approx(4.0)
    assert logs["loss_dis_u"].item() == pytest.approx(0.0)            # features f, f: 2 each way; f, -f: 0 each way


# --------------------------------------------------------------------------------- the whole loss, NumPy
def np_lcc_labels(logits):
    hard = np_softmax(logits).argmax(1)
    out = np.zeros_like(hard)
    for b in range(len(hard)):
        for c in range(1, logits.shape[1]):
            comp, n = ndimage.label(hard[b] == c, structure=np.ones((3,) * (hard.ndim - 1)))
            if n:
                out[b][comp == np.argmax(np.bincount(comp.ravel())[1:]) + 1] = c
    return out


def np_conflict(f, g):
    fn = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return 1 + (fn * gn).sum(1).mean()


def np_sup(logits, target):
    return 0.5 * (np_ce(logits, target) + np_dice(logits, target, np.ones(target.shape)))


def run_la_stub(it, args, L=4, U=4, spatial=(6, 5, 4), seed=0):
    rng = np.random.default_rng(seed)
    def logits(n):
        return rng.normal(scale=2.0, size=(n, 2, *spatial)).astype(np.float32)
    def feats(n):
        return rng.normal(size=(n, 8, 2, 2, 1)).astype(np.float32)
    q0, q1 = logits(U), logits(U)
    q0[:, 1] -= 3.0                                 # sparse foreground: several components, the LCC matters
    q1[:, 1] -= 3.0
    outs = [(logits(L // 2), logits(L // 2), feats(L // 2), feats(L // 2)),
            (q0, q1, feats(U), feats(U)),
            (logits(U // 2), logits(U // 2), feats(U // 2), feats(U // 2))]
    batch = {"x_l": torch.randn(L, 1, *spatial), "y_l": torch.from_numpy(rng.integers(0, 2, size=(L, *spatial))),
             "x_w": torch.randn(U, 1, *spatial)}
    stub = Stub([tuple(map(torch.from_numpy, o)) for o in outs])
    opt = torch.optim.SGD(stub.parameters(), lr=123.0)
    logs, shown = train_la_cml.train_iteration(stub, opt, batch, it, args, torch.device("cpu"))
    torch.manual_seed(iteration_seed(args.seed, it))               # the iteration's cuboids, drawn again
    cut_l = cuboid_mask(spatial, args.mask_ratio).numpy()
    cut_u = cuboid_mask(spatial, args.mask_ratio).numpy()
    outs = [tuple(a.astype(np.float64) for a in o) for o in outs]
    return stub, opt, logs, shown, outs, batch, cut_l, cut_u


def test_self_training_loss_matches_numpy():
    args = cml_args(u_weight=0.7, dis_weight=0.3, mask_ratio=2 / 3)
    stub, opt, logs, shown, outs, batch, cut_l, cut_u = run_la_stub(5, args)
    assert [tuple(x.shape) for x in stub.inputs] == [(2, 1, 6, 5, 4), (4, 1, 6, 5, 4), (2, 1, 6, 5, 4)]
    x_l, y_l, x_w = (batch[k].numpy() for k in ("x_l", "y_l", "x_w"))
    assert np.array_equal(stub.inputs[0].numpy(), np.where(cut_l, x_l[2:], x_l[:2]))
    assert np.array_equal(stub.inputs[2].numpy(), np.where(cut_u, x_w[2:], x_w[:2]))
    (p0_l, p1_l, f0_l, f1_l), (q0, q1, _, _), (p0_u, p1_u, f0_u, f1_u) = outs
    y_mix = np.where(cut_l, y_l[2:], y_l[:2])
    pl0, pl1 = np_lcc_labels(q0), np_lcc_labels(q1)
    y0, y1 = np.where(cut_u, pl0[2:], pl1[:2]), np.where(cut_u, pl1[2:], pl0[:2])
    sup_l = np_sup(p0_l, y_mix) + np_sup(p1_l, y_mix)
    sup_u = np_sup(p0_u, y0) + np_sup(p1_u, y1)
    dis_l = np_conflict(f0_l, f1_l) + np_conflict(f1_l, f0_l)
    dis_u = np_conflict(f0_u, f1_u) + np_conflict(f1_u, f0_u)
    expected = dict(loss_sup_l=sup_l, loss_sup_u=sup_u, loss_dis_l=dis_l, loss_dis_u=dis_u,
                    loss=sup_l + 0.7 * sup_u + 0.3 * (dis_l + dis_u), pl_agree=(pl0 == pl1).mean())
    assert logs.keys() == expected.keys()
    for k, v in expected.items():
        assert logs[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert 0 < expected["pl_agree"] < 1
    assert (np_softmax(q0).argmax(1) != pl0).any()      # the largest-component step really removed voxels here
    assert np.allclose(shown["pred"].numpy(), (np_softmax(p0_l) + np_softmax(p1_l)) / 2, atol=1e-6)
    assert opt.param_groups[0]["lr"] == 0.01


def test_pretraining_loss_matches_numpy_and_uses_labeled_data_only():
    args = cml_args(pre_iterations=10, dis_weight=0.2, mask_ratio=2 / 3)
    stub, _, logs, _, outs, batch, cut_l, _ = run_la_stub(9, args, seed=1)
    assert len(stub.inputs) == 1                    # one pass, on the mixed labeled pair: nothing unlabeled
    (p0_l, p1_l, f0_l, f1_l), _, _ = outs
    y_l = batch["y_l"].numpy()
    y_mix = np.where(cut_l, y_l[2:], y_l[:2])
    sup_l = np_sup(p0_l, y_mix) + np_sup(p1_l, y_mix)
    dis_l = np_conflict(f0_l, f1_l) + np_conflict(f1_l, f0_l)
    assert logs.keys() == {"loss", "loss_sup_l", "loss_dis_l"}
    assert logs["loss"].item() == pytest.approx(sup_l + 0.2 * dis_l, rel=1e-5)    # Eq. 11
    assert logs["loss_dis_l"].item() == pytest.approx(dis_l, rel=1e-5)


def test_la_and_acdc_scripts_compute_the_same_algorithm():
    """train_acdc_cml.train_iteration is written out like train_la_cml's: both give the same losses on a 2D,
    4-class stub batch, pre-training and self-training, so that the two copies cannot drift apart unnoticed."""
    rng = np.random.default_rng(3)
    spatial, L, U = (8, 8), 4, 6
    def out(n):
        return tuple(torch.from_numpy(rng.normal(size=s).astype(np.float32)) for s in
                     ((n, 4, *spatial), (n, 4, *spatial), (n, 16, 2, 2), (n, 16, 2, 2)))
    outs = [out(L // 2), out(U), out(U // 2)]
    batch = {"x_l": torch.randn(L, 1, *spatial), "y_l": torch.from_numpy(rng.integers(0, 4, size=(L, *spatial))),
             "x_w": torch.randn(U, 1, *spatial)}
    for it in (2, 3):
        results = []
        for module in (train_la_cml, train_acdc_cml):
            stub = Stub(outs)
            opt = torch.optim.SGD(stub.parameters(), lr=1.0)
            logs, _ = module.train_iteration(stub, opt, batch, it, cml_args(pre_iterations=3), torch.device("cpu"))
            results.append(({k: v.item() for k, v in logs.items()}, stub.scale.item(), len(stub.inputs)))
        assert results[0] == results[1]
        assert results[0][2] == (1 if it < 3 else 3)


# --------------------------------------------------------------------------- the switch and the schedule
def test_learning_rate_schedule():
    la = train_la_cml.parse_args([])
    assert [cml_lr(la, it) for it in (0, 1999, 2000, 4499, 4500, 6999, 7000)] == pytest.approx(
        [0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 1e-4])
    acdc = train_acdc_cml.parse_args([])
    assert {cml_lr(acdc, it) for it in (0, 9999, 10000, 39999)} == {0.01}


def test_switch_at_pre_iterations():
    """Iterations before --pre_iterations make one labeled pass; from it on, three passes (labeled, unlabeled
    without gradients, mixed unlabeled)."""
    calls = []
    for it in range(5):
        stub, *_ = run_la_stub(it, cml_args(pre_iterations=3))
        calls.append(len(stub.inputs))
    assert calls == [1, 1, 1, 3, 3]


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    from utils.synthetic import make_acdc
    return make_acdc(tmp_path_factory.mktemp("acdc") / "ACDC", n_train_patients=2, n_val=1, n_test=0,
                     shape=(16, 48, 48), shape_jitter=0.0)


def acdc_flags(root, out, exp, *extra):
    return ["--root_path", str(root), "--out_dir", str(out), "--exp", exp, "--labelnum", "1", "--patch_size", "32",
            "32", "--batch_size", "4", "--labeled_bs", "2", "--max_iterations", "4", "--pre_iterations", "2",
            "--num_workers", "0", "--device", "cpu", "--deterministic", "--save_every", "1", "--log_every", "1",
            *extra]


def test_switch_across_a_resume(acdc_root, tmp_path, monkeypatch, one_thread):
    """Interrupted inside iteration 2, the first self-training one, and resumed: the resumed run starts at
    iteration 2 in self-training and ends with the same weights and optimizer state as an uninterrupted run."""
    ref = train_acdc_cml.main(acdc_flags(acdc_root, tmp_path, "ref"))
    with monkeypatch.context() as m:
        interrupt_at(train_acdc_cml, m, 2)
        with pytest.raises(Interrupt):
            train_acdc_cml.main(acdc_flags(acdc_root, tmp_path, "cut"))
    run_dir = tmp_path / "ACDC_cut_1_labeled"
    assert load_checkpoint(run_dir / "latest.pth")["iteration"] == 2
    trained = interrupt_at(train_acdc_cml, monkeypatch)
    train_acdc_cml.main(acdc_flags(acdc_root, tmp_path, "cut", "--resume"))
    assert trained == [2, 3]
    assert_same_training_state(ref / "iter_4.pth", run_dir / "iter_4.pth")
    log = (run_dir / "log.txt").read_text()
    assert log.count("pre-training done") == 1
    lines = [line for line in log.splitlines() if " it " in line and "/4 lr" in line]
    assert len(lines) == 4
    assert all("loss_sup_u" not in x for x in lines[:2]) and all("loss_sup_u" in x for x in lines[2:])


# ---------------------------------------------------------------------------------- averaged evaluation
class ConstantNet(nn.Module):
    """encode/decode like the real subnets, logits fixed per voxel."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def encode(self, x):
        return [x]

    def decode(self, feats):
        x = feats[0]
        shape = (1, len(self.logits)) + (1,) * (x.dim() - 2)
        return self.logits.view(shape).expand(len(x), len(self.logits), *x.shape[2:])


def test_prediction_is_the_mean_of_the_two_softmaxes():
    # LA: sliding window probabilities = (softmax_0 + softmax_1) / 2, not the softmax of the mean logits
    model = TwoSubnets(ConstantNet([0.0, 3.0]), ConstantNet([1.0, 0.0]))
    probs, labels = sliding_window(model, np.zeros((20, 18, 10), np.float32), (16, 16, 8), 4, 2)
    mean = (torch.tensor([0.0, 3.0]).softmax(0) + torch.tensor([1.0, 0.0]).softmax(0)) / 2
    assert np.allclose(probs, mean.numpy()[:, None, None, None], atol=1e-6) and (labels == 1).all()
    assert not np.allclose(probs[1], torch.tensor([0.5, 1.5]).softmax(0)[1].item(), atol=1e-3)
    # ACDC: the argmax of the mean softmax, where the mean logits would say another class
    a, b = [0.0, 5.0, 0.0, 0.0], [0.0, -5.0, 3.0, 0.0]
    model = TwoSubnets(ConstantNet(a), ConstantNet(b))
    assert torch.tensor(a).add(torch.tensor(b)).argmax().item() == 2
    pred = predict_slices(model, np.zeros((3, 20, 24), np.float32), (16, 16))
    assert pred.shape == (3, 20, 24) and (pred == 1).all()
    x = torch.randn(2, 1, 16, 16)
    real = build_cml("acdc").eval()
    with torch.no_grad():
        l0, l1, _, _ = real(x, per_subnet=True)
        assert torch.allclose(real(x).exp(), (l0.softmax(1) + l1.softmax(1)) / 2, atol=1e-6)


# ---------------------------------------------------------------------------------------------- flags
def test_flags_defaults_and_refusals(capsys):
    la, acdc = train_la_cml.parse_args([]), train_acdc_cml.parse_args([])
    assert (la.max_iterations, la.pre_iterations, la.batch_size, la.labeled_bs, la.base_lr, la.optimizer) == (
        17000, 2000, 8, 4, 0.01, "sgd")
    assert (la.u_weight, la.dis_weight, la.mask_ratio, la.method, la.exp) == (1.0, 0.2, 2 / 3, "cml", "CML")
    assert (acdc.max_iterations, acdc.pre_iterations, acdc.batch_size, acdc.labeled_bs) == (40000, 10000, 24, 12)
    assert (acdc.u_weight, acdc.dis_weight, acdc.mask_ratio, acdc.lr_step) == (0.5, 0.1, 0.5, 0)
    assert not hasattr(la, "conf_thresh") and not hasattr(la, "poly_power")
    for argv, message in ((["--conf_thresh", "0.9"], "--conf_thresh: a CrossMatch flag"),
                          (["--method", "crossmatch"], "this script trains CML"),
                          (["--labeled_bs", "3"], "even number"),
                          (["--max_iterations", "10"], "--pre_iterations: 2000"),
                          (["--mask_ratio", "1"], "--mask_ratio"),
                          (["--labeled_bs", "8"], "--labeled_bs")):
        with pytest.raises(SystemExit):
            train_la_cml.parse_args(argv)
        assert message in capsys.readouterr().err, argv
    train_la_cml.main(["--print_config"])
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["args"]["method"] == "cml" and cfg["run_dir"].endswith("LA_CML_8_labeled")


# ------------------------------------------------------------------------------------ command lines
def test_acdc_cml_train_then_test_through_the_command_line(syn_acdc, tmp_path):
    r = py("train_acdc_cml.py", "--root_path", syn_acdc, "--out_dir", tmp_path, "--exp", "cli", "--device", "cpu",
           "--labelnum", 1, "--max_iterations", 2, "--pre_iterations", 1, "--batch_size", 4, "--labeled_bs", 2,
           "--patch_size", 32, 32, "--num_workers", 0, "--log_every", 1, "--image_every", 1, "--val_every", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "ACDC_cli_1_labeled"
    check_run_folder(run_dir, 2, "acdc")
    log = (run_dir / "log.txt").read_text()
    assert "1,813,764 parameters" in log and "1,944,324 parameters" in log and "mean Dice on val.list" in log
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["n_labeled_slices"] == 32 and cfg["args"]["method"] == "cml"
    r = py("test_acdc.py", "--run", run_dir, "--list", "val.list", "--patch_size", 32, 32, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "eval_val" / "summary.json").read_text())
    assert summary["method"] == "cml" and set(summary["per_class"]) == {"RV", "Myo", "LV"}


def test_la_cml_through_the_run_script(syn_la, tmp_path):
    """CML=1 bash run_la.sh --demo with 2 iterations (one of each stage) on the tests' small LA root: train_la_cml.py
    through its command line into its own run folder, then test_la.py on it."""
    r = run(["bash", "run_la.sh", "--demo", "--max_iterations", "2", "--pre_iterations", "1", "--out_dir",
             str(tmp_path / "model"), "--num_workers", "0", "--log_every", "1", "--image_every", "1"],
            env={"DEMO_ROOT": str(syn_la), "CML": "1"})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    run_dir = tmp_path / "model" / "LA_demo_cml_4_labeled"
    assert list((tmp_path / "model").iterdir()) == [run_dir]
    check_run_folder(run_dir, 2, "la")
    log = (run_dir / "log.txt").read_text()
    assert "9,448,866 parameters" in log and "10,275,746 parameters" in log and "2+2 per batch" in log
    assert "it 1: pre-training done" in log and "loss_sup_u" in log
    summary = json.loads((run_dir / "eval_test" / "summary.json").read_text())
    assert summary["method"] == "cml" and summary["n_cases"] == 2 and summary["final_checkpoint"] is True


# ---------------------------------------------------------------------- real data (LA_ROOT / ACDC_ROOT)
@needs_la
def test_la_cml_cli_on_real_cases(tmp_path):
    """Two CML iterations (one of each stage) on 4 real training cases, then test_la.py on a held-apart case."""
    cases = read_list(Path(LA_ROOT) / "train.list")
    (tmp_path / "train4.list").write_text("\n".join(cases[:4]) + "\n")
    (tmp_path / "held1.list").write_text(cases[-1] + "\n")
    r = _run("train_la_cml.py", "--root_path", LA_ROOT, "--train_list", tmp_path / "train4.list", "--labelnum", 2,
             "--max_iterations", 2, "--pre_iterations", 1, "--batch_size", 4, "--labeled_bs", 2, "--patch_size", 64,
             64, 48, "--num_workers", 0, "--out_dir", tmp_path, "--exp", "real", "--log_every", 1, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loss_sup_u" in (tmp_path / "LA_real_2_labeled" / "log.txt").read_text()
    r = _run("test_la.py", "--run", tmp_path / "LA_real_2_labeled", "--root_path", LA_ROOT,
             "--list", tmp_path / "held1.list", "--stride_xy", 48, "--stride_z", 40, "--sw_batch", 4, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "LA_real_2_labeled" / "eval_held1" / "summary.json").read_text())
    assert summary["n_cases"] == 1 and summary["method"] == "cml" and 0.0 <= summary["dice"] <= 1.0


@needs_acdc
def test_acdc_cml_cli_on_real_slices(tmp_path):
    """Two CML iterations on the first 40 real training slices (1 labeled patient = 32 slices), then test_acdc.py
    on one validation volume."""
    slices = read_list(Path(ACDC_ROOT) / "train_slices.list")[:40]
    (tmp_path / "slices40.list").write_text("\n".join(slices) + "\n")
    (tmp_path / "val1.list").write_text(read_list(Path(ACDC_ROOT) / "val.list")[0] + "\n")
    r = _run("train_acdc_cml.py", "--root_path", ACDC_ROOT, "--train_list", tmp_path / "slices40.list", "--labelnum",
             1, "--max_iterations", 2, "--pre_iterations", 1, "--patch_size", 64, 64, "--batch_size", 4,
             "--labeled_bs", 2, "--num_workers", 0, "--out_dir", tmp_path, "--exp", "real", "--log_every", 1,
             "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run("test_acdc.py", "--run", tmp_path / "ACDC_real_1_labeled", "--root_path", ACDC_ROOT,
             "--list", tmp_path / "val1.list", "--patch_size", 64, 64, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "ACDC_real_1_labeled" / "eval_val1" / "summary.json").read_text())
    assert summary["n_cases"] == 1 and summary["method"] == "cml" and set(summary["per_class"]) == {"RV", "Myo", "LV"}
