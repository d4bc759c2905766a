"""--launcher slurm: each run one Slurm job, submitted through submitit (docs/REPRODUCE.md, "On a Slurm cluster").

The runs to do go in as one job array, ``--jobs`` of them at once. A job runs ``runs.execute``: the commands for
what its run folder holds when the job starts (``--resume`` when latest.pth is there, the evaluation alone when the
run is trained), so a job that Slurm requeues by itself (preemption, ``scontrol requeue``) resumes as well as one
that submitit requeues. The job id goes into the run folder (slurm_job.json, with links to the job's logs); a second
``reproduce.py`` finds it in the queue and submits nothing twice. The run folder says what is finished.

What this rests on (submitit 1.5.4's source, Slurm 22.05, both tried on tests/slurm.py's one-node cluster):
- Slurm signals every process of the job: USR2 ``signal_delay_s`` before the time limit (submitit's ``--signal``;
  Slurm 22.05 looks every 30 s, so it comes up to 30 s early), SIGTERM on preemption, ``scontrol requeue`` and
  ``scancel``. The training scripts stop on either at the end of the iteration, with latest.pth written
  (utils/signals.STOP_SIGNALS).
  submitit's handler in the job's own process ignores SIGTERM; on USR2 it asks ``RunJob.checkpoint`` for the job
  to run next, requeues the job (``scontrol requeue``) and exits: checkpoint first waits for the training to stop.
- without accounting (``sacct``) submitit cannot tell a job's state, so the queue (``squeue``) tells what is queued
  or running and the run folder what is finished.
- ``srun`` in Slurm 22.05 - 23.02 does not inherit ``--cpus-per-task``: the job script sets SRUN_CPUS_PER_TASK.
- the job's Python unpickles ``RunJob`` by its module's name: the job script puts code/ on PYTHONPATH.
"""
import json
import math
import os
import shlex
import subprocess
import sys
import time

import submitit
from submitit.slurm.slurm import _get_default_parameters, _make_sbatch_string

from utils import REPO_ROOT, resolve
from utils.signals import STOP_SIGNALS, signal_name
from reproduction.progress import Progress
from reproduction.runs import CODE, LOG, STATE_WORDS, child_env, execute, shell, write_json

SECONDS_PER_ITERATION = 0.21 * 1.5  # a planning estimate: the paper's Table III (210 ms a CrossMatch LA iteration
EVAL_MINUTES = 15                   # on its GPU) and half again; then start-up and the evaluations
JOB_FILE = "slurm_job.json"


