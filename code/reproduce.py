"""The paper's tables in one command: every row over several seeds, the final checkpoints evaluated under one
named protocol, mean +- std beside the paper's figures, and plots (docs/REPRODUCE.md).

    python code/reproduce.py table1                        # Table I: LA 4 / 8 / 16 labeled, supervised and CrossMatch
    python code/reproduce.py all --dry_run                 # every command and run folder; nothing is run
    python code/reproduce.py table5 --jobs 4 --gpus 0,1    # four trainings at once, spread over two GPUs
    python code/reproduce.py table1 -- --max_iterations 500   # extra training flags: a short trial, marked as one
    python code/reproduce.py --demo                        # synthetic data on the CPU, into results/demo/
    python code/reproduce.py readme                        # README.md's status block from results/

TABLE is table1, table2, table4, table5, fig5 or all (these five), or table3 (CML's Table 3, BraTS2019) or pancreas
(Pancreas-CT), the other 3D data sets (docs/DATASETS.md). Each (row, seed) trains in its own run folder, named by
the training script from --exp <table>_<row>_<preset>_s<seed> (rows with identical training settings share one
run). A finished run is skipped, an interrupted one resumed (--resume), and the final checkpoint is evaluated
by the test script. Tables go to <out>/<table>.md and .csv, plots to <out>/<table>/.
"""
import argparse
import contextlib
import csv
import hashlib
import importlib
import io
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from utils import REPO_ROOT, resolve
from utils.datasets import saved_args
from utils.flags import RESUME_MAY_DIFFER

CODE = Path(__file__).resolve().parent
METRICS = ("dice", "jaccard", "hd95", "asd")
HEADS = {"dice": "Dice (%)", "jaccard": "Jaccard (%)", "hd95": "95HD (voxel)", "asd": "ASD (voxel)"}
PERCENT = {"dice", "jaccard"}  # stored as fractions in summary.json, shown in % like the paper
TABLES = ("table1", "table2", "table4", "table5", "fig5")
TITLES = {
    "table1": "Table I: LA, 4 / 8 / 16 labeled cases, V-Net supervised and CrossMatch; CML at 8",
    "table2": "Table II: ACDC, 3 / 7 labeled patients, U-Net supervised, CrossMatch and CML",
    "table4": "Table IV: LA 8 labeled, the eta sweep (the paper's Table IV) and L_ip / L_tkd / L_dkd switched off",
    "table5": "Table V: LA 8 labeled, weak / strong feature-dropout rates",
    "fig5": "Fig. 5: LA 8 labeled, dropout types",
    "demo": "Demo: synthetic LA-format data, supervised against CrossMatch (not a reproduction)",
}
NOTES = {
    "table1": "The paper's figures: its Table I (V-Net rows and \"Ours\"), final weights, LA test.list. The CML row's "
              "are CML's own (its Table 1: Dice, 95HD, ASD; its release picks the best checkpoint on test.list).",
    "table2": "The paper's figures: its Table II (U-Net rows and \"Ours\"), which reports the validation set: they "
              "apply to val.list. test.list (the 20 patients BCP, AD-MT and ABD report) has no CrossMatch figure; the CML "
              "rows' figures are CML's own Table 2 (Dice, 95HD, ASD), measured on that split.",
    "table4": "The paper's Table IV is the eta sweep (its figures beside the eta rows). The switch-off rows (this "
              "repository's issues call them \"Table IV\" too) and their pairwise combinations have no paper "
              "figure (\"-\"); all three off leaves L_sup only and is not run.",
    "table5": "The paper's figures: its Table V (bottom = P_w rate, top = P_s rate, gap = top - bottom); equal rates "
              "are \"UniMatch plus L_kd\".",
    "fig5": "The paper shows Fig. 5 only as a bar chart (4, 8 and 16 labels): no figure in its text, so the paper "
            "column is \"-\". Only the 8-label split is run here.",
    "demo": "Synthetic volumes (code/make_synthetic.py), tiny patches and few iterations: the machinery of the real "
            "tables, on a CPU in minutes. The numbers say nothing about the paper.",
}

# --------------------------------------------------------------------------------------------------- the rows
# One dict per table row: table, key (in run-folder and file names), row (its label), task, train (the training
# script in code/), flags (training flags), lists (the lists its final checkpoint is evaluated on), paper
# ({list: (Dice %, Jaccard %, 95HD, ASD)}, only where the paper prints the figures); optional: test_flags,
# root (the data root when no --la_root / --acdc_root / LA_ROOT / ACDC_ROOT is given), gap (Table V).
LA_TEST, ACDC_LISTS = ["test.list"], ["val.list", "test.list"]
TABLE1 = {(4, "supervised"): (43.32, 31.43, 40.19, 12.13), (4, "crossmatch"): (88.96, 80.21, 7.75, 2.38),
          (8, "supervised"): (79.99, 68.12, 21.11, 5.48), (8, "crossmatch"): (91.33, 84.11, 5.29, 1.53),
          (16, "supervised"): (86.03, 76.06, 14.26, 3.51), (16, "crossmatch"): (91.61, 84.57, 5.36, 1.57)}
TABLE2 = {(3, "supervised"): (47.83, 37.01, 31.16, 12.62), (3, "crossmatch"): (88.27, 80.17, 1.53, 0.46),
          (7, "supervised"): (79.41, 68.11, 9.35, 2.70), (7, "crossmatch"): (89.08, 81.44, 1.52, 0.52)}
TABLE4_ETA = {0.1: (90.88, 83.35, 7.80, 1.93), 0.15: (90.55, 82.92, 7.93, 2.51), 0.2: (91.03, 83.62, 6.44, 1.99),
              0.25: (91.28, 84.01, 5.77, 1.62), 0.3: (91.33, 84.11, 5.29, 1.53), 0.35: (90.78, 83.21, 6.91, 1.88),
              0.4: (87.25, 77.80, 9.80, 2.37), 0.45: (90.53, 82.78, 6.54, 1.83), 0.5: (87.78, 79.22, 6.76, 1.90)}
SWITCH_OFFS = [("ip",), ("tkd",), ("dkd",), ("ip", "tkd"), ("ip", "dkd"), ("tkd", "dkd")]
TABLE5 = {(0.5, 0.5): (91.20, 83.87, 5.41, 1.80), (0.375, 0.625): (91.07, 83.65, 5.47, 1.59),
          (0.25, 0.75): (91.33, 84.11, 5.29, 1.53), (0.125, 0.875): (90.22, 82.32, 6.59, 1.76)}
