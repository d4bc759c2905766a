"""CrossMatch on the ACDC data set (2D U-Net on slices), Algorithm 1 of Zhao et al. (IEEE JBHI 2024) as fixed by
SPEC.md; the same method as code/train_la.py, on 2D slices with the ACDC settings.

    python code/train_acdc.py --labelnum 7               # 7 labeled patients = the first 136 slices
    python code/train_acdc.py --labelnum 7 --method supervised

`train_iteration` below is the whole method, top to bottom, written out here as in train_la.py so that each
script reads on its own (tests/test_losses.py checks that both compute the same losses). The default length
is 300 epochs over the unlabeled slices; --max_iterations overrides it. The reported checkpoint is always the
final one; --val_every only logs the mean Dice on val.list.
"""
import argparse
import math
import time

import numpy as np
import torch
from tensorboardX import SummaryWriter
from torch.utils.data import DataLoader
from tqdm import tqdm

from networks import build_model
from utils.checks import DataError, check_acdc_root
from utils.cutmix import partner_index, sample_boxes
from utils.data_acdc import ACDCSlices, acdc_volume_path, labeled_slice_count, load_volume
from utils.data_la import read_list
from utils.checkpoint import remove_stale_temp_files
from utils.distributed import cleanup, dump_rank_state
from utils.evaluation import predict_volume_slices
from utils.losses import UNSUP_CRITERIA, supervised_loss
from utils.metrics import multiclass_metrics
from utils.paths import resolve
from utils import allocator
from utils.run import (ArgumentParser, add_common_args, autocast, check_run_dir, checkpoint_step, compare_resume_args,
                       get_logger, load_resume, log_images, log_iteration, memory_format, poly_lr, prepare_model,
                       prepare_run_dir, resume_finished, run_dir_of, save_run_checkpoint, set_lr, setup_process,
                       validate_common_args, write_config)
from utils.sampler import TwoStreamBatchSampler, collate_two_stream
from utils.seeding import iteration_seed


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root_path", default="data/ACDC", help="ACDC root with train_slices.list and data/")
    p.add_argument("--train_list", default="train_slices.list", help="slice list (path, or a name inside the root)")
    p.add_argument("--val_list", default="val.list", help="volume list for --val_every")
    p.add_argument("--epochs", type=int, default=300, help="length in epochs over the unlabeled slices")
    p.add_argument("--val_every", type=int, default=0, help="log mean Dice on --val_list every N iterations (0: never)")
    add_common_args(p, labelnum=7, max_iterations=None, batch_size=24, labeled_bs=12, base_lr=0.01,
                    optimizer="sgd", weight_decay=1e-4, patch_size=(256, 256), conf_thresh=0.95, save_every=1000)
    p.set_defaults(task="acdc")
    args = p.parse_args(argv)
    validate_common_args(args, n_dims=2, need_iterations=False)
    return args


