"""CrossMatch on LA (3D V-Net): Algorithm 1 of Zhao et al., IEEE JBHI 2024 (docs/METHOD.md).

    python code/train_la.py --labelnum 8                          # Table I, 8 labeled cases, 9000 iterations
    python code/train_la.py --labelnum 8 --method supervised      # the V-Net row: labeled data only

`train_iteration` is the whole method, top to bottom: one iteration from a host batch to the optimizer step.
`main` is the plumbing: flags, data, run folder, checkpoints, logs.
"""
import json
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import resolve
from utils.checkpoint import finish_done_run, load_resume, save_training_state
from utils.cutmix import partner_index, sample_boxes
from utils.data import DataError, TrainSet, data_fingerprint, find_list, read_list
from utils.distributed import cleanup
from utils.flags import check_train_args, train_parser
from utils.losses import UNSUP_CRITERIA, supervised_loss
from utils.run_folder import (check_run_dir, config_of, get_logger, log_images, log_iteration, open_run_folder,
                              run_dir_of, run_training, stop_training)
from utils.sampler import TwoStreamBatchSampler, collate_two_stream
from utils.training import (autocast, build_for_training, conf_threshold, iteration_seed, memory_format, poly_lr, setup,
                            wrap_model)


def parse_args(argv=None):
    p = train_parser("la", __doc__)
    args = p.parse_args(argv)
    check_train_args(p, args)
    return args


def train_iteration(model, optimizer, batch, it, args, device):
    """Iteration ``it``: Algorithm 1 (or supervised training), backward, optimizer step.

    Every random draw in here (CutMix boxes, dropout masks) comes from the torch RNG seeded from (seed, it, rank).
    Returns the detached loss terms and the labeled samples' logits."""
    torch.manual_seed(iteration_seed(args.seed, it))
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(args, it)
    tau = conf_threshold(args, it)
    fmt = memory_format(device, batch["x_l"].dim() - 2)
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
    return {"loss": loss.detach(), **{k: v.detach() for k, v in logs.items()}}, p_l.detach()


def main(argv=None):
    args = parse_args(argv)
    if args.print_run_dir or args.print_config:
        print(run_dir_of(args) if args.print_run_dir else json.dumps(config_of(args, run_dir=str(run_dir_of(args))),
                                                                       indent=2, default=str))
        return run_dir_of(args)
    return run_training(train, args)


def train(args):
    """Set-up, data, run folder (rank 0 holds it from check_run_dir on), model and the training loop; returns the
    run folder."""
    device, rank, world, local_rank = setup(args)
    run_dir = check_run_dir(args, rank)
    root = resolve(args.root_path)
    try:
        names = read_list(find_list(root, args.train_list))
        if args.labelnum > len(names):
            raise DataError(f"--labelnum {args.labelnum} is larger than the {len(names)} cases of {args.train_list}")
        if args.labelnum == len(names) and args.method == "crossmatch":
            raise DataError(f"--labelnum {args.labelnum}: all {len(names)} cases of {args.train_list} labeled leaves "
                            f"no unlabeled case for CrossMatch (--method supervised trains on labeled cases only)")
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    supervised = args.method == "supervised"
    labeled_bs, unlabeled_bs = (args.batch_size, 0) if supervised else (args.labeled_bs, args.batch_size - args.labeled_bs)

    data = data_fingerprint("la", root, names[:args.labelnum], [] if supervised else names[args.labelnum:])
    ckpt, warnings = load_resume(run_dir / "latest.pth", args, world, data) if args.resume else (None, [])
    log = get_logger(quiet=rank != 0)
    if finish_done_run(ckpt, args, run_dir, rank, log):
        cleanup()
        return run_dir
    model, optimizer = build_for_training("la", args, device, world, ckpt, run_dir / "latest.pth")
    start = ckpt["iteration"] if ckpt else 0
    del ckpt
    try:
        dataset = TrainSet("la", root, names[:args.labelnum] if supervised else names, args.labelnum, args.patch_size)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None

    train_model = wrap_model(model, args, device, world, local_rank)
    partner_bs = unlabeled_bs if args.cutmix_partner == "second_batch" and args.cutmix_p > 0 else 0
    sampler = TwoStreamBatchSampler(range(args.labelnum), range(args.labelnum, len(dataset)), labeled_bs,
                                    unlabeled_bs, args.seed, args.max_iterations, start, rank, world, partner_bs)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers, collate_fn=collate_two_stream,
                        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)

    writer = None
    if rank == 0:
        log, writer = open_run_folder(args, config_of(args, run_dir=str(run_dir), device=str(device), world_size=world,
                                                      n_labeled=args.labelnum, n_unlabeled=len(dataset) - args.labelnum),
                                      warnings)
        log.info(f"LA {args.method}: {args.labelnum} labeled / {len(dataset) - args.labelnum} unlabeled cases, "
                 f"{labeled_bs}+{unlabeled_bs} per batch x {world} process(es), iterations {start} -> "
                 f"{args.max_iterations}, device {device}, amp {args.amp}, preset {args.preset}; "
                 f"run folder {run_dir}")

    model.train()
    bar = tqdm(total=args.max_iterations, initial=start, disable=rank != 0, dynamic_ncols=True, desc="train")
    t0, done = time.time(), start
    try:
        for it, batch in enumerate(loader, start=start):
            logs, p_l = train_iteration(train_model, optimizer, batch, it, args, device)
            done = it + 1
            log_iteration(logs, done, args, optimizer.param_groups[0]["lr"], writer, log)
            if writer is not None and done % args.image_every == 0:
                log_images(writer, batch, p_l, done)
            if rank == 0 and (done % args.save_every == 0 or done == args.max_iterations):
                save_training_state(run_dir / "latest.pth", model, optimizer, done, args, world, data)
                writer.flush()
            bar.update(1)
    except BaseException as e:  # the bar ends its line; Ctrl-C and a failed collective end with one line
        bar.close()
        stop_training(e, run_dir, done, args.max_iterations)
    bar.close()
    if rank == 0:
        save_training_state(run_dir / f"iter_{args.max_iterations}.pth", model, optimizer, args.max_iterations, args,
                            world, data)
        writer.close()
        log.info(f"done: {args.max_iterations - start} iterations in {time.time() - t0:.1f} s; final checkpoint "
                 f"{run_dir / f'iter_{args.max_iterations}.pth'}")
    cleanup()
    return run_dir


if __name__ == "__main__":
    main()
