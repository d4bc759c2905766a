"""The plumbing around a ``train_iteration`` that the four training scripts share: the run folder and the list
first, then resume, model and optimizer, the training set and its loader, the run folder's files, and the loop
with its logs and checkpoints (docs/RELIABILITY.md: exact resume, atomic checkpoints, DDP, one-line errors).
Each script keeps its method, ``train_iteration``, written out top to bottom, and calls ``train_loop`` with it.
"""
import json
import time

from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import resolve
from utils.checkpoint import finish_done_run, load_resume, save_training_state
from utils.data import DataError, TrainSet, data_fingerprint, find_list, read_list
from utils.datasets import description_entry, layout_of, run_prefix
from utils.distributed import barrier, cleanup, max_over_ranks
from utils.run_folder import (check_run_dir, config_of, get_logger, log_images, log_iteration, open_run_folder,
                              run_dir_of, stop_training)
from utils.signals import Stopped, stop_requested, stop_signals_held, worker_ignores_stop_signals
from utils.sampler import TwoStreamBatchSampler, collate_two_stream
from utils.training import build_for_training, setup, wrap_model


def print_settings(args):
    """--print_run_dir / --print_config: print the run folder or the resolved settings, touch nothing, return the
    run folder."""
    run_dir = run_dir_of(args)
    config = config_of(args, run_dir=str(run_dir), **description_entry(args))
    print(run_dir if args.print_run_dir else json.dumps(config, indent=2, default=str))
    return run_dir


def start_run(args) -> tuple:
    """Device and processes (``setup``), the run folder's check, the data root and the training list, before
    anything is written (rank 0 holds the run folder from here on). Returns ``(process, run_dir, root, names)``."""
    process = setup(args)
    run_dir = check_run_dir(args, process[1])
    root = resolve(args.root_path)
    try:
        names = read_list(find_list(root, args.train_list))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    return process, run_dir, root, names


def make_loader(dataset, sampler, num_workers: int, device) -> DataLoader:
    """The training loader: ``num_workers`` processes (0: in this one) that leave the stop signals to the main
    process (utils/signals.py), batches pinned for a GPU."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_two_stream,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      worker_init_fn=worker_ignores_stop_signals)


def train_loop(args, task, train_iteration, process, run_dir, root, names, n_labeled, counts: dict, what: str,
               batch_sizes: tuple, model=None, dataset_kw=None, warnings=(), notes=(), hook=None):
    """Train with ``train_iteration`` from iteration 0 (or latest.pth with --resume) to --max_iterations; can stop
    training (one line) and writes the checkpoints (rank 0). Returns the run folder.

    ``process`` is ``setup(args)``; ``names`` the training cases, the first ``n_labeled`` labeled; ``counts`` go
    into config.json; ``what`` (the data in words) and ``notes`` into the first log lines; ``batch_sizes`` is
    (labeled, unlabeled, CutMix partners) per iteration and process; ``model`` a network built by the caller
    (default: the task's, from the flags); ``dataset_kw`` more TrainSet arguments; ``hook(done, model, writer,
    log)`` runs after every iteration (``writer`` is None on ranks other than 0). ``train_iteration`` returns its
    logs and ``shown``, a dict with ``x_l``, ``y_l`` and ``pred`` for the tensorboard images."""
    device, rank, world, local_rank = process
    layout = layout_of(args)  # 3D: the data set's case files and classes; ACDC: None
    data = data_fingerprint(task, root, names[:n_labeled], names[n_labeled:], layout)
    ckpt, resume_warnings = load_resume(run_dir / "latest.pth", args, world, data) if args.resume else (None, [])
    log = get_logger(quiet=rank != 0)
    if finish_done_run(ckpt, args, run_dir, rank, log):
        cleanup()
        return run_dir
    model, optimizer = build_for_training(task, args, device, world, ckpt, run_dir / "latest.pth", model=model)
    start = ckpt["iteration"] if ckpt else 0
    del ckpt
    try:
        dataset = TrainSet(task, root, names, n_labeled, args.patch_size, layout=layout, **(dataset_kw or {}))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None

    labeled_bs, unlabeled_bs, partner_bs = batch_sizes
    train_model = wrap_model(model, args, device, world, local_rank)
    sampler = TwoStreamBatchSampler(range(n_labeled), range(n_labeled, len(dataset)), labeled_bs, unlabeled_bs,
                                    args.seed, args.max_iterations, start, rank, world, partner_bs)
    loader = make_loader(dataset, sampler, args.num_workers, device)
    writer = None
    if rank == 0:
        config = config_of(args, run_dir=str(run_dir), device=str(device), world_size=world, **counts,
                           **description_entry(args))
        log, writer = open_run_folder(args, config, [*warnings, *resume_warnings])
        preset = f", preset {args.preset}" if getattr(args, "preset", None) else ""
        log.info(f"{run_prefix(args)} {args.method}: {what}, {labeled_bs}+{unlabeled_bs} per batch x {world} "
                 f"process(es), iterations {start} -> {args.max_iterations}, device {device}, amp {args.amp}"
                 f"{preset}; run folder {run_dir}")
        for line in notes:
            log.info(line)

    model.train()
    bar = tqdm(total=args.max_iterations, initial=start, disable=rank != 0, dynamic_ncols=True, desc="train")
    t0, done, saved, stop = time.time(), start, start, 0
    with stop_signals_held(then_stop=False):  # a stop signal (SIGTERM, Ctrl-C) ends training between iterations
        try:
            for it, batch in enumerate(loader, start=start):
                stop = max_over_ranks(stop_requested())  # every rank stops at the same iteration
                if stop:
                    break
                logs, shown = train_iteration(train_model, optimizer, batch, it, args, device)
                done = it + 1
                log_iteration(logs, done, args, optimizer.param_groups[0]["lr"], writer, log)
                if writer is not None and done % args.image_every == 0:
                    log_images(writer, shown, done)
                if hook is not None:
                    hook(done, model, writer, log)
                if rank == 0 and (done % args.save_every == 0 or done == args.max_iterations):
                    save_training_state(run_dir / "latest.pth", model, optimizer, done, args, world, data)
                    writer.flush()
                    saved = done
                bar.update(1)
        except BaseException as e:  # the bar ends its line; a second Ctrl-C and a failed collective: one line
            bar.close()
            stop_workers(loader)
            stop_training(e, run_dir, done, args.max_iterations)
        bar.close()
        if stop:  # latest.pth at the last finished iteration, then one line
            stop_workers(loader)
            if rank == 0:
                if saved != done:
                    save_training_state(run_dir / "latest.pth", model, optimizer, done, args, world, data)
                writer.close()
            barrier()  # no rank ends before latest.pth is written
            stop_training(Stopped(stop), run_dir, done, args.max_iterations)
        if rank == 0:  # a stop signal that came in the last iteration waits for this and is then forgotten
            final = run_dir / f"iter_{args.max_iterations}.pth"
            save_training_state(final, model, optimizer, args.max_iterations, args, world, data)
            writer.close()
            log.info(f"done: {args.max_iterations - start} iterations in {time.time() - t0:.1f} s; final checkpoint "
                     f"{final}")
    cleanup()
    return run_dir


def stop_workers(loader) -> None:
    """End the loader's worker processes now, not when the loader is garbage-collected (they ignore stop signals:
    utils/signals.py). ``_shutdown_workers`` is the step DataLoader itself takes when it is done with them."""
    shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