NET = {"la": "V-Net", "acdc": "U-Net"}
DEMO_LA_TRAIN = ["--labelnum", "2", "--max_iterations", "120", "--patch_size", "32", "32", "16", "--base_lr", "3e-3",
                 "--save_every", "40", "--log_every", "4", "--image_every", "40", "--num_workers", "0"]
DEMO_LA_TEST = ["--stride_xy", "16", "--stride_z", "8", "--sw_batch", "4"]


def _method_row(table, task, n, method, paper_list, figures):
    label = f"{NET[task]} supervised" if method == "supervised" else "CrossMatch"
    return dict(table=table, key=f"{task}{n}_{method}", row=f"{task.upper()} {n} labeled, {label}", task=task,
                train=f"train_{task}.py", flags=["--labelnum", str(n), "--method", method],
                lists=LA_TEST if task == "la" else ACDC_LISTS, paper={paper_list: figures})


def _la8_row(table, key, row, flags, paper=None, **more):
    return dict(table=table, key=key, row=row, task="la", train="train_la.py", flags=["--labelnum", "8", *flags],
                lists=LA_TEST, paper={"test.list": paper} if paper else {}, **more)


ROWS = [
    *(_method_row("table1", "la", n, m, "test.list", TABLE1[n, m]) for n in (4, 8, 16)
      for m in ("supervised", "crossmatch")),
    *(_method_row("table2", "acdc", n, m, "val.list", TABLE2[n, m]) for n in (3, 7)
      for m in ("supervised", "crossmatch")),
    *(_la8_row("table4", f"eta{eta}", f"eta = {eta}", ["--eta", str(eta)], figures)
      for eta, figures in TABLE4_ETA.items()),
    *(_la8_row("table4", "no_" + "_".join(off), " and ".join(f"L_{t}" for t in off) + " off",
               [f"--no_{t}" for t in off]) for off in SWITCH_OFFS),
    *(_la8_row("table5", f"drop{w}-{s}", f"P_w {w} / P_s {s} (gap {s - w:.2f})",
               ["--drop_weak", str(w), "--drop_strong", str(s)], figures, gap=s - w)
      for (w, s), figures in TABLE5.items()),
    *(_la8_row("fig5", kind, f"{kind} ({cls})", ["--dropout_type", kind])
      for kind, cls in (("dropout", "Dropout3d"), ("alpha", "AlphaDropout"), ("feature_alpha", "FeatureAlphaDropout"))),
    # the CML baseline (code/train_*_cml.py: no --preset; "paper" is CML's own paper, Tables 1 and 2, which print no
    # Jaccard; its ACDC split is the 20-patient test list)
    dict(table="table1", key="la8_cml", row="LA 8 labeled, CML (paper: CML's Table 1)", task="la", cml=True,
         train="train_la_cml.py", flags=["--labelnum", "8"], lists=LA_TEST,
         paper={"test.list": (90.36, math.nan, 6.06, 1.68)}),
    *(dict(table="table2", key=f"acdc{n}_cml", row=f"ACDC {n} labeled, CML (paper: CML's Table 2)", task="acdc",
           cml=True, train="train_acdc_cml.py", flags=["--labelnum", str(n)], lists=ACDC_LISTS,
           paper={"test.list": figures}) for n, figures in ((3, (88.53, math.nan, 1.87, 0.57)),
                                                             (7, (89.42, math.nan, 1.42, 0.52)))),
    *(dict(table="demo", key=m, row=f"LA 2 of 20 labeled (synthetic), {label}", task="la", train="train_la.py",
           flags=[*DEMO_LA_TRAIN, "--method", m], lists=LA_TEST, paper={}, test_flags=DEMO_LA_TEST,
           root="data/demo_LA") for m, label in (("supervised", "V-Net supervised"), ("crossmatch", "CrossMatch"))),
]
# ------------------------------------------------ more 3D data sets (docs/DATASETS.md): CML's Table 3, Pancreas-CT
# Not part of "all" (CrossMatch's own tables); their data is not in ../shared. Rows on train_la.py / train_la_cml.py
# with --dataset, data roots from --brats2019_root / --pancreas_root or $BRATS2019_ROOT / $PANCREAS_ROOT.
MORE_TABLES = ("table3", "pancreas")
TITLES.update({
    "table3": "CML's Table 3: BraTS2019 (whole tumour), 25 / 50 labeled scans (10 % / 20 %), V-Net supervised, "
              "CrossMatch and CML",
    "pancreas": "Pancreas-CT: 6 / 12 labeled scans (10 % / 20 %), V-Net supervised and CrossMatch",
})
NOTES.update({
    "table3": "The paper's figures are CML's own Table 3 (Dice, 95HD, ASD; no Jaccard) for the V-Net and CML rows, on "
              "the SSL4MIS test.txt (60 scans); CrossMatch reports no BraTS2019 figure. CrossMatch and supervised "
              "rows use LA's settings (train_la.py's defaults, patch 96 x 96 x 96); CML rows its BraTS2019 "
              "lengths (10k pre-training + 30k self-training), the rest of its LA settings (CML releases no "
              "BraTS2019 code).",
    "pancreas": "No paper figure: neither CrossMatch nor CML reports Pancreas-CT. LA's settings (train_la.py's "
                "defaults, patch 96 x 96 x 96), the MC-Net lists (62 training scans, 20 test scans).",
})
CML_TABLE3 = {25: ((78.32, math.nan, 22.29, 7.36), (85.26, math.nan, 9.08, 1.83)),
              50: ((80.18, math.nan, 20.57, 6.09), (86.63, math.nan, 7.83, 1.45))}  # (V-Net, Ours), CML's Table 3
MORE_ROOTS = {"brats2019": "data/BraTS2019", "pancreas": "data/Pancreas"}


def _dataset_row(table, dataset, name, n, share, method, paper=None):
    label = {"supervised": "V-Net supervised", "crossmatch": "CrossMatch", "cml": "CML"}[method]
    source = " (paper: CML's Table 3)" if paper else " (no paper figure)"
    test_list = "test.txt" if dataset == "brats2019" else "test.list"
    cml = ["--pre_iterations", "10000", "--max_iterations", "40000"] if method == "cml" else ["--method", method]
    return dict(table=table, key=f"{dataset.rstrip('2019')}{n}_{method}", row=f"{name} {n} labeled ({share}), {label}{source}",
                task="la", dataset=dataset, cml=method == "cml",
                train="train_la_cml.py" if method == "cml" else "train_la.py",
                flags=["--dataset", dataset, "--labelnum", str(n), *cml], lists=[test_list],
                paper={test_list: paper} if paper else {})