def train_iteration(model, optimizer, scaler, batch, it, args, device, rank=0, want_pred=False):
    """One iteration: data to the device, Algorithm 1 (or supervised), backward, optimizer step.

    Every random draw in here (CutMix boxes, feature dropout masks) comes from the torch RNG re-seeded from
    (seed, iteration, rank), so an iteration is reproducible on its own. Returns detached loss terms."""
    torch.manual_seed(iteration_seed(args.seed, it, rank))
    set_lr(optimizer, poly_lr(args.base_lr, it, args.max_iterations, args.poly_power))
    fmt = memory_format(device, batch["x_l"].dim() - 2)
    x_l = batch["x_l"].to(device, non_blocking=True, memory_format=fmt)
    y_l = batch["y_l"].to(device, non_blocking=True)
    crit = UNSUP_CRITERIA[args.unsup_loss]
    zero = torch.zeros((), device=device)

    with autocast(device, args.amp):
        if args.method == "supervised":
            p_l = model(x_l)
            loss_sup = supervised_loss(p_l, y_l)
            loss, logs = loss_sup, {"loss_sup": loss_sup}
        else:
            x_w = batch["x_w"].to(device, non_blocking=True, memory_format=fmt)
            x_s1 = batch["x_s1"].to(device, non_blocking=True, memory_format=fmt)
            x_s2 = batch["x_s2"].to(device, non_blocking=True, memory_format=fmt)
            L, U = x_l.shape[0], x_w.shape[0]

            # CutMix inside each strong view: a box pasted from another unlabeled sample of this batch
            partner = partner_index(U, device) if args.cutmix_p > 0 else None
            box1 = box2 = None
            if partner is not None:
                box1 = sample_boxes(U, x_w.shape[2:], args.cutmix_p, device=device)
                box2 = sample_boxes(U, x_w.shape[2:], args.cutmix_p, device=device)
                x_s1 = torch.where(box1[:, None], x_s1[partner], x_s1)
                x_s2 = torch.where(box2[:, None], x_s2[partner], x_s2)

            def mix(t, box):  # the teacher target of a pasted region is the partner's teacher there
                return t if box is None else torch.where(box, t[partner], t)

            # pass A on cat(x_l, x_w): decoder batch [l, w, P_w w, P_s w]
            p_l, p_wn, p_ww, p_ws = model(torch.cat([x_l, x_w]), n_pert=U).split([L, U, U, U])
            # pass B on cat(x_s1, x_s2): decoder batch [s1, s2, P_w s2, P_s s2]
            p_s1, p_s2, p_sw, p_ss = model(torch.cat([x_s1, x_s2]), n_pert=U).split([U, U, U, U])

            # teachers: hard pseudo-labels and their confidences, no gradient
            with torch.no_grad():
                conf_wn, y_wn = p_wn.detach().float().softmax(1).max(1)
                conf_ww, y_ww = p_ww.detach().float().softmax(1).max(1)
                conf_ws, y_ws = p_ws.detach().float().softmax(1).max(1)
                keep_wn = (conf_wn >= args.conf_thresh).float()
                keep_ww = (conf_ww >= args.conf_thresh).float()
                keep_ws = (conf_ws >= args.conf_thresh).float()

            # L_ip: the teacher p_wn supervises both strong views
            loss_ip = zero if args.no_ip else 0.5 * (crit(p_s1, mix(y_wn, box1), mix(keep_wn, box1)) +
                                                     crit(p_s2, mix(y_wn, box2), mix(keep_wn, box2)))
            # L_tkd: the teacher p_wn supervises all four feature-perturbed students
            loss_tkd = zero if args.no_tkd else crit(
                torch.cat([p_ww, p_ws, p_sw, p_ss]),
                torch.cat([y_wn, y_wn, mix(y_wn, box2), mix(y_wn, box2)]),
                torch.cat([keep_wn, keep_wn, mix(keep_wn, box2), mix(keep_wn, box2)]))
            # L_dkd: within each decoder, the weak-image output teaches the strong-image output
            loss_dkd = zero if args.no_dkd else 0.5 * (crit(p_sw, mix(y_ww, box2), mix(keep_ww, box2)) +
                                                       crit(p_ss, mix(y_ws, box2), mix(keep_ws, box2)))
            loss_u = 0.5 * (loss_ip + (1 - args.eta) * loss_tkd + args.eta * loss_dkd)
            loss_sup = supervised_loss(p_l, y_l)
            loss = 0.5 * (loss_sup + loss_u)
            logs = {"loss_sup": loss_sup, "loss_u": loss_u, "loss_ip": loss_ip, "loss_tkd": loss_tkd,
                    "loss_dkd": loss_dkd, "conf_frac": keep_wn.mean()}

    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    logs = {"loss": loss.detach(), **{k: v.detach() for k, v in logs.items()}}
    if want_pred:
        logs["pred_l"] = p_l.detach().argmax(1)
    return logs


def validate(model, root, names, args, device):
    """Mean Dice over RV, Myo, LV on a volume list (for the log; never used to pick a checkpoint)."""
    was_training = model.training
    model.eval()
    dice = []
    for name in names:
        image, label = load_volume(acdc_volume_path(root, name))
        pred = predict_volume_slices(model, image, args.patch_size, device=device)
        dice.append(np.mean([m["dice"] for m in multiclass_metrics(pred, label, (1, 2, 3)).values()]))
    model.train(was_training)
    return float(np.mean(dice))