# ----------------------------------------------------------------------------------------------- the job
class RunJob(submitit.helpers.Checkpointable):
    """One run as a Slurm job: ``runs.execute`` for what the run folder holds now. A training stopped by a stop
    signal (latest.pth written) ends the job quietly: Slurm or submitit requeues it, or it was cancelled."""

    def __init__(self, run, requeues: int, signal_delay_s: int):
        self.run, self.requeues, self.signal_delay_s, self.child = run, requeues, signal_delay_s, None

    def __call__(self) -> str:
        job, restarts = os.environ.get("SLURM_JOB_ID", "?"), int(os.environ.get("SLURM_RESTART_COUNT", 0))
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" \
            if "SLURM_ARRAY_JOB_ID" in os.environ else job
        where = f"Slurm job {job} on {os.uname().nodename}, start {restarts + 1}"
        if restarts > self.requeues:
            message = (f"requeued {restarts} times, more than --slurm_requeues {self.requeues}: not run again "
                       f"({STATE_WORDS[self.run.state()]}; python code/reproduce.py with the same arguments submits it "
                       "afresh)")
            with open(self.run.run_dir / LOG, "a") as log:
                log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} reproduce.py ({where}): {message}\n")
            raise RuntimeError(f"{self.run.run_dir}: {message}")
        code, cmd = execute(self.run, child_env(int(os.environ.get("SLURM_CPUS_PER_TASK", 1))), where, self.started)
        if code == 0:
            return "finished"
        if -code in STOP_SIGNALS or code - 128 in STOP_SIGNALS:
            return f"stopped by {signal_name(abs(code) % 128)}: latest.pth kept for the next start"
        raise RuntimeError(f"{self.run.run_dir}: exit {code}: {shell(cmd)}")

    def started(self, proc) -> None:
        self.child = proc

    def checkpoint(self, *args, **kwargs):
        """submitit, on USR2 (the time limit is near): Slurm signalled the training too; wait for it to finish its
        iteration, write latest.pth and stop (without reaping it: the job's main thread waits on it), then the same
        job goes back in the queue and resumes from the run folder."""
        deadline = time.time() + max(10, self.signal_delay_s - 10)
        while self.child and time.time() < deadline:
            try:
                if os.waitid(os.P_PID, self.child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                    break
            except ChildProcessError:  # already reaped
                break
            time.sleep(0.2)
        return submitit.helpers.DelayedSubmission(RunJob(self.run, self.requeues, self.signal_delay_s))


# ------------------------------------------------------------------------------------------ the job array
def job_minutes(run):
    """The time a run's job asks for: its iterations at SECONDS_PER_ITERATION, plus EVAL_MINUTES; None while the
    length is unknown (ACDC in epochs before its data is there)."""
    iterations = run.config.get("max_iterations")
    return math.ceil(iterations * SECONDS_PER_ITERATION / 60) + EVAL_MINUTES if iterations else None


def slurm_parameters(args, runs) -> dict:
    """submitit's SlurmExecutor parameters of the array (each becomes an #SBATCH line or the job script's set-up)."""
    minutes = [job_minutes(r) for r in runs]
    params = dict(job_name=f"reproduce_{args.table}", nodes=1, ntasks_per_node=1,
                  time=args.slurm_time or (max(minutes) if None not in minutes else None),
                  cpus_per_task=args.slurm_cpus or max(r.config.get("num_workers") or 0 for r in runs) + 2,
                  array_parallelism=args.jobs, signal_delay_s=90,
                  setup=["export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun 22.05-23.02 does not inherit it",
                         f"export PYTHONPATH={shlex.quote(str(CODE))}${{PYTHONPATH:+:$PYTHONPATH}}",
                         f"cd {shlex.quote(str(REPO_ROOT))}"])
    if args.slurm_gpus:
        params["gpus_per_node"] = args.slurm_gpus
    for name in ("partition", "mem", "account", "qos"):
        if getattr(args, f"slurm_{name}"):
            params[name] = getattr(args, f"slurm_{name}")
    defaults = _get_default_parameters()
    for key, value in args.slurm_extra:  # submitit's own parameters by their name, else sbatch --key=value
        if key in defaults and key != "additional_parameters":
            kind = type(defaults[key])
            if kind is int and not value.lstrip("-").isdigit():
                raise SystemExit(f"error: --slurm_extra {key}={value}: expected a whole number (submitit's {key})")
            params[key] = value.lower() in ("1", "true", "yes") if kind is bool else int(value) if kind is int else value
        else:
            params.setdefault("additional_parameters", {})[key] = value
    return params


def sbatch_lines(args, runs) -> list:
    """The #SBATCH lines and set-up of the job script the array gets, as submitit writes it."""
    params = slurm_parameters(args, runs)
    if params["time"] is None:
        params["time"] = "?"
    text = _make_sbatch_string(command="python -m submitit.core._submit ...", folder=jobs_folder(args),
                               map_count=len(runs), **params)
    return [l for l in text.splitlines() if l.startswith("#SBATCH") or l.startswith("export") or l.startswith("cd ")]


def jobs_folder(args):
    return resolve(args.runs_dir) / "slurm_jobs"  # submitit's job scripts, pickles and the jobs' logs


def submit(runs, args) -> dict:
    """One job array for ``runs``; each run folder gets its job id (slurm_job.json) and links to the job's logs."""
    params = slurm_parameters(args, runs)
    if params["time"] is None:
        raise SystemExit("error: --slurm_time: the runs' length is unknown (no data yet); give the minutes per job")
    executor = submitit.AutoExecutor(folder=jobs_folder(args), cluster="slurm",
                                     slurm_max_num_timeout=args.slurm_requeues)
    executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    try:
        with executor.batch():
            jobs = [executor.submit(RunJob(run, args.slurm_requeues, params["signal_delay_s"])) for run in runs]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
        why = str(e).strip().splitlines()[-1]
        raise SystemExit(f"error: sbatch refused the job array of {len(runs)} runs: {why}") from None
    ids = {}
    for run, job in zip(runs, jobs):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        logs = {"stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
        write_json(run.run_dir / JOB_FILE,
                   dict(job_id=job.job_id, submitted=time.strftime("%Y-%m-%d %H:%M:%S"), **logs))
        for suffix, target in (("out", logs["stdout"]), ("err", logs["stderr"])):
            link = run.run_dir / f"slurm-{job.job_id}.{suffix}"
            if not link.is_symlink():
                link.symlink_to(target)
        ids[run] = job.job_id
    return ids


def recorded_job(run):
    try:
        return json.loads((run.run_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None


def queue():
    """``{job id: (state, reason)}`` of this user's jobs in the queue (array elements one by one), or None when
    squeue fails (nothing is concluded then)."""
    r = subprocess.run(["squeue", "--me", "--noheader", "--array", "--format=%i|%T|%r"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return {i: (state, reason) for i, state, reason in (l.split("|") for l in r.stdout.splitlines() if l.count("|") == 2)}


# ------------------------------------------------------------------------------------------------- watching
def run_slurm(runs, entries, args, out=sys.stdout) -> int:
    """Submit the runs not finished and not already queued, then wait for their jobs (polling squeue) and report
    each from its run folder; exit status 1 when one failed. Ctrl-C leaves the jobs running and says how to cancel."""
    report = Progress(runs, entries, min(args.jobs, len(runs)), out)
    todo = report.start(f"on Slurm, at most {min(args.jobs, len(runs))} at once")
    jobs, now = {}, queue()
    if now is None:
        raise SystemExit("error: squeue failed: is this a Slurm login node? (--launcher slurm needs squeue and sbatch)")
    for run in todo:
        record = recorded_job(run)
        if record and record["job_id"] in now:
            jobs[run] = record["job_id"]
            report.say(f"attached: {run.name} is Slurm job {record['job_id']} ({now[record['job_id']][0].lower()}, "
                       f"submitted {record['submitted']}): not submitted again")
    fresh = [r for r in todo if r not in jobs]
    try:
        if fresh:
            ids = submit(fresh, args)
            jobs.update(ids)
            arrays = ", ".join(sorted({i.split("_")[0] for i in ids.values()}))
            report.say(f"submitted {len(fresh)} jobs (Slurm job {arrays}), at most {min(args.jobs, len(fresh))} at "
                       f"once; each run folder holds {JOB_FILE} and its job's logs (slurm-<job>.out / .err)")
        missing, first_start = set(), {}  # jobs not in the queue at the last look (ended if still missing now)
        while jobs:
            now = queue()
            for run, job in list(jobs.items()) if now is not None else []:
                if job in now:
                    missing.discard(job)
                    if now[job][0] == "RUNNING":
                        report.started.setdefault(run, time.time())
                        first_start.setdefault(run, time.time())
                        continue
                elif job in missing:  # twice: a requeue's moment out of the queue is not an end
                    del jobs[run]
                    run.duration = time.time() - first_start[run] if run in first_start else None
                    finished_job(report, run, job)
                else:
                    missing.add(job)
                report.started.pop(run, None)  # not running now (queued again, or ended)
            report.progress(sum(1 for j in jobs.values() if now and now.get(j, ("",))[0] == "PENDING"))
            if jobs:
                time.sleep(args.slurm_poll)
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, int):
            raise  # an error line (sbatch refused the array): nothing was submitted
        ids = sorted(jobs.values())
        report.say(f"stopped waiting; {len(ids)} Slurm jobs still queued or running: {' '.join(ids)}. They go on: "
                   f"the same command again waits for them (it submits nothing twice); `scancel {' '.join(ids)}` "
                   f"cancels them" if ids else "stopped waiting; no job of these runs is in the queue")
        raise SystemExit(130 if isinstance(e, KeyboardInterrupt) else e.code) from None
    report.progress(0, final=True)
    return 1 if report.failed else 0


def finished_job(report, run, job) -> None:
    """A job left the queue: the run folder says whether its run is finished (``run.duration``: the seconds since
    the job was first seen running, requeues included)."""
    state = run.state()
    if state == "finished":
        report.done_run(run)
        return
    record = recorded_job(run) or {}
    try:
        err = [l for l in open(record.get("stderr", "")).read().splitlines() if l.strip(" ^~")][-4:]
    except OSError:
        err = []
    report.failed_run(run, f"(Slurm job {job} ended, its run not finished: {STATE_WORDS[state]}; run folder {run.run_dir})"
                      + (f"\n  last lines of the job's log {record['stderr']}:\n" + "\n".join("    " + l for l in err)
                         if err else ""))