ROWS += [
    *(_dataset_row("table3", "brats2019", "BraTS2019", n, share, m, dict(supervised=vnet, cml=ours).get(m))
      for (n, share), (vnet, ours) in zip(((25, "10 %"), (50, "20 %")), CML_TABLE3.values())
      for m in ("supervised", "crossmatch", "cml")),
    *(_dataset_row("pancreas", "pancreas", "Pancreas-CT", n, share, m) for n, share in ((6, "10 %"), (12, "20 %"))
      for m in ("supervised", "crossmatch")),
]

DEMO_DATA = {"data/demo_LA": ["--task", "la", "--n_train", "20", "--n_test", "4", "--shape", "48", "48", "40"]}
DEMO_SEEDS = [1337, 1338]


# ------------------------------------------------------------------------------------------------ the command
def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", nargs="?", choices=[*TABLES, *MORE_TABLES, "all", "readme"],
                   help="the table to reproduce; readme: rewrite README.md's status block from --out")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 1337 1338 1339; --demo 1337 1338)")
    p.add_argument("--preset", choices=["paper", "release"], default="paper", help="the training scripts' --preset")
    p.add_argument("--jobs", type=int, help="runs at once (default: one per --gpus entry, else 1; --demo: 2; an LA "
                                          "run needs about 10 GiB of GPU memory, so several fit on one GPU)")
    p.add_argument("--gpus", help="comma-separated GPU ids, given to the runs in turn as CUDA_VISIBLE_DEVICES")
    p.add_argument("--dry_run", action="store_true", help="print the commands and run folders, then exit")
    p.add_argument("--aggregate_only", action="store_true",
                   help="write the tables and plots from the run folders as they are; train and evaluate nothing")
    p.add_argument("--out", help="where tables and plots go (default results; --demo: results/demo)")
    p.add_argument("--runs_dir", default="model", help="where the run folders go (the training scripts' --out_dir)")
    p.add_argument("--demo", action="store_true", help="the demo table: two rows on synthetic data, CPU minutes")
    p.add_argument("--la_root", help="LA data root (default $LA_ROOT, else data/LA; --demo: data/demo_LA)")
    p.add_argument("--acdc_root", help="ACDC data root (default $ACDC_ROOT, else data/ACDC)")
    for name, root in MORE_ROOTS.items():
        p.add_argument(f"--{name}_root", help=f"{name} data root (default ${name.upper()}_ROOT, else {root})")
    p.add_argument("--readme", default="README.md", help="readme: the file whose status block is rewritten")
    args = p.parse_args(argv)
    if args.demo == (args.table is not None):
        p.error("give a TABLE or --demo (one of them)")
    args.gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    args.jobs = args.jobs or (min(2, os.cpu_count() or 1) if args.demo and not args.gpus else max(1, len(args.gpus)))
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    args.table = "demo" if args.demo else args.table
    args.seeds = args.seeds or (DEMO_SEEDS if args.demo else [1337, 1338, 1339])
    args.out = resolve(args.out or ("results/demo" if args.demo else "results"))
    args.extra = extra
    return args


def data_root(row, args) -> Path:
    name = row.get("dataset", row["task"])  # la, acdc, or one of MORE_ROOTS
    env = None if "root" in row else os.environ.get(f"{name.upper()}_ROOT")
    return resolve(getattr(args, f"{name}_root") or env or row.get("root") or MORE_ROOTS.get(name, f"data/{name.upper()}"))


def extra_tag(extra) -> str:
    """Runs with extra training flags get their own run folders (a short trial never passes for a full run)."""
    return "_x" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:6] if extra else ""


def resolved_config(train_script: str, argv: list) -> dict:
    """The training script's --print_config for ``argv``, in this process: every resolved flag and the run folder."""
    module = importlib.import_module(Path(train_script).stem)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main([*argv, "--print_config"])
    return json.loads(out.getvalue())


