"""The training scripts' flags: one parser for both tasks with each task's defaults, the two presets, and
the checks of the values.

``--preset paper`` (the default) follows the paper where it states a setting and the authors' release where it
is silent; ``--preset release`` follows the release everywhere (docs/METHOD.md, settings). A preset only sets
defaults: every row is its own flag and an explicit flag wins. ``--print_config`` prints the resolved settings
as JSON and ``--print_run_dir`` the run folder, both without touching the data or the run folder.
"""
import argparse
import os

from utils.data import DataError
from utils.datasets import add_dataset_flags, resolve_dataset

# the task defaults that both presets share (3D: root, training list, labeled cases and patch come from --dataset)
TASK_DEFAULTS = {
    "la": dict(batch_size=4, labeled_bs=2, base_lr=1e-3, optimizer="adamw", save_every=500),
    "acdc": dict(root_path="data/ACDC", train_list="train_slices.list", labelnum=7, max_iterations=None,
                 batch_size=24, labeled_bs=12, base_lr=0.01, optimizer="sgd", patch_size=[256, 256], save_every=1000),
}
# the rows where the presets differ (a flag left unset takes its preset's value)
PRESETS = {
    "paper": {
        "la": dict(max_iterations=9000, poly_horizon=None, conf_thresh=0.85, conf_ramp=0, ip_loss="stacked",
                   tkd_loss="stacked", kd_weight=0.5, nesterov=False),
        "acdc": dict(poly_horizon=None, conf_thresh=0.95, conf_ramp=0, ip_loss="stacked", tkd_loss="stacked",
                     kd_weight=0.5, nesterov=False, uint8_unlabeled=False),
    },
    "release": {
        "la": dict(max_iterations=14000, poly_horizon=17000, conf_thresh=0.75, conf_ramp=17000, ip_loss="mean",
                   tkd_loss="mean", kd_weight=1.0, nesterov=False),
        "acdc": dict(poly_horizon=None, conf_thresh=0.95, conf_ramp=0, ip_loss="mean", tkd_loss="mean",
                     kd_weight=0.5, nesterov=True, uint8_unlabeled=True),
    },
}
# flags that may differ when a run is resumed (where the data is, how the run is watched and computed);
# any other difference is refused, because it would change what is trained
RESUME_MAY_DIFFER = {"root_path", "train_list", "val_list", "val_every", "device", "num_workers", "compile",
                     "memory_format", "deterministic", "save_every", "log_every", "image_every", "out_dir", "exp",
                     "resume", "overwrite", "print_config", "print_run_dir", "ddp_timeout"}


