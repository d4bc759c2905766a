"""The loss assembly of train_la.train_iteration against an independent NumPy computation, for both presets.

A stub network returns fixed logits for each of its calls (the CutMix partners' teacher forward, pass A, pass B),
so every stream (p_l, p_wn, p_ww, p_ws, p_s1, p_s2, p_sw, p_ss and the partners' p_wn, p_ww, p_ws) is known,
and the losses the script computes can be recomputed by hand: Algorithm 1's total for the paper preset and the
release's total, each written in its own form."""
import math

import numpy as np
import pytest
import torch

import train_la
from utils.training import conf_threshold, iteration_seed, poly_lr
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
    """Returns fixed logits for each call in turn (times a trainable 1) and records every call's input shape,
    n_pert and training mode."""

    def __init__(self, *outs):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.outs = list(outs)
        self.calls = []

    def forward(self, x, n_pert=0):
        self.calls.append((tuple(x.shape), n_pert, self.training))
        return self.outs[len(self.calls) - 1] * self.scale


def make_args(preset="paper", *flags):
    """The script's own flags (the preset resolved by its parser), tau fixed at 0.7 unless the flags say more."""
    return train_la.parse_args(["--preset", preset, "--conf_thresh", "0.7", "--conf_ramp", "0", "--max_iterations",
                                "10", "--poly_horizon", "10", "--cutmix_p", "0", "--device", "cpu", *map(str, flags)])


def run_stub(args, L=2, U=2, spatial=(3, 3, 2), seed=0, it=0, n_classes=2, module=train_la):
    """One train_iteration on a stub network; returns (net, logs, the logits of each call as float64, y_l)."""
    rng = np.random.default_rng(seed)
    second = args.method == "crossmatch" and args.cutmix_partner == "second_batch" and args.cutmix_p > 0
    sizes = ([3 * U] if second else []) + [L + 3 * U, 4 * U]
    outs = [rng.normal(scale=2.0, size=(n, n_classes, *spatial)).astype(np.float32) for n in sizes]
    y_l = rng.integers(0, n_classes, size=(L, *spatial))
    batch = {"x_l": torch.zeros(L, 1, *spatial), "y_l": torch.from_numpy(y_l)}
    for k in ("x_w", "x_s1", "x_s2", "x_w_p", "x_s1_p", "x_s2_p"):
        batch[k] = torch.zeros(U, 1, *spatial)
    net = StubNet(*map(torch.from_numpy, outs))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    logs, shown = module.train_iteration(net, opt, batch, it, args, torch.device("cpu"))
    p_l = shown["pred"]
    assert torch.equal(p_l, torch.from_numpy(outs[-2][:L])) and not p_l.requires_grad  # the labeled logits
    assert torch.equal(shown["x_l"], batch["x_l"]) and torch.equal(shown["y_l"], batch["y_l"])
    assert all(not v.requires_grad for v in logs.values())
    return net, logs, [o.astype(np.float64) for o in outs], y_l


def draw_boxes(args, U, spatial, it=0):
    """The iteration's partner and boxes, redrawn: same seed, same order of draws as train_iteration."""
    torch.manual_seed(iteration_seed(args.seed, it))
    partner = None
    if args.cutmix_partner == "batch":
        partner = partner_index(U).numpy() if args.cutmix_p > 0 else np.arange(U)
    box1 = sample_boxes(U, spatial, args.cutmix_p).numpy()
    box2 = sample_boxes(U, spatial, args.cutmix_p).numpy()
    return partner, box1, box2