def main(argv=None):
    args = parse_args(argv)
    rank, world, local_rank, device = setup_process(args, from_command_line=argv is None)
    is_main = rank == 0

    # refusals first, before anything is written: an existing run folder, --resume flags, then the data
    check_run_dir(args, is_main)
    ckpt = load_resume(args, device, world) if args.resume else None
    if ckpt is not None and resume_finished(ckpt, args, run_dir_of(args), get_logger(run_dir_of(args), is_main),
                                                     is_main):
        cleanup()
        return run_dir_of(args)
    root = resolve(args.root_path)
    try:
        info = check_acdc_root(root, args.train_list, labelnum=args.labelnum, patch_size=args.patch_size)
        if args.val_every:
            check_acdc_root(root, args.val_list)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    slices = read_list(root / args.train_list)
    n_labeled = labeled_slice_count(args.labelnum)
    if args.method == "supervised":
        slices, labeled_bs, unlabeled_bs = slices[:n_labeled], args.batch_size, 0
    else:
        labeled_bs, unlabeled_bs = args.labeled_bs, args.batch_size - args.labeled_bs
    n_unlabeled = len(slices) - n_labeled
    if args.max_iterations is None:   # 300 epochs over the unlabeled set (the labeled set for supervised)
        per_epoch = math.ceil((n_unlabeled or n_labeled) / ((unlabeled_bs or labeled_bs) * world))
        args.max_iterations = args.epochs * per_epoch
        if ckpt is not None:  # now known: must match the saved run too
            compare_resume_args(args, ckpt)
    dataset = ACDCSlices(root, slices, labeled_count=n_labeled, patch_size=args.patch_size, cache=not args.no_cache)

    run_dir = prepare_run_dir(args, is_main)
    log = get_logger(run_dir, is_main)
    for message in info.get("warnings", []) + (ckpt or {}).get("resume_warnings", []):
        log.warning(f"warning: {message}")
    if args.resume and is_main:
        for p in remove_stale_temp_files(run_dir):
            log.info(f"removed {p.name}, a checkpoint write interrupted by a kill")
    model = build_model("acdc", args.drop_weak, args.drop_strong, args.dropout_type)
    model, raw_model, optimizer, scaler, start = prepare_model(model, args, device, world, local_rank, 2, ckpt)
    del ckpt
    sampler = TwoStreamBatchSampler(range(n_labeled), range(n_labeled, len(slices)), labeled_bs, unlabeled_bs,
                                    seed=args.seed, num_iterations=args.max_iterations, start_iteration=start,
                                    rank=rank, world_size=world)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_two_stream)
    writer = None
    if is_main:
        write_config(run_dir, args, {"run_dir": str(run_dir), "device": str(device), "world_size": world,
                                     "effective_batch_size": world * (labeled_bs + unlabeled_bs),
                                     "n_labeled_slices": n_labeled, "n_unlabeled_slices": n_unlabeled})
        log.info(f"ACDC {args.method}: {args.labelnum} labeled patients = {n_labeled} slices / {n_unlabeled} "
                 f"unlabeled slices, {labeled_bs}+{unlabeled_bs} per batch x {world} process(es), "
                 f"{args.max_iterations} iterations (from {start}), device {device}, amp {args.amp}; "
                 f"run folder {run_dir}")
        if device.type == "cpu":
            log.info(f"CPU allocator: {allocator.applied()} (--malloc {args.malloc})")
        writer = SummaryWriter(str(run_dir))
    val_names = read_list(root / args.val_list) if args.val_every and is_main else []

    model.train()
    bar = tqdm(total=args.max_iterations, initial=start, disable=not is_main, dynamic_ncols=True, desc="train")
    t0 = time.time()
    for it, batch in enumerate(loader, start=start):
        done = it + 1
        want_pred = is_main and done % args.image_every == 0
        logs = train_iteration(model, optimizer, scaler, batch, it, args, device, rank, want_pred)
        log_iteration(logs, done, args, optimizer, writer, bar, log, run_dir)
        if want_pred:
            log_images(writer, batch, logs["pred_l"], done)
        if val_names and done % args.val_every == 0:
            dice = validate(raw_model, root, val_names, args, device)
            writer.add_scalar("val/mean_dice", dice, done)
            log.info(f"it {done}: mean Dice on {args.val_list} {dice:.4f} (logged only)")
        checkpoint_step(done, args, raw_model, optimizer, scaler, run_dir, is_main, log)
        bar.update(1)
    bar.close()
    dump_rank_state(raw_model, optimizer, rank)
    if is_main:
        final = run_dir / f"iter_{args.max_iterations}.pth"
        save_run_checkpoint(final, raw_model, optimizer, scaler, args.max_iterations, args)
        writer.close()
        log.info(f"done: {args.max_iterations - start} iterations in {time.time() - t0:.1f} s; final checkpoint {final}")
    cleanup()
    return run_dir


if __name__ == "__main__":
    main()