def default_workers(cores=None) -> int:
    """--num_workers when not given: 5 loader processes feed a 30 ms LA or 15 ms ACDC GPU iteration (a CrossMatch
    batch is about 133 / 72 ms of one core's work), and a third of the cores this process may use lets three runs
    share the machine (16 cores: 5 each); at least 1 (docs/PERFORMANCE.md, the data loader)."""
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(1, min(5, cores // 3))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the flag and what was expected) instead of the usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def train_parser(task: str, description: str) -> ArgumentParser:
    """The flags of ``train_<task>.py``, with the task's defaults."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="paper",
      help="paper: the paper where it speaks, the release where it is silent; release: the release everywhere")
    a("--root_path", help="data root (relative paths: against the repository root; 3D default: the data set's)")
    a("--train_list", help="training list, a name inside the root or a path (3D default: the data set's)")
    a("--exp", help="experiment name (default CrossMatch or Supervised, _release added for --preset release); "
                    "run folder <out_dir>/<TASK>_<exp>_<labelnum>_labeled")
    a("--labelnum", type=int, help="3D: labeled cases (first N of the list; default: the data set's); ACDC: labeled "
                                   "patients")
    a("--max_iterations", type=int, help="training iterations" + (" (default: from --epochs)" if task == "acdc" else ""))
    a("--batch_size", type=int, help="samples per iteration and process, labeled + unlabeled")
    a("--labeled_bs", type=int, help="labeled samples per iteration and process")
    a("--base_lr", type=float)
    a("--optimizer", choices=["adamw", "sgd"])
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--nesterov", action=argparse.BooleanOptionalAction, help="SGD with Nesterov momentum (preset)")
    a("--weight_decay", type=float, default=1e-4)
    a("--poly_power", type=float, default=0.9, help="lr = base_lr * (1 - it / poly_horizon) ** power")
    a("--poly_horizon", type=int, help="iterations of the poly schedule (preset; default --max_iterations)")
    a("--patch_size", type=int, nargs="+", help="3D: random crop X Y Z (default: the data set's); ACDC: slices zoomed to H W")
    a("--conf_thresh", type=float, help="tau: confidence threshold of the pseudo-labels (preset)")
    a("--conf_ramp", type=int, help="0: tau constant; N: tau = (T + (1 - T) sigmoid_rampup(it, N)) ln 2 (the "
                                    "release's LA schedule, T = --conf_thresh) (preset)")
    a("--ip_loss", choices=["stacked", "mean"], help="L_ip: one criterion over cat(p_s1, p_s2) (Algorithm 1) or "
                                                      "the mean of the two views' criteria (release) (preset)")
    a("--tkd_loss", choices=["stacked", "mean"], help="L_tkd: one criterion over the four stacked students "
                                                       "(Algorithm 1) or the mean of their criteria (release) (preset)")
    a("--kd_weight", type=float, help="loss = (L_sup + 0.5 L_ip + kd_weight ((1 - eta) L_tkd + eta L_dkd)) / 2: "
                                      "0.5 is Algorithm 1, the release uses 1.0 on LA (preset)")
    a("--eta", type=float, default=0.3, help="weight of L_dkd against L_tkd")
    a("--drop_weak", type=float, default=0.25, help="P_w channel dropout rate")
    a("--drop_strong", type=float, default=0.75, help="P_s channel dropout rate")
    a("--dropout_type", choices=["dropout", "alpha", "feature_alpha"], default="dropout", help="Fig. 5")
    a("--cutmix_p", type=float, default=0.5, help="probability of a CutMix box in each strong view (0: off)")
    a("--cutmix_partner", choices=["second_batch", "batch"], default="second_batch",
      help="second_batch: boxes from a second unlabeled batch, its teachers from extra no-grad forwards (the "
           "release); batch: from another sample of the same batch (cheaper)")
    a("--pert_out_dropout", action="store_true",
      help="V-Net: also apply the output Dropout3d in the perturbed forward (the release does not)")
    a("--unsup_loss", choices=["dice", "ce"], default="dice", help="unlabeled criterion (the paper: dice)")
    a("--method", choices=["crossmatch", "supervised"], default="crossmatch",
      help="supervised: --batch_size labeled samples per batch, no unlabeled data")
    a("--no_ip", action="store_true", help="switch off L_ip")
    a("--no_tkd", action="store_true", help="switch off L_tkd")
    a("--no_dkd", action="store_true", help="switch off L_dkd")
    a("--seed", type=int, default=1337)
    a("--deterministic", action="store_true", help="deterministic algorithms, no cuDNN autotuning")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--amp", choices=["none", "bf16"], default="none", help="bf16 autocast (GPU)")
    a("--compile", action="store_true", help="torch.compile the network")
    a("--memory_format", choices=["auto", "channels_last", "contiguous"], default="auto",
      help="layout of weights and inputs: auto = channels-last on a GPU, the default layout elsewhere")
    a("--sync_bn", action="store_true", help="with torchrun on GPUs: batch-norm statistics over all processes")
    a("--ddp_timeout", type=int, default=600, help="with torchrun: seconds a process waits for the others in a "
                                                   "collective before the run stops with an error")
    a("--num_workers", type=int, default=default_workers(),
      help="data loader processes (default: this machine's cores / 3, at most 5: docs/PERFORMANCE.md)")
    a("--save_every", type=int, help="write latest.pth every N iterations")
    a("--log_every", type=int, default=10, help="scalars to tensorboard every N iterations")
    a("--image_every", type=int, default=500, help="image, label and prediction to tensorboard every N iterations")
    a("--out_dir", default="model", help="where run folders go (relative paths: against the repository root)")
    a("--resume", action="store_true", help="continue the run folder from its latest.pth")
    a("--overwrite", action="store_true", help="delete an existing run folder of the same name first")
    a("--print_config", action="store_true", help="print the resolved settings as JSON and exit")
    a("--print_run_dir", action="store_true", help="print the run folder and exit")
    if task == "acdc":
        a("--uint8_unlabeled", action=argparse.BooleanOptionalAction,
          help="round unlabeled views to 8-bit values as the release's image pipeline does (preset)")
    else:
        add_dataset_flags(p)
    p.set_defaults(task=task, **TASK_DEFAULTS[task])
    return p


def apply_preset(args) -> None:
    """Fill every preset row the command line left unset from ``PRESETS[args.preset][args.task]``, and --exp."""
    for key, value in PRESETS[args.preset][args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.exp is None:
        args.exp = ("CrossMatch" if args.method == "crossmatch" else "Supervised") + (
            "_release" if args.preset == "release" else "")


def apply_dataset(p: ArgumentParser, args) -> None:
    """3D: fill the flags the data set decides (utils/datasets.py); ACDC: nothing."""
    if args.task == "la":
        try:
            resolve_dataset(args)
        except DataError as e:
            p.error(str(e))


def check_train_args(p: ArgumentParser, args) -> None:
    """Apply the data set (3D) and the preset, then refuse values that parse but make no sense (a one-line error
    naming the flag)."""
    apply_dataset(p, args)
    apply_preset(args)
    def bad(flag, want):
        value = getattr(args, flag[2:])
        p.error(f"argument {flag}: {' '.join(map(str, value)) if isinstance(value, list) else value}: expected {want}")
    n_dims = 3 if args.task == "la" else 2
    if len(args.patch_size) != n_dims or min(args.patch_size) < 16 or any(s % 16 for s in args.patch_size):
        bad("--patch_size", f"{n_dims} multiples of 16 (the network halves the resolution 4 times)")
    if args.batch_size < 1:
        bad("--batch_size", "at least 1")
    if args.method == "crossmatch" and not 1 <= args.labeled_bs < args.batch_size:
        bad("--labeled_bs", f"between 1 and --batch_size - 1 = {args.batch_size - 1}")
    if args.labelnum < 1:
        bad("--labelnum", "at least 1")
    if args.max_iterations is not None and args.max_iterations < 1:
        bad("--max_iterations", "at least 1")
    for flag in ("--conf_thresh", "--eta", "--cutmix_p"):
        if not 0.0 <= getattr(args, flag[2:]) <= 1.0:
            bad(flag, "a number in [0, 1]")
    for flag in ("--drop_weak", "--drop_strong"):
        if not 0.0 <= getattr(args, flag[2:]) < 1.0:
            bad(flag, "a dropout rate in [0, 1)")
    if args.base_lr <= 0:
        bad("--base_lr", "a positive number")
    if args.poly_horizon is not None and args.max_iterations is not None and args.poly_horizon < args.max_iterations:
        bad("--poly_horizon", f"at least --max_iterations ({args.max_iterations})")
    for flag in ("--conf_ramp", "--kd_weight"):
        if getattr(args, flag[2:]) < 0:
            bad(flag, "0 or more")
    for flag in ("--weight_decay", "--num_workers"):
        if getattr(args, flag[2:]) < 0:
            bad(flag, "0 or more")
    for flag in ("--save_every", "--log_every", "--image_every", "--ddp_timeout"):
        if getattr(args, flag[2:]) < 1:
            bad(flag, "a positive number")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other (continue the run, or replace it)")


# ------------------------------------------------------------------------------------------------------- CML
# train_la_cml.py / train_acdc_cml.py: the training flags above, CrossMatch's own hidden and refused, CML's added
CROSSMATCH_ONLY = ("preset", "conf_thresh", "conf_ramp", "eta", "drop_weak", "drop_strong", "dropout_type", "cutmix_p",
                   "cutmix_partner", "pert_out_dropout", "unsup_loss", "ip_loss", "tkd_loss", "kd_weight", "no_ip",
                   "no_tkd", "no_dkd", "poly_power", "poly_horizon", "uint8_unlabeled")
CML_DEFAULTS = {  # the paper's settings; lr_step from the release (docs/CML.md)
    "la": dict(exp="CML", max_iterations=17000, pre_iterations=2000, batch_size=8, labeled_bs=4, base_lr=0.01,
               optimizer="sgd", nesterov=False, u_weight=1.0, dis_weight=0.2, mask_ratio=2 / 3, lr_step=2500),
    "acdc": dict(exp="CML", max_iterations=40000, pre_iterations=10000, batch_size=24, labeled_bs=12, base_lr=0.01,
                 optimizer="sgd", nesterov=False, u_weight=0.5, dis_weight=0.1, mask_ratio=1 / 2, lr_step=0),
}


def cml_parser(task: str, description: str) -> ArgumentParser:
    """The flags of ``train_<task>_cml.py``: those of ``train_parser`` but CrossMatch's own, and CML's."""
    p = train_parser(task, description)
    for action in p._actions:
        if action.dest in CROSSMATCH_ONLY:  # not shown, not set; given anyway, check_cml_args refuses them
            action.help = action.default = argparse.SUPPRESS
            p._defaults.pop(action.dest, None)
        elif action.dest == "method":
            action.help = argparse.SUPPRESS
        elif action.dest == "max_iterations":
            action.help = "training iterations, pre-training included"
    g = p.add_argument_group("CML")
    g.add_argument("--pre_iterations", type=int, help="the first N iterations pre-train on labeled data (Eq. 11)")
    g.add_argument("--u_weight", type=float, help="lambda_1, the weight of L_sup^u")
    g.add_argument("--dis_weight", type=float, help="lambda_2, the weight of L_dis")
    g.add_argument("--mask_ratio", type=float, help="beta: the CutMix cuboid's side over the patch's")
    g.add_argument("--lr_step", type=int, help="self-training: lr x --lr_gamma every N iterations (0: constant)")
    g.add_argument("--lr_gamma", type=float, default=0.1)
    p.set_defaults(method="cml", **CML_DEFAULTS[task])
    return p


def check_cml_args(p: ArgumentParser, args) -> None:
    """CrossMatch flags refused, the shared flags checked as ``check_train_args`` checks them, then CML's."""
    given = [f"--{d}" for d in CROSSMATCH_ONLY if hasattr(args, d)]
    if given:
        p.error(f"{', '.join(given)}: {'CrossMatch flags' if len(given) > 1 else 'a CrossMatch flag'}, not used by "
                f"CML (docs/CML.md)")
    apply_dataset(p, args)
    if args.method != "cml":
        p.error(f"argument --method: {args.method}: this script trains CML (train_{args.task}.py trains "
                f"crossmatch and supervised)")
    check_train_args(p, argparse.Namespace(**{**vars(train_parser(args.task, "").parse_args([])), **vars(args),
                                              "method": "crossmatch"}))
    if args.labeled_bs % 2 or (args.batch_size - args.labeled_bs) % 2:
        p.error(f"argument --labeled_bs: {args.labeled_bs} of --batch_size {args.batch_size}: expected an even "
                f"number of labeled and of unlabeled samples (CutMix mixes them in pairs)")
    if args.max_iterations is None or not 0 <= args.pre_iterations <= args.max_iterations:
        p.error(f"argument --pre_iterations: {args.pre_iterations}: expected 0 to --max_iterations "
                f"{args.max_iterations}")
    for flag in ("--u_weight", "--dis_weight", "--lr_step"):
        if getattr(args, flag[2:]) < 0:
            p.error(f"argument {flag}: {getattr(args, flag[2:])}: expected 0 or more")
    if not 0 < args.mask_ratio < 1:
        p.error(f"argument --mask_ratio: {args.mask_ratio}: expected a number in (0, 1)")
    if not 0 < args.lr_gamma <= 1:
        p.error(f"argument --lr_gamma: {args.lr_gamma}: expected a number in (0, 1]")
