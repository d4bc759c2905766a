"""CML on LA (two 3D V-Nets): Cross-View Mutual Learning, Wu et al., ACM MM 2024 (docs/CML.md).

    python code/train_la_cml.py --labelnum 8             # Table 1, 8 labeled cases: 2000 + 15000 iterations
    python code/test_la.py --run model/LA_CML_8_labeled  # the mean of the two subnets' softmax, final checkpoint
    python code/train_la_cml.py --dataset brats2019 --labelnum 25 --pre_iterations 10000 --max_iterations 40000

`train_iteration` is the whole method, top to bottom: pre-training on labeled data (Eq. 11) for the first
--pre_iterations iterations, then self-training (Eq. 4 with Eqs. 7 and 10). `main` is the plumbing
(utils/loop.py: run folder, resume, DDP, checkpoints, logs).
"""
import torch

from networks import build_cml
from utils.cml import cml_lr, conflict_loss, cuboid_mask, pseudo_labels
from utils.flags import check_cml_args, cml_parser
from utils.loop import print_settings, start_run, train_loop
from utils.run_folder import run_training
from utils.losses import supervised_loss
from utils.training import autocast, iteration_seed, memory_format


def parse_args(argv=None):
    p = cml_parser("la", __doc__)
    args = p.parse_args(argv)
    check_cml_args(p, args)
    return args


def train_iteration(model, optimizer, batch, it, args, device):
    """Iteration ``it``: pre-training (``it < --pre_iterations``) or self-training, backward, optimizer step.

    CutMix pairs the first half of the labeled samples with the second half, likewise the unlabeled ones (the
    weak views). Every random draw in here (the two cuboids, dropout masks) comes from the torch RNG seeded from
    (seed, it, rank). Returns the detached loss terms and what tensorboard shows: the mixed labeled images, their
    labels and the two subnets' mean prediction."""
    torch.manual_seed(iteration_seed(args.seed, it))
    for group in optimizer.param_groups:
        group["lr"] = cml_lr(args, it)
    fmt = memory_format(device, batch["x_l"].dim() - 2, args.memory_format)
    x_l = batch["x_l"].to(device, non_blocking=True, memory_format=fmt)
    y_l = batch["y_l"].to(device, non_blocking=True)
    self_training = it >= args.pre_iterations
    # the zero region of M, one cuboid for the labeled pairs and one for the unlabeled pairs: inside it a mixed
    # image shows the second image of its pair, outside the first
    cut_l = cuboid_mask(x_l.shape[2:], args.mask_ratio, device)
    cut_u = cuboid_mask(x_l.shape[2:], args.mask_ratio, device) if self_training else None

    with autocast(device, args.amp):
        # labeled pairs (u, v): X_mix^l and Y_mix^l (Eqs. 5, 6), through both subnets
        x_u_l, x_v_l = x_l.chunk(2)
        y_u_l, y_v_l = y_l.chunk(2)
        x_mix_l = torch.where(cut_l, x_v_l, x_u_l)
        y_mix_l = torch.where(cut_l, y_v_l, y_u_l)
        p0_l, p1_l, f0_l, f1_l = model(x_mix_l, per_subnet=True)
        # L_sup^l (Eq. 7: Eq. 2 for each subnet) and L_dis^l (Eq. 1 for each subnet against the other's copy)
        loss_sup_l = supervised_loss(p0_l, y_mix_l) + supervised_loss(p1_l, y_mix_l)
        loss_dis_l = conflict_loss(f0_l, f1_l) + conflict_loss(f1_l, f0_l)

        if not self_training:
            loss = loss_sup_l + args.dis_weight * loss_dis_l  # Eq. 11
            logs = {"loss_sup_l": loss_sup_l, "loss_dis_l": loss_dis_l}
        else:
            x_u = batch["x_w"].to(device, non_blocking=True, memory_format=fmt)
            with torch.no_grad():
                # each subnet's pseudo-labels of the unmixed unlabeled images (the network stays in training mode)
                q0, q1, _, _ = model(x_u, per_subnet=True)
                pl0, pl1 = pseudo_labels(q0), pseudo_labels(q1)
                # heterogeneous targets (Eq. 9): subnet i learns, outside the cuboid (image p), the other subnet's
                # pseudo-label; inside (image q), its own
                pl0_p, pl0_q = pl0.chunk(2)
                pl1_p, pl1_q = pl1.chunk(2)
                y_mix_u0 = torch.where(cut_u, pl0_q, pl1_p)
                y_mix_u1 = torch.where(cut_u, pl1_q, pl0_p)
            x_p, x_q = x_u.chunk(2)
            x_mix_u = torch.where(cut_u, x_q, x_p)  # Eq. 8
            p0_u, p1_u, f0_u, f1_u = model(x_mix_u, per_subnet=True)
            loss_sup_u = supervised_loss(p0_u, y_mix_u0) + supervised_loss(p1_u, y_mix_u1)  # Eq. 10
            loss_dis_u = conflict_loss(f0_u, f1_u) + conflict_loss(f1_u, f0_u)
            loss = loss_sup_l + args.u_weight * loss_sup_u + args.dis_weight * (loss_dis_l + loss_dis_u)  # Eq. 4
            logs = {"loss_sup_l": loss_sup_l, "loss_sup_u": loss_sup_u, "loss_dis_l": loss_dis_l,
                    "loss_dis_u": loss_dis_u, "pl_agree": (pl0 == pl1).float().mean()}

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    pred = (p0_l.detach().float().softmax(1) + p1_l.detach().float().softmax(1)) / 2
    return ({"loss": loss.detach(), **{k: v.detach() for k, v in logs.items()}},
            {"x_l": x_mix_l.detach(), "y_l": y_mix_l, "pred": pred})


def main(argv=None):
    args = parse_args(argv)
    if args.print_run_dir or args.print_config:
        return print_settings(args)
    return run_training(train, args)


def train(args):
    """Set-up, data, run folder (held by rank 0 from start_run on), the two subnets and the training loop."""
    process, run_dir, root, names = start_run(args)
    if args.labelnum >= len(names):
        raise SystemExit(f"error: --labelnum {args.labelnum}: {args.train_list} has {len(names)} cases, CML needs "
                         f"unlabeled ones too")
    model = build_cml("la", args.n_classes)
    n0, n1 = (sum(p.numel() for p in net.parameters()) for net in model.subnets)

    def hook(done, model, writer, log):
        if done == args.pre_iterations:
            log.info(f"it {done}: pre-training done, self-training from here to {args.max_iterations}")

    return train_loop(args, "la", train_iteration, process, run_dir, root, names, args.labelnum,
                      dict(n_labeled=args.labelnum, n_unlabeled=len(names) - args.labelnum),
                      f"{args.labelnum} labeled / {len(names) - args.labelnum} unlabeled cases",
                      (args.labeled_bs, args.batch_size - args.labeled_bs, 0), model=model,
                      notes=[f"subnet 0: V-Net, transposed-convolution decoder, {n0:,} parameters; subnet 1: V-Net, "
                             f"trilinear + convolution decoder, {n1:,} parameters; pre-training "
                             f"{args.pre_iterations} iterations, then self-training"], hook=hook)


if __name__ == "__main__":
    main()
