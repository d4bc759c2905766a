"""The loss assembly of train_la.train_iteration against an independent NumPy computation.

A stub network returns fixed logits for each of the two passes, so every stream (p_l, p_wn, p_ww, p_ws,
p_s1, p_s2, p_sw, p_ss) is known, and the losses the script computes can be recomputed by hand."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_la
from utils.cutmix import partner_index, sample_boxes
from utils.losses import EPS, dice_loss, masked_ce_loss, supervised_loss


def test_dice_loss_by_hand():
    # foreground probabilities 0.9 and 0.2 (logits log(p/(1-p))), labels 1 and 0
    p = torch.tensor([0.9, 0.2])
    logits = torch.stack([torch.zeros(2), torch.log(p / (1 - p))])[None]   # (1, 2, 2)
    target = torch.tensor([[1, 0]])
    expected = 1 - (2 * 0.9 + EPS) / (0.81 + 0.04 + 1 + EPS)
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # masking the second voxel removes it from numerator and denominator
    expected_m = 1 - (2 * 0.9 + EPS) / (0.81 + 1 + EPS)
    assert dice_loss(logits, target, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(expected_m, rel=1e-5)


def test_multiclass_dice_averages_all_classes():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 5, 5), torch.randint(0, 4, (2, 5, 5))
    probs = logits.softmax(1)
    per_class = []
    for c in range(4):
        pc, tc = probs[:, c], (target == c).float()
        per_class.append(1 - (2 * (pc * tc).sum() + EPS) / ((pc ** 2).sum() + (tc ** 2).sum() + EPS))
    assert dice_loss(logits, target).item() == pytest.approx(torch.stack(per_class).mean().item(), rel=1e-6)


def test_supervised_loss_is_half_ce_plus_half_dice():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 2, 4, 4, 3), torch.randint(0, 2, (2, 4, 4, 3))
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert supervised_loss(logits, target).item() == pytest.approx(0.5 * (ce + dice_loss(logits, target)).item())


def test_masked_ce_counts_masked_voxels_as_zero():
    logits, target = torch.zeros(1, 2, 4), torch.tensor([[0, 1, 0, 1]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert masked_ce_loss(logits, target, mask).item() == pytest.approx(math.log(2) * 2 / 4)


# ---------------------------------------------------------------- Algorithm 1 assembly
def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_dice(logits, target, mask):
    """Foreground soft Dice (2 classes), batch-level sums, masked voxels excluded."""
    p = np_softmax(logits)[:, 1] * mask
    t = (target == 1).astype(np.float64) * mask
    return 1 - (2 * (p * t).sum() + EPS) / ((p * p).sum() + (t * t).sum() + EPS)


def np_ce(logits, target):
    logp = np.log(np_softmax(logits))
    return -np.take_along_axis(logp, target[:, None], 1).mean()


def np_masked_ce(logits, target, mask):
    """Cross-entropy against a hard label, masked voxels counted as zero in the mean over all voxels."""
    logp = np.log(np_softmax(logits))
    return -(np.take_along_axis(logp, target[:, None], 1)[:, 0] * mask).mean()


class StubNet(torch.nn.Module):
    """Returns fixed logits for pass A (first call) and pass B (second call), times a trainable 1."""

    def __init__(self, out_a, out_b=None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.outs = [out_a, out_b]
        self.calls = []

    def forward(self, x, n_pert=0):
        self.calls.append((tuple(x.shape), n_pert))
        return self.outs[len(self.calls) - 1] * self.scale


def make_args(**kw):
    base = dict(seed=1337, base_lr=1e-3, max_iterations=10, poly_power=0.9, unsup_loss="dice", method="crossmatch",
                amp="none", cutmix_p=0.0, conf_thresh=0.7, eta=0.3, no_ip=False, no_tkd=False, no_dkd=False)
    base.update(kw)
    return SimpleNamespace(**base)


def run_stub(args, L=2, U=2, spatial=(3, 3, 2), seed=0):
    rng = np.random.default_rng(seed)
    out_a = rng.normal(scale=2.0, size=(L + 3 * U, 2, *spatial)).astype(np.float32)
    out_b = rng.normal(scale=2.0, size=(4 * U, 2, *spatial)).astype(np.float32)
    y_l = rng.integers(0, 2, size=(L, *spatial))
    batch = {"x_l": torch.zeros(L, 1, *spatial), "y_l": torch.from_numpy(y_l),
             "x_w": torch.zeros(U, 1, *spatial), "x_s1": torch.zeros(U, 1, *spatial),
             "x_s2": torch.zeros(U, 1, *spatial)}
    net = StubNet(torch.from_numpy(out_a), torch.from_numpy(out_b))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    logs, p_l = train_la.train_iteration(net, opt, batch, 0, args, torch.device("cpu"))
    assert torch.equal(p_l, torch.from_numpy(out_a[:L])) and not p_l.requires_grad   # the labeled logits
    assert all(not v.requires_grad for v in logs.values())
    return net, logs, out_a.astype(np.float64), out_b.astype(np.float64), y_l


def expected_losses(out_a, out_b, y_l, L, U, tau, eta, ip=True, tkd=True, dkd=True, crit=np_dice):
    p_l, p_wn, p_ww, p_ws = out_a[:L], out_a[L:L + U], out_a[L + U:L + 2 * U], out_a[L + 2 * U:]
    p_s1, p_s2, p_sw, p_ss = np.split(out_b, 4)
    def teacher(p):
        prob = np_softmax(p)
        return prob.argmax(1), (prob.max(1) >= tau).astype(np.float64)
    y_wn, m_wn = teacher(p_wn)
    y_ww, m_ww = teacher(p_ww)
    y_ws, m_ws = teacher(p_ws)
    l_ip = 0.5 * (crit(p_s1, y_wn, m_wn) + crit(p_s2, y_wn, m_wn)) if ip else 0.0
    l_tkd = crit(np.concatenate([p_ww, p_ws, p_sw, p_ss]), np.concatenate([y_wn] * 4),
                 np.concatenate([m_wn] * 4)) if tkd else 0.0
    l_dkd = 0.5 * (crit(p_sw, y_ww, m_ww) + crit(p_ss, y_ws, m_ws)) if dkd else 0.0
    l_u = 0.5 * (l_ip + (1 - eta) * l_tkd + eta * l_dkd)
    l_sup = 0.5 * (np_ce(p_l, y_l) + np_dice(p_l, y_l, np.ones(y_l.shape)))
    return dict(loss_ip=l_ip, loss_tkd=l_tkd, loss_dkd=l_dkd, loss_u=l_u, loss_sup=l_sup,
                loss=0.5 * (l_sup + l_u), conf_frac=m_wn.mean())


def test_algorithm1_loss_assembly_matches_numpy():
    args = make_args()
    net, logs, out_a, out_b, y_l = run_stub(args)
    # two passes: cat(x_l, x_w) with the weak part perturbed, then cat(x_s1, x_s2) with s2 perturbed
    assert net.calls == [((4, 1, 3, 3, 2), 2), ((4, 1, 3, 3, 2), 2)]
    exp = expected_losses(out_a, out_b, y_l, 2, 2, args.conf_thresh, args.eta)
    assert 0 < exp["conf_frac"] < 1        # the confidence mask really removes some voxels here
    for k, v in exp.items():
        assert logs[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("off", ["no_ip", "no_tkd", "no_dkd"])
def test_switching_off_a_term(off):
    args = make_args(**{off: True}, eta=0.4)
    _, logs, out_a, out_b, y_l = run_stub(args, seed=3)
    exp = expected_losses(out_a, out_b, y_l, 2, 2, args.conf_thresh, args.eta,
                          ip=off != "no_ip", tkd=off != "no_tkd", dkd=off != "no_dkd")
    assert logs["loss_" + off[3:]].item() == 0.0
    for k in ("loss_u", "loss"):
        assert logs[k].item() == pytest.approx(exp[k], rel=1e-5), k


def test_cross_entropy_as_the_unlabeled_criterion():
    """--unsup_loss ce: the same assembly with the masked cross-entropy in place of the masked Dice."""
    args = make_args(unsup_loss="ce")
    _, logs, out_a, out_b, y_l = run_stub(args, seed=4)
    exp = expected_losses(out_a, out_b, y_l, 2, 2, args.conf_thresh, args.eta, crit=np_masked_ce)
    assert 0 < exp["conf_frac"] < 1
    for k, v in exp.items():
        assert logs[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert logs["loss_u"].item() != pytest.approx(expected_losses(out_a, out_b, y_l, 2, 2, args.conf_thresh,
                                                                  args.eta)["loss_u"], rel=1e-3)


def test_supervised_method_and_the_optimizer_step():
    """--method supervised: one plain forward of the labeled batch, loss = L_sup; the learning rate of the step
    is poly_lr(it) and the step moves the weights by -lr * grad (plain SGD)."""
    rng = np.random.default_rng(9)
    L, spatial, it = 3, (4, 3, 2), 4
    out = rng.normal(scale=2.0, size=(L, 2, *spatial)).astype(np.float32)
    y_l = rng.integers(0, 2, size=(L, *spatial))
    net = StubNet(torch.from_numpy(out))
    opt = torch.optim.SGD(net.parameters(), lr=123.0)
    args = make_args(method="supervised", base_lr=0.1)
    batch = {"x_l": torch.zeros(L, 1, *spatial), "y_l": torch.from_numpy(y_l)}
    logs, p_l = train_la.train_iteration(net, opt, batch, it, args, torch.device("cpu"))
    assert net.calls == [((L, 1, *spatial), 0)]
    assert logs.keys() == {"loss", "loss_sup"} and torch.equal(p_l, torch.from_numpy(out))
    exp = 0.5 * (np_ce(out.astype(np.float64), y_l) + np_dice(out.astype(np.float64), y_l, np.ones(y_l.shape)))
    assert logs["loss"].item() == logs["loss_sup"].item() == pytest.approx(exp, rel=1e-5)
    lr = args.base_lr * (1 - it / args.max_iterations) ** args.poly_power
    assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
    # d loss / d scale, the stub's one weight, by central differences of the NumPy loss
    h = 1e-4
    o = out.astype(np.float64)
    num = lambda c: 0.5 * (np_ce(c * o, y_l) + np_dice(c * o, y_l, np.ones(y_l.shape)))
    grad = (num(1 + h) - num(1 - h)) / (2 * h)
    assert abs(grad) > 1e-3
    assert (1 - net.scale.item()) / lr == pytest.approx(grad, rel=1e-4)


def test_threshold_one_masks_every_unlabeled_voxel():
    args = make_args(conf_thresh=1.0)
    _, logs, *_ = run_stub(args, seed=5)
    assert logs["conf_frac"].item() == 0.0
    # everything masked: each masked Dice is 1 - eps/eps = 0
    assert logs["loss_u"].item() == pytest.approx(0.0, abs=1e-6)


def test_cutmix_boxes_and_partner():
    torch.manual_seed(0)
    assert not sample_boxes(4, (8, 8, 8), p=0.0).any()
    boxes = sample_boxes(64, (20, 20, 16), p=1.0)
    fracs = boxes.flatten(1).float().mean(1)
    assert (fracs > 0).all() and (fracs < 0.6).all()
    boxes2d = sample_boxes(64, (32, 32), p=1.0)
    assert boxes2d.shape == (64, 32, 32) and boxes2d.flatten(1).any(1).all()
    for n in (2, 3, 5):
        perm = partner_index(n)
        assert sorted(perm.tolist()) == list(range(n)) and (perm != torch.arange(n)).all()
    assert partner_index(1) is None


def test_cutmix_mixes_image_and_every_teacher_target_by_the_same_box():
    """With CutMix on, the losses equal the NumPy ones computed with the boxes the iteration drew."""
    args = make_args(cutmix_p=1.0)
    L, U, spatial = 2, 3, (6, 6, 4)
    net, logs, out_a, out_b, y_l = run_stub(args, L=L, U=U, spatial=spatial, seed=7)
    # redraw the iteration's boxes: same seed, same order of draws as train_iteration
    from utils.training import iteration_seed
    torch.manual_seed(iteration_seed(args.seed, 0))
    partner = partner_index(U).numpy()
    box1 = sample_boxes(U, spatial, 1.0).numpy()
    box2 = sample_boxes(U, spatial, 1.0).numpy()
    assert box1.any() and box2.any()
    mix = lambda t, b: np.where(b, t[partner], t)
    p_wn, p_ww, p_ws = out_a[L:L + U], out_a[L + U:L + 2 * U], out_a[L + 2 * U:]
    p_s1, p_s2, p_sw, p_ss = np.split(out_b, 4)
    def teacher(p):
        prob = np_softmax(p)
        return prob.argmax(1), (prob.max(1) >= args.conf_thresh).astype(np.float64)
    (y_wn, m_wn), (y_ww, m_ww), (y_ws, m_ws) = teacher(p_wn), teacher(p_ww), teacher(p_ws)
    l_ip = 0.5 * (np_dice(p_s1, mix(y_wn, box1), mix(m_wn, box1)) + np_dice(p_s2, mix(y_wn, box2), mix(m_wn, box2)))
    l_tkd = np_dice(np.concatenate([p_ww, p_ws, p_sw, p_ss]),
                    np.concatenate([y_wn, y_wn, mix(y_wn, box2), mix(y_wn, box2)]),
                    np.concatenate([m_wn, m_wn, mix(m_wn, box2), mix(m_wn, box2)]))
    l_dkd = 0.5 * (np_dice(p_sw, mix(y_ww, box2), mix(m_ww, box2)) + np_dice(p_ss, mix(y_ws, box2), mix(m_ws, box2)))
    assert logs["loss_ip"].item() == pytest.approx(l_ip, rel=1e-5)
    assert logs["loss_tkd"].item() == pytest.approx(l_tkd, rel=1e-5)
    assert logs["loss_dkd"].item() == pytest.approx(l_dkd, rel=1e-5)


def test_la_and_acdc_scripts_compute_the_same_algorithm():
    """train_acdc.train_iteration is written out like train_la's: both give the same losses on a 2D,
    4-class stub batch (with CutMix on), so the two copies cannot drift apart unnoticed."""
    import train_acdc
    rng = np.random.default_rng(11)
    L, U, spatial = 2, 3, (8, 8)
    out_a = torch.from_numpy(rng.normal(scale=2.0, size=(L + 3 * U, 4, *spatial)).astype(np.float32))
    out_b = torch.from_numpy(rng.normal(scale=2.0, size=(4 * U, 4, *spatial)).astype(np.float32))
    batch = {"x_l": torch.zeros(L, 1, *spatial), "y_l": torch.from_numpy(rng.integers(0, 4, size=(L, *spatial))),
             "x_w": torch.zeros(U, 1, *spatial), "x_s1": torch.zeros(U, 1, *spatial),
             "x_s2": torch.zeros(U, 1, *spatial)}
    results = []
    for module in (train_la, train_acdc):
        net = StubNet(out_a.clone(), out_b.clone())
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        logs, _ = module.train_iteration(net, opt, batch, 4, make_args(cutmix_p=1.0, conf_thresh=0.5),
                                         torch.device("cpu"))
        results.append({k: v.item() for k, v in logs.items()})
    assert results[0] == results[1]
    assert results[0]["loss_dkd"] > 0
