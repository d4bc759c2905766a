"""The runs of the tables: each (row, seed) as a ``Run`` (its run folder, state and commands), planned from the rows
(``plan``), and ``execute``, which runs one run's commands into its log; both launchers (local.py, slurm.py)
call it, so a run does the same wherever it runs (docs/REPRODUCE.md, "What a run does")."""
import contextlib
import hashlib
import importlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from utils import REPO_ROOT, resolve
from utils.datasets import saved_args
from utils.flags import CML_DEFAULTS, RESUME_MAY_DIFFER
from reproduction.rows import DEMO_DATA, MORE_ROOTS, ROWS

CODE = REPO_ROOT / "code"
LOG = "reproduce_output.log"  # the commands' output, in the run folder
STATE_WORDS = {"train": "to train", "restart": "to train afresh", "resume": "to resume", "evaluate": "to evaluate",
               "finished": "finished", "conflict": "in conflict (trained with other settings)"}


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


def flag_value(argv: list, flag: str):
    """The value of the last ``flag VALUE`` in ``argv``, or None."""
    return next((argv[i + 1] for i in range(len(argv) - 2, -1, -1) if argv[i] == flag), None)


def train_argv(row, seed, args, root) -> list:
    preset = [] if row.get("cml") else ["--preset", args.preset]  # CML has no presets
    exp = f"{row['table']}_{row['key']}{'' if row.get('cml') else '_' + args.preset}_s{seed}{extra_tag(args.extra)}"
    trial = []
    short = flag_value(args.extra, "--max_iterations")
    if row.get("cml") and short is not None and flag_value(args.extra, "--pre_iterations") is None:
        # a short trial of a CML row keeps the row's share of pre-training (LA 2000 of 17000)
        full = {k: int(flag_value(row["flags"], f"--{k}") or CML_DEFAULTS[row["task"]][k])
                for k in ("pre_iterations", "max_iterations")}
        trial = ["--pre_iterations", str(int(short) * full["pre_iterations"] // full["max_iterations"])]
    return [*row["flags"], *preset, "--seed", str(seed), "--exp", exp, "--out_dir", str(resolve(args.runs_dir)),
            "--root_path", str(root), *args.extra, *trial]


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


def check_data(runs) -> None:
    """Every data root has the training list and the evaluated lists (one line naming what is missing)."""
    for (name, root), lists in {(r.data_name, r.root): r.lists + [r.config["train_list"]] for r in runs}.items():
        missing = [l for l in lists if not (root / l).is_file()]
        if missing:
            raise SystemExit(f"error: no {name.upper()} data at {root} ({', '.join(missing)} missing): set "
                             f"{name.upper()}_ROOT or --{name}_root (README, 'Data'), or try --demo")





def child_env(threads: int) -> dict:
    """The environment of a run's commands: unbuffered, sparse progress bars, ``threads`` OpenMP threads unless
    OMP_NUM_THREADS / MKL_NUM_THREADS are set."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30", "TQDM_MAXINTERVAL": "120"}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(max(1, threads)))
    return env


KEPT = (LOG, "slurm_job.json")  # a run folder cleared for a fresh start keeps these (and the slurm-* job logs)


def execute(run, env, where: str, started=lambda proc: None) -> tuple:
    """The run's commands for its state on disk now, in order, their output appended to <run folder>/reproduce_output.log
    under a header naming ``where`` they run; ``started(proc)`` is told of each child. Returns ``(exit code,
    command)`` of the first command that fails, or ``(0, None)``; an OSError (the run folder cannot be written)
    fails the run with exit code 1."""
    try:
        state = run.state()
        log_path = run.run_dir / LOG
        if state == "restart":  # a folder without any checkpoint (died before its first save): start afresh
            for p in run.run_dir.iterdir():
                if p.name not in KEPT and not p.name.startswith("slurm-"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        run.run_dir.mkdir(parents=True, exist_ok=True)
        start, cmds = time.time(), run.commands(state)
        with open(log_path, "a") as log:
            for cmd in cmds:
                log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} reproduce.py ({state}, {where}): "
                          f"{shell(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
                started(proc)
                code = proc.wait()
                if code != 0:
                    return code, cmd
        run.duration = time.time() - start
        gpu = env.get("CUDA_VISIBLE_DEVICES")
        record = run.run_dir / "reproduce.json"
        history = json.loads(record.read_text()) if record.is_file() else []
        history.append({"state": state, "commands": [shell(c) for c in cmds], "where": where,
                        "cuda_visible_devices": gpu, "device_name": device_name(gpu),
                        "seconds": round(run.duration, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        write_json(record, history)
        return 0, None
    except OSError as e:  # this run fails, the others go on
        return 1, [f"(reproduce.py: {e})"]


def write_json(path: Path, value) -> None:
    """``value`` as JSON at ``path``, through a temporary file renamed into place (a job stopped mid-write by its
    signal leaves the old file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def log_tail(run, n=15) -> str:
    """The last ``n`` non-empty lines of the run's reproduce_output.log, indented, under a line naming it."""
    log = run.run_dir / LOG
    lines = [l for l in re.split(r"[\r\n]+", log.read_text(errors="replace")) if l.strip()] if log.is_file() else []
    return f"  last lines of {log}:\n" + "\n".join("    " + l for l in lines[-n:])