def reference(args, outs, y_l, L, U, box1, box2, partner, tau, crit=np_dice):
    """Every loss term of one iteration with NumPy. ``partner`` None: the partners' teachers come from the
    first call's logits (a second batch); else from this batch's, indexed by ``partner``."""
    *out_p, out_a, out_b = outs
    if partner is None and not out_p:  # no CutMix: no partner forward, every box empty
        partner = np.arange(U)
    p_l, p_wn, p_ww, p_ws = np.split(out_a, [L, L + U, L + 2 * U])
    p_s1, p_s2, p_sw, p_ss = np.split(out_b, 4)

    def teacher(p):
        prob = np_softmax(p)
        return prob.argmax(1), (prob.max(1) >= tau).astype(np.float64)
    (y_wn, m_wn), (y_ww, m_ww), (y_ws, m_ws) = teacher(p_wn), teacher(p_ww), teacher(p_ws)
    if partner is None:
        (y_wn_p, m_wn_p), (y_ww_p, m_ww_p), (y_ws_p, m_ws_p) = map(teacher, np.split(out_p[0], 3))
    else:
        y_wn_p, m_wn_p, y_ww_p, m_ww_p = y_wn[partner], m_wn[partner], y_ww[partner], m_ww[partner]
        y_ws_p, m_ws_p = y_ws[partner], m_ws[partner]
    y1, m1 = np.where(box1, y_wn_p, y_wn), np.where(box1, m_wn_p, m_wn)
    y2, m2 = np.where(box2, y_wn_p, y_wn), np.where(box2, m_wn_p, m_wn)
    yw2, mw2 = np.where(box2, y_ww_p, y_ww), np.where(box2, m_ww_p, m_ww)
    ys2, ms2 = np.where(box2, y_ws_p, y_ws), np.where(box2, m_ws_p, m_ws)
    l_sup = 0.5 * (np_ce(p_l, y_l) + np_dice(p_l, y_l, np.ones(y_l.shape)))
    students = [(p_ww, y_wn, m_wn), (p_ws, y_wn, m_wn), (p_sw, y2, m2), (p_ss, y2, m2)]
    l_dkd = 0.5 * (crit(p_sw, yw2, mw2) + crit(p_ss, ys2, ms2))
    if args.ip_loss == "stacked":  # Algorithm 1, as printed
        l_ip = crit(np.concatenate([p_s1, p_s2]), np.concatenate([y1, y2]), np.concatenate([m1, m2]))
        l_tkd = crit(*(np.concatenate(z) for z in zip(*students)))
        l_u = (l_ip + (1 - args.eta) * l_tkd + args.eta * l_dkd) / 2.0
        total = (l_sup + l_u) / 2.0
    else:  # the release: loss = (L_x + 0.25 L_s1 + 0.25 L_s2 + w L_kd) / 2, L_kd = (1-eta) mean4 + eta mean2
        l_s1, l_s2 = crit(p_s1, y1, m1), crit(p_s2, y2, m2)
        l_tkd = sum(crit(*z) for z in students) / 4.0
        l_kd = (1 - args.eta) * l_tkd + args.eta * l_dkd
        l_ip, l_u = (l_s1 + l_s2) / 2.0, 0.25 * l_s1 + 0.25 * l_s2 + args.kd_weight * l_kd
        total = (l_sup + 0.25 * l_s1 + 0.25 * l_s2 + args.kd_weight * l_kd) / 2.0
    return dict(loss_ip=l_ip, loss_tkd=l_tkd, loss_dkd=l_dkd, loss_u=l_u, loss_sup=l_sup, loss=total,
                conf_frac=m_wn.mean())