class Run:
    """One training configuration and seed: a run folder, the rows (of any table) that report it, its commands."""

    def __init__(self, row, seed, args, config):
        self.rows, self.seed = [row], seed
        self.task, self.train, self.root = row["task"], row["train"], data_root(row, args)
        self.data_name = row.get("dataset", row["task"])
        self.config, self.run_dir = config["args"], Path(config["run_dir"])
        self.lists = list(row["lists"])
        self.test_flags = list(row.get("test_flags", []))
        self.argv = train_argv(row, seed, args, self.root)
        self.duration = None  # seconds, measured here once it ran

    @property
    def name(self) -> str:
        return f"{self.rows[0]['table']}/{self.rows[0]['key']} seed {self.seed}"

    def final_checkpoint(self):
        """``iter_<max_iterations>.pth`` by the run folder's own config.json, when it exists."""
        try:
            final = json.loads((self.run_dir / "config.json").read_text())["args"]["max_iterations"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        path = self.run_dir / f"iter_{final}.pth"
        return path if path.is_file() else None

    def conflicts(self) -> list:
        """The settings in which the run folder's config.json differs from this run's (a folder of the same name
        trained otherwise, say before a row's flags changed): ``['--flag saved -> now']``; empty when none."""
        try:
            saved = saved_args(json.loads((self.run_dir / "config.json").read_text())["args"])
        except (OSError, ValueError, KeyError):
            return []
        return [f"--{k} {saved.get(k, 'absent')} -> {v}" for k, v in sorted(self.config.items())
                if k not in RESUME_MAY_DIFFER and not k.startswith("print_") and v is not None and saved.get(k) != v]

    def summary(self, list_name):
        """The summary.json of the final checkpoint's evaluation on ``list_name``, or None (also for a run folder
        trained with other settings)."""
        path = self.run_dir / f"eval_{Path(list_name).stem}" / "summary.json"
        final = None if self.conflicts() else self.final_checkpoint()
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        ok = final is not None and summary.get("final_checkpoint") and Path(summary.get("checkpoint", "")).name == final.name
        return summary if ok else None

    def state(self) -> str:
        """finished | evaluate (trained, an evaluation missing) | resume (latest.pth) | restart (a folder without a
        checkpoint: cleared and trained afresh) | train | conflict (the folder holds a run with other settings: left
        alone, reported as failed)."""
        if self.conflicts():
            return "conflict"
        if self.final_checkpoint():
            return "finished" if all(self.summary(l) for l in self.lists) else "evaluate"
        if (self.run_dir / "latest.pth").is_file():
            return "resume"
        return "restart" if (self.run_dir / "config.json").exists() else "train"

    def commands(self, state=None) -> list:
        state = state or self.state()
        cmds = []
        if state in ("train", "restart", "resume"):
            cmds.append([sys.executable, str(CODE / self.train), *self.argv, *(["--resume"] if state == "resume" else [])])
        for list_name in self.lists:
            if state in ("train", "restart", "resume") or (state == "evaluate" and not self.summary(list_name)):
                cmds.append([sys.executable, str(CODE / f"test_{self.task}.py"), "--run", str(self.run_dir), "--list",
                             list_name, "--root_path", str(self.root), *self.test_flags])
        return cmds


def train_argv(row, seed, args, root) -> list:
    preset = [] if row.get("cml") else ["--preset", args.preset]  # CML has no presets
    exp = f"{row['table']}_{row['key']}{'' if row.get('cml') else '_' + args.preset}_s{seed}{extra_tag(args.extra)}"
    return [*row["flags"], *preset, "--seed", str(seed), "--exp", exp, "--out_dir", str(resolve(args.runs_dir)),
            "--root_path", str(root), *args.extra]


def plan(args, tables) -> tuple:
    """``(runs, per_table)``: the distinct runs of ``tables`` in seed-major order (every row gets a first seed
    before any gets a second), and for each table its ``[(row, seed, run)]``. Rows of any table whose resolved
    training settings are the same share the run of the first such row in ROWS, whatever the selection."""
    rows = [r for r in ROWS if (r["table"] == "demo") == (args.table == "demo")]
    missing = [r for r in rows if not (CODE / r["train"]).is_file()]
    for row in missing:
        if row["table"] in tables:
            print(f"warning: {row['table']}/{row['key']}: code/{row['train']} does not exist; row left out",
                  file=sys.stderr)
    shared, runs, per_table = {}, {}, {t: [] for t in tables}
    for seed in args.seeds:
        for row in (r for r in rows if r not in missing):
            argv = train_argv(row, seed, args, data_root(row, args))
            try:
                config = resolved_config(row["train"], argv)
            except SystemExit as e:
                raise SystemExit(f"error: {row['table']}/{row['key']}: the training script refuses its flags "
                                 f"({e}): {' '.join(argv)}") from None
            settings = {k: v for k, v in config["args"].items() if k not in ("exp", "out_dir")}
            key = (row["train"], json.dumps(settings, sort_keys=True, default=str))
            if key not in shared:
                shared[key] = Run(row, seed, args, config)
            run = shared[key]
            if row["table"] in tables:
                if row is not run.rows[0]:
                    run.rows.append(row)
                    run.lists += [l for l in row["lists"] if l not in run.lists]
                runs[id(run)] = run
                per_table[row["table"]].append((row, seed, run))
    return list(runs.values()), per_table


def ensure_demo_data(runs) -> None:
    for root in {r.root for r in runs}:
        rel = next((k for k in DEMO_DATA if resolve(k) == root), None)
        if rel and not (root / "train.list").is_file():
            subprocess.run([sys.executable, str(CODE / "make_synthetic.py"), "--out", str(root), *DEMO_DATA[rel]],
                           check=True, stdout=subprocess.DEVNULL)


# ----------------------------------------------------------------------------------------------- running runs
def shell(cmd) -> str:
    """A command as text, the way to type it in the repository root (relative paths, ``python``)."""
    root = str(REPO_ROOT) + os.sep
    return " ".join("python" if c == sys.executable else c[len(root):] if c.startswith(root) else c for c in cmd)


def fmt_duration(seconds) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    m = int(round(seconds / 60))
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else (f"{m} min" if m else f"{int(seconds)} s")


def logged_training_seconds(run_dir: Path):
    """``(seconds, iterations)`` summed over the "done: N iterations in S s" lines of a run's log.txt (one per
    training process: a resumed run has several), or None."""
    try:
        found = re.findall(r"done: (\d+) iterations in ([0-9.]+) s", (run_dir / "log.txt").read_text())
    except OSError:
        return None
    return (sum(float(s) for _, s in found), sum(int(n) for n, _ in found)) if found else None


def device_name(gpu) -> str:
    """The GPU a child sees first (its cuda:0), or the CPU model."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(int(gpu) if gpu is not None else 0)
    try:
        return next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu"


class Scheduler:
    """Runs the runs' commands, ``jobs`` at once, each run's in order; a run's output goes to
    <run folder>/reproduce_output.log; one progress line; a failure is reported with its output's last lines and
    the other runs go on."""

    def __init__(self, runs, entries, args, out=sys.stdout):
        self.runs, self.args, self.out = runs, args, out
        self.rows = {}  # (table, key) -> its runs
        for row, _, run in entries:
            self.rows.setdefault((row["table"], row["key"]), []).append(run)
        self.slots = [args.gpus[i % len(args.gpus)] if args.gpus else None for i in range(args.jobs)]
        self.lock, self.procs, self.started, self.done, self.failed = threading.Lock(), {}, {}, [], []
        self.last = ("", 0.0)  # the last progress line printed (without time and ETA), and when
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30", "TQDM_MAXINTERVAL": "120"}
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the CPU's cores shared by the runs at once
            self.env.setdefault(var, str(max(1, (os.cpu_count() or 1) // args.jobs)))

    def run_all(self) -> int:
        queue = [r for r in self.runs if r.state() != "finished"]
        self.finished_before = [r for r in self.runs if r not in queue]
        for run in [r for r in queue if r.state() == "conflict"]:
            queue.remove(run)
            self.failed.append(run)
            self.say(f"FAILED: {run.name}: {run.run_dir} holds a run trained with other settings "
                     f"({', '.join(run.conflicts())}); move it away or pass another --runs_dir")
        self.say(f"{len(self.runs)} runs: {len(self.finished_before)} finished, {len(queue)} to do, {len(self.slots)} "
                 f"at once" + (f" on GPUs {','.join(self.args.gpus)}" if self.args.gpus else ""))
        free, pending = list(range(len(self.slots))), {}
        with ThreadPoolExecutor(max_workers=len(self.slots)) as pool:
            try:
                while queue or pending:
                    while queue and free:
                        run, slot = queue.pop(0), free.pop(0)
                        self.started[run] = time.time()
                        pending[pool.submit(self.execute, run, self.slots[slot])] = (run, slot)
                    self.progress(len(queue))
                    finished, _ = wait(pending, timeout=60, return_when=FIRST_COMPLETED)
                    for future in finished:
                        run, slot = pending.pop(future)
                        free.append(slot)
                        self.report(run, *future.result())
            except BaseException:  # Ctrl-C, SIGTERM: stop the children (their latest.pth stays, to be resumed)
                queue.clear()
                self.stop_children()
                raise
        self.progress(0, final=True)
        return 1 if self.failed else 0

    def execute(self, run, gpu) -> tuple:
        """The run's commands in order, their output appended to its log; ``(exit code, command)`` of the first
        failure, or ``(0, None)``."""
        try:
            return self._execute(run, gpu)
        except OSError as e:  # the run folder cannot be written, say: this run fails, the others go on
            return 1, [f"(reproduce.py: {e})"]

    def _execute(self, run, gpu) -> tuple:
        env = dict(self.env, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
        state = run.state()
        log_path = run.run_dir / "reproduce_output.log"
        if state == "restart":  # a folder without any checkpoint (died before its first save): start afresh
            for p in run.run_dir.iterdir():
                if p != log_path:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        run.run_dir.mkdir(parents=True, exist_ok=True)
        start, cmds = time.time(), run.commands(state)
        with open(log_path, "a") as log:
            for cmd in cmds:
                log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} reproduce.py ({state}, CUDA_VISIBLE_DEVICES="
                          f"{gpu if gpu is not None else 'unset'}): {shell(cmd)}\n")
                log.flush()
                with self.lock:
                    proc = self.procs[run] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                              cwd=REPO_ROOT)
                code = proc.wait()
                with self.lock:
                    self.procs.pop(run, None)
                if code != 0:
                    return code, cmd
        run.duration = time.time() - start
        record = run.run_dir / "reproduce.json"
        history = json.loads(record.read_text()) if record.is_file() else []
        history.append({"state": state, "commands": [shell(c) for c in cmds], "cuda_visible_devices": gpu,
                        "device_name": device_name(gpu),
                        "seconds": round(run.duration, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        record.write_text(json.dumps(history, indent=2) + "\n")
        return 0, None

    def report(self, run, code, cmd) -> None:
        if code == 0:
            self.done.append(run)
            self.say(f"done: {run.name} ({run.run_dir.name}) in {fmt_duration(run.duration)}")
            return
        self.failed.append(run)
        log = run.run_dir / "reproduce_output.log"
        lines = [l for l in re.split(r"[\r\n]+", log.read_text(errors="replace")) if l.strip()] if log.is_file() else []
        tail = "\n".join("    " + l for l in lines[-15:])
        self.say(f"FAILED: {run.name} (exit {code}): {shell(cmd)}\n  last lines of {log}:\n{tail}")

    def running(self) -> list:
        return [r for r in self.started if r not in self.done and r not in self.failed]

    def eta(self, n_queued: int):
        """Seconds left: the mean duration of the runs finished here (else the training time in the logs of the
        runs found finished) for each queued run and the rest of each running one, shared by the slots."""
        measured = [r.duration for r in self.done if r.duration]
        if not measured:
            measured = [s for s, _ in filter(None, map(logged_training_seconds, (r.run_dir for r in self.finished_before)))]
        if not measured:
            return None
        mean, now = statistics.mean(measured), time.time()
        rest = sum(max(mean - (now - self.started[r]), 0) for r in self.running())
        return (rest + mean * n_queued) / len(self.slots)

    def progress(self, n_queued: int, final=False) -> None:
        done = set(self.finished_before) | set(self.done)
        rows_done = sum(all(r in done for r in runs) for runs in self.rows.values())
        eta = self.eta(n_queued)
        line = (f"[{time.strftime('%H:%M:%S')}] runs: {len(done)}/{len(self.runs)} done, "
                f"{0 if final else len(self.running())} running, {n_queued} left, {len(self.failed)} failed; rows: "
                f"{rows_done}/{len(self.rows)} done"
                + ("" if final else f"; ETA {fmt_duration(eta) if eta is not None else '? (no run finished yet)'}"))
        counts = line.split("] ", 1)[1].split("; ETA")[0]
        if self.tty and not final:
            self.out.write("\r\033[K" + line)
            self.out.flush()
        elif final or counts != self.last[0] or time.time() - self.last[1] >= 600:  # a log: on news, or each 10 min
            self.say(line)
            self.last = counts, time.time()

    def say(self, text) -> None:
        self.out.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.out.flush()

    def stop_children(self) -> None:
        with self.lock:
            for proc in self.procs.values():
                proc.terminate()


# ------------------------------------------------------------------------------------------------ aggregation
def seed_stats(values) -> tuple:
    """``(mean, sample std (n - 1), n)`` of the values that are not None or NaN; NaN where undefined."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    mean = statistics.mean(v) if v else math.nan
    return mean, statistics.stdev(v) if len(v) > 1 else math.nan, len(v)


def fmt(value, digits=2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def table_lines(table, entries, seeds) -> list:
    """A dict per (row, list): the seeds' summaries reduced to mean / std / n per metric, the paper's figure and
    the difference (ours - paper)."""
    by_row = {}
    for row, seed, run in entries:
        by_row.setdefault(row["key"], (row, {}))[1][seed] = run
    lines = []
    for row, runs in by_row.values():
        for list_name in row["lists"]:
            summaries = {seed: run.summary(list_name) for seed, run in runs.items()}
            found = {s: v for s, v in summaries.items() if v is not None}
            paper = row["paper"].get(list_name)
            line = dict(table=table, key=row["key"], row=row["row"], task=row["task"], list=list_name,
                        seeds=" ".join(map(str, sorted(found))),
                        missing_seeds=" ".join(str(s) for s in seeds if s not in found), n_seeds=len(found))
            for i, m in enumerate(METRICS):
                scale = 100.0 if m in PERCENT else 1.0
                mean, std, n = seed_stats([v.get(m) * scale if v.get(m) is not None else None for v in found.values()])
                line.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": n,
                             f"paper_{m}": paper[i] if paper else math.nan,
                             f"diff_{m}": mean - paper[i] if paper else math.nan})
            line["n_cases"] = sum(v["n_cases"] for v in found.values())
            for k in ("n_empty", "n_empty_label", "n_both_empty"):
                line[k] = sum(v.get(k, 0) for v in found.values())
            line["empty_distance"] = " ".join(sorted({v.get("empty_distance", "?") for v in found.values()}))
            configs = [r.config for r in runs.values()]
            line["preset"] = " ".join(sorted({str(c.get("preset")) for c in configs}))
            line["iterations"] = " ".join(sorted({str(read_config(r).get("args", {}).get("max_iterations"))
                                                  for s, r in runs.items() if s in found}))
            line["train_minutes"] = seed_stats([run_minutes(runs[s]) for s in found])[0]
            line["gap"] = row.get("gap", "")
            lines.append(line)
    return lines


