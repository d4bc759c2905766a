"""The paper's tables in one command: every row over several seeds, the final checkpoints evaluated under one
named protocol, mean +- std beside the paper's figures, and plots (docs/REPRODUCE.md).

    python code/reproduce.py table1                        # Table I: LA 4 / 8 / 16 labeled, supervised and CrossMatch
    python code/reproduce.py all --dry_run                 # every command and run folder; nothing is run
    python code/reproduce.py table5 --jobs 4 --gpus 0,1    # four trainings at once, spread over two GPUs
    python code/reproduce.py table1 -- --max_iterations 500   # extra training flags: a short trial, marked as one
    python code/reproduce.py --demo                        # synthetic data on the CPU, into results/demo/
    python code/reproduce.py readme                        # README.md's status block from results/
    python code/reproduce.py table1 --launcher slurm --slurm_partition gpu   # each run a Slurm job (submitit)

TABLE is table1, table2, table4, table5, fig5 or all (these five), or table3 (CML's Table 3, BraTS2019) or pancreas
(Pancreas-CT), the other 3D data sets (docs/DATASETS.md). Each (row, seed) trains in its own run folder, named by
the training script from --exp <table>_<row>_<preset>_s<seed> (rows with identical training settings share one
run). A finished run is skipped, an interrupted one resumed (--resume), and the final checkpoint is evaluated
by the test script. Tables go to <out>/<table>.md and .csv, plots to <out>/<table>/. The parts are in
code/reproduction/: rows.py (the rows, as data), runs.py, local.py and slurm.py (the launchers), progress.py,
aggregate.py, plots.py, readme.py.
"""
import argparse
import os
import signal
import sys

from utils import resolve
from reproduction.aggregate import write_table
from reproduction.local import run_local
from reproduction.readme import update_readme
from reproduction.rows import DEMO_SEEDS, MORE_ROOTS, MORE_TABLES, TABLES
from reproduction.runs import STATE_WORDS, check_data, ensure_demo_data, plan, shell


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
                                          "run needs about 10 GiB of GPU memory, so several fit on one GPU; "
                                          "--launcher slurm: the job array's throttle, default 256)")
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
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: the runs on this machine, --jobs at once; slurm: each run a Slurm job, through submitit")
    s = p.add_argument_group("--launcher slurm (docs/REPRODUCE.md, \"On a Slurm cluster\")")
    s.add_argument("--slurm_partition", help="the partition (default: the cluster's)")
    s.add_argument("--slurm_time", type=int, help="minutes per job (default: the longest run's iterations at "
                                                  "0.32 s each, the paper's speed and half again, plus 15)")
    s.add_argument("--slurm_gpus", type=int, default=1, help="GPUs per job (default 1; 0: none asked for)")
    s.add_argument("--slurm_cpus", type=int, help="CPUs per job (default the loader's --num_workers + 2)")
    s.add_argument("--slurm_mem", help="memory per job, as sbatch --mem takes it (32G; default: the cluster's)")
    s.add_argument("--slurm_account", help="the account charged")
    s.add_argument("--slurm_qos", help="the quality of service")
    s.add_argument("--slurm_extra", action="append", default=[], metavar="KEY=VALUE",
                   help="anything else: a submitit parameter by its name (signal_delay_s=120), else sbatch "
                        "--KEY=VALUE (constraint=a100); repeatable")
    s.add_argument("--slurm_requeues", type=int, default=3,
                   help="times a job may be requeued (preemption, time limit) before its run is reported failed")
    s.add_argument("--slurm_poll", type=float, default=30, help="seconds between looks at the queue (squeue)")
    args = p.parse_args(argv)
    slurm_given = [a.option_strings[0] for a in s._group_actions if getattr(args, a.dest) != a.default]
    if args.launcher == "local" and slurm_given:
        p.error(f"{', '.join(slurm_given)}: only with --launcher slurm")
    if args.launcher == "slurm" and args.gpus:
        p.error("--gpus: only with --launcher local (Slurm hands each job its --slurm_gpus)")
    if any("=" not in kv for kv in args.slurm_extra):
        p.error(f"--slurm_extra {next(kv for kv in args.slurm_extra if '=' not in kv)}: expected KEY=VALUE")
    args.slurm_extra = [tuple(kv.split("=", 1)) for kv in args.slurm_extra]
    if args.demo == (args.table is not None):
        p.error("give a TABLE or --demo (one of them)")
    args.gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    if args.launcher == "slurm":  # the array's throttle; default submitit's, 256: as many as the cluster gives
        args.jobs = args.jobs or 256
    args.jobs = args.jobs or (min(2, os.cpu_count() or 1) if args.demo and not args.gpus else max(1, len(args.gpus)))
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    args.table = "demo" if args.demo else args.table
    args.seeds = args.seeds or (DEMO_SEEDS if args.demo else [1337, 1338, 1339])
    args.out = resolve(args.out or ("results/demo" if args.demo else "results"))
    args.extra = extra
    return args


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
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # as Ctrl-C does (local: the children stop too)
        entries = [e for entries in per_table.values() for e in entries]
        if args.launcher == "slurm":
            from reproduction.slurm import run_slurm  # submitit only where it is used
            code = run_slurm(runs, entries, args)
        else:
            code = run_local(runs, entries, args)
    for table in tables:
        csv_path, md_path = write_table(table, per_table[table], args)
        if md_path:
            print(f"wrote {md_path} and {csv_path}")
    return code


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
    if args.launcher == "slurm":
        from reproduction.slurm import sbatch_lines
        todo = [r for r in runs if r.state() not in ("finished", "conflict")]
        print(f"\nSlurm: the {len(todo)} runs to do as one job array; each job gets (submitit's job script):")
        print("\n".join("  " + l for l in sbatch_lines(args, todo)) if todo else "  (nothing to submit)")


if __name__ == "__main__":
    sys.exit(main())