def check(logs, exp):
    for k, v in exp.items():
        assert logs[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("preset", ["paper", "release"])
@pytest.mark.parametrize("partner", ["second_batch", "batch"])
def test_loss_assembly_matches_numpy(preset, partner):
    """Both presets, both CutMix partners, CutMix on: every loss term equals the NumPy computation."""
    args = make_args(preset, "--cutmix_p", 1.0, "--cutmix_partner", partner)
    L, U, spatial = 2, 3, (6, 6, 4)
    net, logs, outs, y_l = run_stub(args, L, U, spatial, seed=7)
    p, box1, box2 = draw_boxes(args, U, spatial)
    assert box1.any() and box2.any() and not box1.all()
    passes = [((L + U, 1, *spatial), U, True), ((2 * U, 1, *spatial), U, True)]
    # the second batch: first a no-grad eval-mode forward of the partners' weak views, then training mode again
    assert net.calls == ([((U, 1, *spatial), U, False)] if partner == "second_batch" else []) + passes
    assert net.training
    exp = reference(args, outs, y_l, L, U, box1, box2, p, tau=0.7)
    assert 0 < exp["conf_frac"] < 1  # the confidence mask really removes some voxels here
    check(logs, exp)


def test_release_and_paper_totals_differ_on_the_same_logits():
    """The same logits and boxes: the release's LA total (L_s1, L_s2 at 0.25, L_kd at 1) is not Algorithm 1's."""
    totals = {}
    for preset in ("paper", "release"):
        args = make_args(preset)
        assert args.kd_weight == {"paper": 0.5, "release": 1.0}[preset]
        totals[preset] = run_stub(args, seed=2)[1]["loss"].item()
    assert abs(totals["paper"] - totals["release"]) > 1e-3


@pytest.mark.parametrize("off", ["no_ip", "no_tkd", "no_dkd"])
def test_switching_off_a_term(off):
    args = make_args("paper", f"--{off}", "--eta", 0.4)
    net, logs, outs, y_l = run_stub(args, seed=3)
    assert len(net.calls) == 2  # CutMix off: no partner forward
    full = reference(args, outs, y_l, 2, 2, *draw_boxes(args, 2, (3, 3, 2))[1:], None, tau=0.7)
    assert logs["loss_" + off[3:]].item() == 0.0
    term = {"no_ip": 0.5 * full["loss_ip"], "no_tkd": 0.5 * (1 - args.eta) * full["loss_tkd"],
            "no_dkd": 0.5 * args.eta * full["loss_dkd"]}[off]
    assert logs["loss_u"].item() == pytest.approx(full["loss_u"] - term, rel=1e-5)


def test_cross_entropy_as_the_unlabeled_criterion():
    """--unsup_loss ce: the same assembly with the masked cross-entropy in place of the masked Dice."""
    args = make_args("paper", "--unsup_loss", "ce")
    _, logs, outs, y_l = run_stub(args, seed=4)
    box1, box2 = draw_boxes(args, 2, (3, 3, 2))[1:]
    exp = reference(args, outs, y_l, 2, 2, box1, box2, None, 0.7, crit=np_masked_ce)
    assert 0 < exp["conf_frac"] < 1
    check(logs, exp)
    assert logs["loss_u"].item() != pytest.approx(reference(args, outs, y_l, 2, 2, box1, box2, None, 0.7)["loss_u"],
                                                  rel=1e-3)


def test_supervised_method_and_the_optimizer_step():
    """--method supervised: one plain forward of the labeled batch, loss = L_sup; the learning rate of the step
    is poly_lr(it) and the step moves the weights by -lr * grad (plain SGD)."""
    rng = np.random.default_rng(9)
    L, spatial, it = 3, (4, 3, 2), 4
    out = rng.normal(scale=2.0, size=(L, 2, *spatial)).astype(np.float32)
    y_l = rng.integers(0, 2, size=(L, *spatial))
    net = StubNet(torch.from_numpy(out))
    opt = torch.optim.SGD(net.parameters(), lr=123.0)
    args = make_args("paper", "--method", "supervised", "--base_lr", 0.1)
    batch = {"x_l": torch.zeros(L, 1, *spatial), "y_l": torch.from_numpy(y_l)}
    logs, shown = train_la.train_iteration(net, opt, batch, it, args, torch.device("cpu"))
    p_l = shown["pred"]
    assert net.calls == [((L, 1, *spatial), 0, True)]
    assert logs.keys() == {"loss", "loss_sup"} and torch.equal(p_l, torch.from_numpy(out))
    exp = 0.5 * (np_ce(out.astype(np.float64), y_l) + np_dice(out.astype(np.float64), y_l, np.ones(y_l.shape)))
    assert logs["loss"].item() == logs["loss_sup"].item() == pytest.approx(exp, rel=1e-5)
    lr = args.base_lr * (1 - it / args.max_iterations) ** args.poly_power
    assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
    # d loss / d scale, the stub's one weight, by central differences of the NumPy loss
    h = 1e-4
    o = out.astype(np.float64)
    num = lambda c: 0.5 * (np_ce(c * o, y_l) + np_dice(c * o, y_l, np.ones(y_l.shape)))  # noqa: E731
    grad = (num(1 + h) - num(1 - h)) / (2 * h)
    assert abs(grad) > 1e-3
    assert (1 - net.scale.item()) / lr == pytest.approx(grad, rel=1e-4)


def test_threshold_one_masks_every_unlabeled_voxel():
    args = make_args("paper", "--conf_thresh", 1.0)
    _, logs, *_ = run_stub(args, seed=5)
    assert logs["conf_frac"].item() == 0.0
    # everything masked: each masked Dice is 1 - eps/eps = 0
    assert logs["loss_u"].item() == pytest.approx(0.0, abs=1e-6)


def test_release_tau_ramp_and_poly_horizon():
    """The release's LA schedules: tau = (0.75 + 0.25 sigmoid_rampup(it, 17000)) ln 2 and poly over 17000."""
    args = train_la.parse_args(["--preset", "release"])
    assert (args.conf_thresh, args.conf_ramp, args.max_iterations, args.poly_horizon) == (0.75, 17000, 14000, 17000)
    ramp = lambda it: math.exp(-5 * (1 - min(it, 17000) / 17000) ** 2)  # noqa: E731
    for it in (0, 1, 7000, 14000):
        assert conf_threshold(args, it) == pytest.approx((0.75 + 0.25 * ramp(it)) * math.log(2), rel=1e-12)
    assert conf_threshold(args, 1) == pytest.approx(0.521, abs=5e-4)
    assert conf_threshold(args, 14000) == pytest.approx(0.668, abs=5e-4)
    assert poly_lr(args, 13999) == pytest.approx(1e-3 * (1 - 13999 / 17000) ** 0.9)
    paper = train_la.parse_args([])
    assert conf_threshold(paper, 5000) == 0.85 and poly_lr(paper, 8999) == pytest.approx(1e-3 * (1 / 9000) ** 0.9)
    # the iteration's tau is what train_iteration uses and logs
    args = make_args("release", "--conf_thresh", 0.75, "--conf_ramp", 17000)
    _, logs, outs, y_l = run_stub(args, it=3, seed=6)
    tau = (0.75 + 0.25 * ramp(3)) * math.log(2)
    assert logs["tau"].item() == pytest.approx(tau, rel=1e-6)
    box1, box2 = draw_boxes(args, 2, (3, 3, 2), it=3)[1:]
    check(logs, reference(args, outs, y_l, 2, 2, box1, box2, None, tau))


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


def test_second_batch_partner_pastes_its_strong_views_into_the_inputs():
    """The strong views the network sees are this batch's with the partners' strong views inside the boxes."""
    args = make_args("paper", "--cutmix_p", 1.0)
    U, spatial = 2, (6, 6, 4)
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randn(U, 1, *spatial, generator=g) for k in ("x_l", "x_w", "x_s1", "x_s2", "x_w_p", "x_s1_p",
                                                                    "x_s2_p")}
    batch["y_l"] = torch.zeros(U, *spatial, dtype=torch.int64)
    seen = []

    class Recorder(StubNet):
        def forward(self, x, n_pert=0):
            seen.append(x.clone())
            return super().forward(x, n_pert)
    rng = np.random.default_rng(0)
    outs = [torch.from_numpy(rng.normal(size=(n, 2, *spatial)).astype(np.float32)) for n in (3 * U, 4 * U, 4 * U)]
    net = Recorder(*outs)
    train_la.train_iteration(net, torch.optim.SGD(net.parameters(), lr=0.0), batch, 0, args, torch.device("cpu"))
    box1, box2 = (torch.from_numpy(b)[:, None] for b in draw_boxes(args, U, spatial)[1:])
    assert torch.equal(seen[0], batch["x_w_p"])
    assert torch.equal(seen[1], torch.cat([batch["x_l"], batch["x_w"]]))
    assert torch.equal(seen[2], torch.cat([torch.where(box1, batch["x_s1_p"], batch["x_s1"]),
                                           torch.where(box2, batch["x_s2_p"], batch["x_s2"])]))


@pytest.mark.parametrize("preset", ["paper", "release"])
def test_la_and_acdc_scripts_compute_the_same_algorithm(preset):
    """train_acdc.train_iteration is written out like train_la's: both give the same losses on a 2D,
    4-class stub batch (CutMix from a second batch on), so the two copies cannot drift apart unnoticed."""
    import train_acdc
    results = []
    for module in (train_la, train_acdc):
        args = module.parse_args(["--preset", preset, "--cutmix_p", "1", "--conf_thresh", "0.5", "--conf_ramp", "0",
                                  "--kd_weight", "0.7", "--max_iterations", "10", "--poly_horizon", "10"])
        _, logs, *_ = run_stub(args, 2, 3, (8, 8), seed=11, it=4, n_classes=4, module=module)
        results.append({k: v.item() for k, v in logs.items()})
    assert results[0] == results[1]
    assert results[0]["loss_dkd"] > 0