def read_config(run) -> dict:
    try:
        return json.loads((run.run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def run_minutes(run):
    """Training minutes of a run from its log.txt; a resumed run: its pieces' speed times its length."""
    logged = logged_training_seconds(run.run_dir)
    iterations = read_config(run).get("args", {}).get("max_iterations")
    return logged[0] / logged[1] * iterations / 60 if logged and logged[1] and iterations else None


def run_facts(entries) -> dict:
    """What the header says about the runs that finished: commits, devices, iterations, minutes per run."""
    runs = {id(run): run for _, _, run in entries if run.final_checkpoint()}.values()
    configs = [read_config(r) for r in runs]
    per_run = [m for m in map(run_minutes, runs) if m is not None]
    devices = set()
    for r, c in zip(runs, configs):
        record = r.run_dir / "reproduce.json"
        name = json.loads(record.read_text())[-1].get("device_name") if record.is_file() else None
        devices.add(str(c.get("device", "?")) + (f" ({name})" if name else ""))
    return dict(commits=sorted({c.get("git_commit", "?") for c in configs}),
                devices=sorted(devices), torch=sorted({c.get("versions", {}).get("torch", "?") for c in configs}),
                iterations=sorted({str(c.get("args", {}).get("max_iterations")) for c in configs}),
                minutes=seed_stats(per_run) if per_run else None)


def cell(line, m) -> str:
    mean, std, n = line[f"{m}_mean"], line[f"{m}_std"], line[f"{m}_n"]
    if not n:
        return "not yet measured" if not line["n_seeds"] else "- (no distance)"
    text = f"{fmt(mean)} ± {fmt(std)}" if n > 1 else f"{fmt(mean)}"
    return text + (f" (n={n})" if n != line["n_seeds"] else "")


def write_table(table, entries, args) -> tuple:
    """<out>/<table>.csv and <out>/<table>.md (with the plots under <out>/<table>/); returns their paths."""
    lines = table_lines(table, entries, args.seeds)
    if not lines:
        return None, None
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = args.out / f"{table}.csv", args.out / f"{table}.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(lines[0]) + ["extra_flags"], lineterminator="\n")
        writer.writeheader()
        for line in lines:
            writer.writerow({**{k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else
                                    ("" if isinstance(v, float) else v)) for k, v in line.items()},
                             "extra_flags": " ".join(args.extra)})
    facts = run_facts(entries)
    plots = make_plots(table, entries, lines, args.out)
    md_path.write_text(markdown(table, lines, facts, plots, args))
    return csv_path, md_path


def command_line(table, args) -> str:
    return " ".join(["python code/reproduce.py", "--demo" if table == "demo" else table, "--seeds", *map(str, args.seeds),
                     "--preset", args.preset, *(["--", *args.extra] if args.extra else [])])


def markdown(table, lines, facts, plots, args) -> str:
    lists = sorted({l["list"] for l in lines})
    n_cases = sum(l["n_cases"] for l in lines)
    empty = {k: sum(l[k] for l in lines) for k in ("n_empty", "n_empty_label", "n_both_empty")}
    policy = " ".join(sorted({l["empty_distance"] for l in lines if l["empty_distance"]})) or "nan"
    minutes = facts["minutes"]
    out = [f"# {TITLES[table]}", "",
           f"Generated by `{command_line(table, args)}`. " + NOTES[table], ""]
    if args.extra:
        trial = any(f in args.extra for f in ("--max_iterations", "--epochs"))
        out += [f"**Extra training flags: `{' '.join(args.extra)}`**" + (
            " -- these runs are not the paper's length: a trial, not a reproduction." if trial else "."), ""]
    out += ["Protocol:", "",
            f"- lists: {', '.join(lists)}; checkpoint: the final one (`iter_<max_iterations>.pth`), never a best one; "
            "post-processing: none",
            f"- empty cases (`--empty_distance {policy}`): an empty prediction or empty label scores Dice 0 and has "
            f"no 95HD / ASD (left out of the distance means; a seed's n shows it); in these results "
            f"{empty['n_empty']} empty predictions, {empty['n_empty_label']} empty labels, {empty['n_both_empty']} "
            f"both-empty cases over {n_cases} evaluated cases",
            f"- preset {args.preset}; iterations {', '.join(facts['iterations']) or '-'}; git commit of the runs "
            f"{', '.join(facts['commits']) or '-'}; device {', '.join(facts['devices']) or '-'}; torch "
            f"{', '.join(facts['torch']) or '-'}",
            "- training minutes per run (from the runs' log.txt, scaled to the full length for resumed runs): "
            + (f"{minutes[0]:.1f}" + (f" ± {minutes[1]:.1f}" if minutes[2] > 1 else "") + f" over {minutes[2]} runs"
               if minutes else "not yet measured"),
            "- values: Dice and Jaccard in % (like the paper), 95HD and ASD in voxels; mean ± sample standard "
            "deviation over the seeds that finished (n seeds shown; never the best seed); diff = this repository "
            "- the paper", ""]
    head = ["row", "list", "n seeds"] + [HEADS[m] for m in METRICS] + ["paper: Dice / Jaccard / 95HD / ASD",
                                                                        "diff: Dice / Jaccard / 95HD / ASD",
                                                                        "training min / run"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for l in lines:
        paper = " / ".join(fmt(l[f"paper_{m}"]) for m in METRICS) if not math.isnan(l["paper_dice"]) else "-"
        diff = (" / ".join(fmt(l[f"diff_{m}"]) for m in METRICS)
                if not math.isnan(l["paper_dice"]) and l["n_seeds"] else "-")
        n = f"{l['n_seeds']}" + (f" (missing {l['missing_seeds']})" if l["missing_seeds"] else "")
        out.append("| " + " | ".join([l["row"], l["list"], n, *(cell(l, m) for m in METRICS), paper, diff,
                                      fmt(l["train_minutes"], 1)]) + " |")
    missing = [l for l in lines if l["missing_seeds"]]
    if missing:
        out += ["", f"{len(missing)} of {len(lines)} lines miss seeds (their means rest on fewer runs): "
                + "; ".join(f"{l['row']} ({l['list']}): {l['missing_seeds']}" for l in missing) + "."]
    if plots:
        out += ["", "## Plots", ""]
        for title, files in plots:
            out.append(f"{title}: " + ", ".join(f"[{label}]({path})" for label, path in files))
        out += [""] + [f"![{title}]({files[0][1]})" for title, files in plots if len(files) == 1]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------ plots
def per_case_dice(run, list_name) -> list:
    """Per-case Dice (%) of a run's final evaluation (ACDC: the mean over the classes of each volume)."""
    path = run.run_dir / f"eval_{Path(list_name).stem}" / "metrics.csv"
    if not run.summary(list_name) or not path.is_file():
        return []
    cases = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            cases.setdefault(r["case"], []).append(float(r["dice"]) * 100)
    return [statistics.mean(v) for v in cases.values()]


def training_curves(run_dir: Path) -> dict:
    """Every ``train/*`` scalar of a run's tensorboard events: ``{tag: (steps, values)}``; a step logged twice
    (a resumed run repeats the iterations after its last checkpoint) keeps the later value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    curves = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith("train/"):
                curves.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: tuple(zip(*sorted(points.items()))) for tag, points in curves.items()}


CURVE_ORDER = ["train/loss", "train/loss_sup", "train/loss_u", "train/loss_ip", "train/loss_tkd", "train/loss_dkd",
               "train/conf_frac", "train/tau", "train/lr"]


def make_plots(table, entries, lines, out: Path) -> list:
    """PNG files under <out>/<table>/: per-case Dice of every row over all seeds, training curves per row (seeds
    overlaid), and for table5 Dice against the dropout-rate gap. Returns ``[(title, [(label, path)])]``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = out / table
    folder.mkdir(parents=True, exist_ok=True)
    seeds = sorted({seed for _, seed, _ in entries})
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(seeds)}
    plots = []

    lists = list(dict.fromkeys(l["list"] for l in lines))
    fig, axes = plt.subplots(1, len(lists), figsize=(max(6, 1.3 * len(lines) / len(lists) + 2) * len(lists), 4.8),
                             squeeze=False)
    for ax, list_name in zip(axes[0], lists):
        rows = [l for l in lines if l["list"] == list_name]
        for x, line in enumerate(rows):
            per_seed = {seed: per_case_dice(run, list_name) for row, seed, run in entries if row["key"] == line["key"]}
            values = [v for vs in per_seed.values() for v in vs]
            if values:
                ax.boxplot([values], positions=[x], widths=0.5, showfliers=False)
            for i, (seed, vs) in enumerate(per_seed.items()):
                ax.scatter([x - 0.2 + 0.4 * (i + 0.5) / len(per_seed)] * len(vs), vs, s=12, color=colors[seed],
                           alpha=0.8, label=f"seed {seed}" if x == 0 else None, zorder=3)
            if not math.isnan(line["paper_dice"]):
                ax.plot([x - 0.3, x + 0.3], [line["paper_dice"]] * 2, color="red", lw=2,
                        label="paper (mean)" if not ax.get_legend_handles_labels()[1].count("paper (mean)") else None)
        ax.set_xticks(range(len(rows)), [l["row"] for l in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Dice per case (%)")
        ax.set_title(f"{table}: {list_name}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "dice_per_case.png", dpi=110)
    plt.close(fig)
    plots.append(("Per-case Dice, every seed (box over all seeds' cases, points coloured by seed; red: the "
                  "paper's mean)", [("dice_per_case.png", f"{table}/dice_per_case.png")]))

    curve_files = []
    for key in dict.fromkeys(row["key"] for row, _, _ in entries):
        per_seed = {seed: training_curves(run.run_dir) for row, seed, run in entries if row["key"] == key}
        tags = sorted({t for c in per_seed.values() for t in c},
                      key=lambda t: (CURVE_ORDER.index(t) if t in CURVE_ORDER else len(CURVE_ORDER), t))
        if not tags:
            continue
        cols = 3
        fig, axes = plt.subplots(math.ceil(len(tags) / cols), cols, figsize=(12, 2.6 * math.ceil(len(tags) / cols)),
                                 squeeze=False)
        for ax, tag in zip(axes.flat, tags):
            for seed, curves in per_seed.items():
                if tag in curves:
                    ax.plot(*curves[tag], color=colors[seed], lw=1, label=f"seed {seed}")
            ax.set_title(tag, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.tick_params(labelsize=7)
            if tag.startswith("train/loss"):
                ax.set_yscale("log") if all(min(c[tag][1]) > 0 for c in per_seed.values() if tag in c) else None
        for ax in list(axes.flat)[len(tags):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        label = next(row["row"] for row, _, _ in entries if row["key"] == key)
        fig.suptitle(f"{table}: {label}: training curves", fontsize=10)
        fig.tight_layout()
        fig.savefig(folder / f"curves_{key}.png", dpi=90)
        plt.close(fig)
        curve_files.append((key, f"{table}/curves_{key}.png"))
    if curve_files:
        plots.append(("Training curves (every train/* scalar: loss terms, confident fraction conf_frac, tau, lr; "
                      "seeds overlaid)", curve_files))

    gap_lines = [l for l in lines if l["gap"] != ""]
    if gap_lines:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for line in gap_lines:
            for row, seed, run in entries:
                summary = run.summary(line["list"]) if row["key"] == line["key"] else None
                if summary:
                    ax.scatter(line["gap"], summary["dice"] * 100, color=colors[seed], s=14, alpha=0.7)
        measured = [l for l in gap_lines if l["dice_n"]]
        if measured:
            ax.errorbar([l["gap"] for l in measured], [l["dice_mean"] for l in measured],
                        yerr=[0 if math.isnan(l["dice_std"]) else l["dice_std"] for l in measured], fmt="o-",
                        color="black", capsize=3, label="this repository, mean ± std")
        ax.plot([l["gap"] for l in gap_lines], [l["paper_dice"] for l in gap_lines], "s--", color="red", label="paper")
        ax.set_xlabel("dropout-rate gap (P_s rate - P_w rate)")
        ax.set_ylabel("Dice (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "dice_vs_gap.png", dpi=110)
        plt.close(fig)
        plots.append(("Dice against the dropout-rate gap (points: seeds)", [("dice_vs_gap.png",
                                                                             f"{table}/dice_vs_gap.png")]))
    return plots


# ---------------------------------------------------------------------------------------------- README status
STATUS_BEGIN, STATUS_END = "<!-- status:begin -->", "<!-- status:end -->"
PAPER_NAMES = {"table1": "Table I", "table2": "Table II", "table4": "Table IV", "table5": "Table V", "fig5": "Fig. 5"}


def read_csv(path: Path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def status_block(out: Path, base: Path) -> str:
    """The README status table: each Table I / II row with the paper's figure beside this repository's (with its
    protocol and n seeds) or "not yet measured"; a line per ablation table. Links are relative to ``base``."""
    lines = ["| paper | row | list | paper: Dice / Jaccard / 95HD / ASD | this repository: Dice / Jaccard / 95HD / "
             "ASD | protocol |", "|---|---|---|---|---|---|"]
    for table in TABLES:
        rows = [r for r in ROWS if r["table"] == table]
        path = out / f"{table}.csv"
        measured = {(r["key"], r["list"]): r for r in read_csv(path) if int(r["n_seeds"])} if path.is_file() else {}
        link = f"[{table}.md]({os.path.relpath(out / f'{table}.md', base)})"
        if table in ("table4", "table5", "fig5"):  # ablations: one line, the table itself in results/
            n = len({key for key, _ in measured})
            lines.append(f"| {PAPER_NAMES[table]} | {TITLES[table].split(': ', 1)[1]} | test.list | "
                         f"{sum(bool(r['paper']) for r in rows)} of {len(rows)} rows with a figure | "
                         + (f"{n} of {len(rows)} rows measured: {link}" if n else "not yet measured") + " | |")
            continue
        for row in rows:
            for list_name in row["lists"]:
                paper, r = row["paper"].get(list_name), measured.get((row["key"], list_name))
                if r:
                    ours = " / ".join((f"{float(r[m + '_mean']):.2f}" + (f" ± {float(r[m + '_std']):.2f}"
                                                                           if r[m + "_std"] else ""))
                                      if r[m + "_mean"] else "-" for m in METRICS)
                    protocol = (f"n = {r['n_seeds']} seeds, final checkpoint, no post-processing, preset "
                                f"{r['preset']}, {r['iterations']} iterations ({link})"
                                + (f"; extra flags `{r['extra_flags']}`: a trial" if r["extra_flags"] else ""))
                else:
                    ours, protocol = "not yet measured", ""
                figures = " / ".join("-" if math.isnan(v) else f"{v:.2f}" for v in paper) if paper else "-"
                lines.append(f"| {PAPER_NAMES[table]} | {row['row']} | {list_name} | {figures} | {ours} | {protocol} |")
    return "\n".join(lines)


def update_readme(readme: Path, out: Path) -> None:
    text = readme.read_text()
    if text.count(STATUS_BEGIN) != 1 or text.count(STATUS_END) != 1 or text.index(STATUS_BEGIN) > text.index(STATUS_END):
        raise SystemExit(f"error: {readme}: expected one line '{STATUS_BEGIN}' and, after it, one line "
                         f"'{STATUS_END}' around the status block; add them where the table should go")
    head, rest = text.split(STATUS_BEGIN, 1)
    _, tail = rest.split(STATUS_END, 1)
    readme.write_text(f"{head}{STATUS_BEGIN}\n{status_block(out, readme.parent)}\n{STATUS_END}{tail}")
    print(f"rewrote the status block of {readme} from {out}")


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table == "readme":
        update_readme(resolve(args.readme), args.out)
        return 0
    tables = list(TABLES) if args.table == "all" else [args.table]
    runs, per_table = plan(args, tables)
    if args.dry_run:
        dry_run(runs, per_table, args)
        return 0
    code = 0
    if not args.aggregate_only:
        ensure_demo_data(runs)
        check_data(runs)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the children too, as Ctrl-C does
        code = Scheduler(runs, [e for entries in per_table.values() for e in entries], args).run_all()
    for table in tables:
        csv_path, md_path = write_table(table, per_table[table], args)
        if md_path:
            print(f"wrote {md_path} and {csv_path}")
    return code


def check_data(runs) -> None:
    """Every data root has the training list and the evaluated lists (one line naming what is missing)."""
    for (name, root), lists in {(r.data_name, r.root): r.lists + [r.config["train_list"]] for r in runs}.items():
        missing = [l for l in lists if not (root / l).is_file()]
        if missing:
            raise SystemExit(f"error: no {name.upper()} data at {root} ({', '.join(missing)} missing): set "
                             f"{name.upper()}_ROOT or --{name}_root (README, 'Data'), or try --demo")


STATE_WORDS = {"train": "to train", "restart": "to train afresh", "resume": "to resume", "evaluate": "to evaluate",
               "finished": "finished", "conflict": "in conflict (trained with other settings)"}


def dry_run(runs, per_table, args) -> None:
    for run in runs:
        state = run.state()
        shared = f" (also {', '.join(r['table'] + '/' + r['key'] for r in run.rows[1:])})" if len(run.rows) > 1 else ""
        print(f"# {run.name}{shared}: {STATE_WORDS[state]}, run folder {shell([str(run.run_dir)])}"
              + (f": {', '.join(run.conflicts())}" if state == "conflict" else ""))
        for cmd in run.commands(state):
            print("  " + shell(cmd))
    print()
    for table, entries in per_table.items():
        n_rows = len({row["key"] for row, _, _ in entries})
        shared = sum(row is not run.rows[0] for row, _, run in entries)
        states = [run.state() for _, _, run in entries]
        iters = sorted({f"{run.config['max_iterations']} iterations" if run.config.get("max_iterations") else
                        f"{run.config.get('epochs')} epochs" for _, _, run in entries})
        print(f"{table}: {n_rows} rows x {len(args.seeds)} seeds = {len(entries)} runs"
              + (f" ({shared} of them another table's run with the same settings)" if shared else "")
              + f", {' / '.join(iters)} each; "
              + ", ".join(f"{states.count(s)} {STATE_WORDS[s]}" for s in STATE_WORDS if states.count(s)))
    print(f"{args.table}: {len(runs)} distinct runs; tables into {args.out}, run folders under "
          f"{resolve(args.runs_dir)}")


if __name__ == "__main__":
    sys.exit(main())
