"""CrossMatch on LA (3D V-Net): Algorithm 1 of Zhao et al., IEEE JBHI 2024 (docs/METHOD.md).

    python code/train_la.py --labelnum 8                          # Table I, 8 labeled cases, 9000 iterations
    python code/train_la.py --labelnum 8 --method supervised      # the V-Net row: labeled data only
    python code/train_la.py --dataset brats2019 --labelnum 25     # another 3D data set (docs/DATASETS.md)

`train_iteration` is the whole method, top to bottom: one iteration from a host batch to the optimizer step.
`main` is the plumbing: flags, the training list, then utils/loop.py (run folder, resume, data, checkpoints, logs).
"""
import torch

from utils.cutmix import partner_index, sample_boxes
from utils.flags import check_train_args, train_parser
from utils.loop import print_settings, start_run, train_loop
from utils.losses import UNSUP_CRITERIA, supervised_loss
from utils.run_folder import run_training
from utils.training import autocast, conf_threshold, iteration_seed, memory_format, poly_lr


def parse_args(argv=None):
    p = train_parser("la", __doc__)
    args = p.parse_args(argv)
    check_train_args(p, args)
    return args


def train_iteration(model, optimizer, batch, it, args, device):
    """Iteration ``it``: Algorithm 1 (or supervised training), backward, optimizer step.

    Every random draw in here (CutMix boxes, dropout masks) comes from the torch RNG seeded from (seed, it, rank).
    Returns the detached loss terms and what tensorboard shows: the labeled images, labels and logits."""
    torch.manual_seed(iteration_seed(args.seed, it))
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(args, it)
    tau = conf_threshold(args, it)
    fmt = memory_format(device, batch["x_l"].dim() - 2, args.memory_format)
    x_l = batch["x_l"].to(device, non_blocking=True, memory_format=fmt)
    y_l = batch["y_l"].to(device, non_blocking=True)
    crit = UNSUP_CRITERIA[args.unsup_loss]
    zero = torch.zeros((), device=device)

    def teacher(p):  # hard pseudo-label and confidence mask of a teacher's logits
        conf, y = p.detach().float().softmax(1).max(1)
        return y, (conf >= tau).float()

    with autocast(device, args.amp):
        if args.method == "supervised":
            p_l = model(x_l)
            loss_sup = supervised_loss(p_l, y_l)
            loss, logs = loss_sup, {"loss_sup": loss_sup}
        else:
            x_w, x_s1, x_s2 = (batch[k].to(device, non_blocking=True, memory_format=fmt) for k in ("x_w", "x_s1", "x_s2"))
            L, U = len(x_l), len(x_w)
            second_batch = args.cutmix_partner == "second_batch" and args.cutmix_p > 0

            # the CutMix partner of each unlabeled sample: a sample of a second unlabeled batch, whose teachers
            # come from a no-grad forward of its weak view in eval mode (batch-norm running statistics, P_w and
            # P_s on), as the release computes them; or another sample of this batch
            if second_batch:
                x_w_p, x_s1_p, x_s2_p = (batch[k].to(device, non_blocking=True, memory_format=fmt)
                                         for k in ("x_w_p", "x_s1_p", "x_s2_p"))
                with torch.no_grad():
                    model.eval()
                    p_wn_p, p_ww_p, p_ws_p = model(x_w_p, n_pert=U).split([U, U, U])
                    model.train()
            else:
                partner = partner_index(U, device) if args.cutmix_p > 0 else torch.arange(U, device=device)
                x_s1_p, x_s2_p = x_s1[partner], x_s2[partner]
            # CutMix inside each strong view: a box of the partner's strong view pasted in
            box1 = sample_boxes(U, x_w.shape[2:], args.cutmix_p, device=device)
            box2 = sample_boxes(U, x_w.shape[2:], args.cutmix_p, device=device)
            x_s1 = torch.where(box1[:, None], x_s1_p, x_s1)
            x_s2 = torch.where(box2[:, None], x_s2_p, x_s2)

            # pass A on cat(x_l, x_w): decoder batch [l, w, P_w w, P_s w]
            p_l, p_wn, p_ww, p_ws = model(torch.cat([x_l, x_w]), n_pert=U).split([L, U, U, U])
            # pass B on cat(x_s1, x_s2): decoder batch [s1, s2, P_w s2, P_s s2]
            p_s1, p_s2, p_sw, p_ss = model(torch.cat([x_s1, x_s2]), n_pert=U).split([U, U, U, U])

            with torch.no_grad():
                # teachers: hard pseudo-labels and their confidence masks (tau), for this batch and the partners
                (y_wn, keep_wn), (y_ww, keep_ww), (y_ws, keep_ws) = teacher(p_wn), teacher(p_ww), teacher(p_ws)
                if second_batch:
                    (y_wn_p, keep_wn_p), (y_ww_p, keep_ww_p), (y_ws_p, keep_ws_p) = (
                        teacher(p_wn_p), teacher(p_ww_p), teacher(p_ws_p))
                else:
                    y_wn_p, keep_wn_p, y_ww_p = y_wn[partner], keep_wn[partner], y_ww[partner]
                    keep_ww_p, y_ws_p, keep_ws_p = keep_ww[partner], y_ws[partner], keep_ws[partner]
                # the targets of the CutMixed strong views: inside box k, the partner's teacher
                y_wn_mix1, keep_wn_mix1 = torch.where(box1, y_wn_p, y_wn), torch.where(box1, keep_wn_p, keep_wn)
                y_wn_mix2, keep_wn_mix2 = torch.where(box2, y_wn_p, y_wn), torch.where(box2, keep_wn_p, keep_wn)
                y_ww_mix2, keep_ww_mix2 = torch.where(box2, y_ww_p, y_ww), torch.where(box2, keep_ww_p, keep_ww)
                y_ws_mix2, keep_ws_mix2 = torch.where(box2, y_ws_p, y_ws), torch.where(box2, keep_ws_p, keep_ws)

            # L_ip: the teacher p_wn supervises both strong views
            if args.no_ip:
                loss_ip = zero
            elif args.ip_loss == "stacked":  # Algorithm 1: one criterion over the stacked pair
                loss_ip = crit(torch.cat([p_s1, p_s2]), torch.cat([y_wn_mix1, y_wn_mix2]),
                               torch.cat([keep_wn_mix1, keep_wn_mix2]))
            else:  # the release: the mean of the two views' criteria
                loss_ip = 0.5 * (crit(p_s1, y_wn_mix1, keep_wn_mix1) + crit(p_s2, y_wn_mix2, keep_wn_mix2))
            # L_tkd: the teacher p_wn supervises the four feature-perturbed students
            students = [p_ww, p_ws, p_sw, p_ss]
            targets, keeps = [y_wn, y_wn, y_wn_mix2, y_wn_mix2], [keep_wn, keep_wn, keep_wn_mix2, keep_wn_mix2]
            if args.no_tkd:
                loss_tkd = zero
            elif args.tkd_loss == "stacked":  # Algorithm 1: one criterion over the four stacked
                loss_tkd = crit(torch.cat(students), torch.cat(targets), torch.cat(keeps))
            else:  # the release: the mean of the four criteria
                loss_tkd = sum(crit(p, y, k) for p, y, k in zip(students, targets, keeps)) / 4
            # L_dkd: within each perturbed decoder, the weak image's output teaches the strong image's
            loss_dkd = zero if args.no_dkd else 0.5 * (crit(p_sw, y_ww_mix2, keep_ww_mix2) +
                                                       crit(p_ss, y_ws_mix2, keep_ws_mix2))
            # Algorithm 1: L_u = (L_ip + (1 - eta) L_tkd + eta L_dkd) / 2 is kd_weight 0.5 (the release's LA: 1.0)
            loss_u = 0.5 * loss_ip + args.kd_weight * ((1 - args.eta) * loss_tkd + args.eta * loss_dkd)
            loss_sup = supervised_loss(p_l, y_l)
            loss = 0.5 * (loss_sup + loss_u)
            logs = {"loss_sup": loss_sup, "loss_u": loss_u, "loss_ip": loss_ip, "loss_tkd": loss_tkd,
                    "loss_dkd": loss_dkd, "conf_frac": keep_wn.mean(), "tau": zero + tau}

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return ({"loss": loss.detach(), **{k: v.detach() for k, v in logs.items()}},
            {"x_l": x_l.detach(), "y_l": y_l, "pred": p_l.detach()})


def main(argv=None):
    args = parse_args(argv)
    if args.print_run_dir or args.print_config:
        return print_settings(args)
    return run_training(train, args)


def train(args):
    """Set-up, the training list, then utils/loop.py's loop (rank 0 holds the run folder from start_run on)."""
    process, run_dir, root, names = start_run(args)
    if args.labelnum > len(names):
        raise SystemExit(f"error: --labelnum {args.labelnum} is larger than the {len(names)} cases of "
                         f"{args.train_list}")
    if args.labelnum == len(names) and args.method == "crossmatch":
        raise SystemExit(f"error: --labelnum {args.labelnum}: all {len(names)} cases of {args.train_list} labeled "
                         f"leaves no unlabeled case for CrossMatch (--method supervised trains on labeled cases only)")
    if args.method == "supervised":
        names, batch_sizes = names[:args.labelnum], (args.batch_size, 0, 0)
    else:
        unlabeled_bs = args.batch_size - args.labeled_bs
        partner_bs = unlabeled_bs if args.cutmix_partner == "second_batch" and args.cutmix_p > 0 else 0
        batch_sizes = (args.labeled_bs, unlabeled_bs, partner_bs)
    return train_loop(args, "la", train_iteration, process, run_dir, root, names, args.labelnum,
                      dict(n_labeled=args.labelnum, n_unlabeled=len(names) - args.labelnum),
                      f"{args.labelnum} labeled / {len(names) - args.labelnum} unlabeled cases", batch_sizes)


if __name__ == "__main__":
    main()
