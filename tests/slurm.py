"""reproduce.py --launcher slurm against a real Slurm (issue 21; docs/REPRODUCE.md, "On a Slurm cluster"); .ci/run runs
it after tests/faults.py. It installs Debian's slurm-wlm and munge with apt-get when they are missing, writes a
one-node slurm.conf for this machine into a temporary folder, starts munged, slurmctld and slurmd there (their own
ports and munge socket), and stops them at the end, also when a case fails. The cases run the real scripts on tiny
synthetic LA data, one thread per process, and print one line each: the case, its seconds, what happened.

    requeued      the demo table through Slurm equals the local launcher's (same seeds, one thread); its CrossMatch
                  run is requeued mid-training by `scontrol requeue` (SIGTERM) and by a time limit shorter than the
                  run (submitit's USR2, then its requeue), resumes each time from its run folder, and its final
                  checkpoint equals the local, uninterrupted run's
    bad_flag      four jobs, one at once, `-- --labelnum 5` (all 5 training cases labeled: CrossMatch has no
                  unlabeled case): a first reproduce.py is stopped (Ctrl-C) while the jobs are queued and names them;
                  a second one submits nothing twice, waits, reports each failed job with its run folder, job id and
                  its log's last lines, and the supervised jobs finish

    python tests/slurm.py                 # both cases (about 5 minutes on 2 cores, once Slurm is installed)
    python tests/slurm.py bad_flag        # one of them

Needs root (apt-get, the daemons); without it every case is skipped, with the reason. Exit status 1 when a case fails.
"""
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

from utils.synthetic import make_la  # noqa: E402
from test_resume import assert_same_training_state  # noqa: E402

TINY = ["--patch_size", "16", "16", "16", "--log_every", "1", "--image_every", "1000", "--save_every", "5"]
SLURM = ["--launcher", "slurm", "--slurm_gpus", "0", "--slurm_cpus", "1", "--slurm_poll", "2"]
METRIC_COLUMNS = ("n_seeds", "dice_mean", "jaccard_mean", "hd95_mean", "asd_mean", "n_cases", "iterations")


class Failed(AssertionError):
    pass


class Skip(Exception):
    pass


def check(condition, what):
    if not condition:
        raise Failed(what)


def sh(*cmd, env=None, check=True) -> str:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise Failed(f"{' '.join(cmd)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


# --------------------------------------------------------------------------------------------- the cluster
def install() -> float:
    """apt-get install slurm-wlm and munge when slurmctld, slurmd or munged are missing; the seconds it took."""
    if all(shutil.which(p) or Path(f"/usr/sbin/{p}").is_file() for p in ("slurmctld", "slurmd", "munged", "sbatch")):
        return 0.0
    t0 = time.time()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh("apt-get", "update", "-q", env=env)
    sh("apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge", env=env)
    return time.time() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """munged, slurmctld and slurmd on this machine, everything of theirs in ``folder``; ``env`` points the Slurm
    commands (sbatch, squeue, scontrol; submitit's too) at it. Stopped on leaving, by the pids they wrote."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                        PYTHONUNBUFFERED="1")

    def __enter__(self):
        self.dir.mkdir(parents=True)
        (self.dir / "state").mkdir()
        (self.dir / "spool").mkdir()
        d, host = self.dir, socket.gethostname().split(".")[0]
        node = re.sub(r"\s*UpTime=\S+", "", sh("slurmd", "-C").splitlines()[0]).split(None, 1)[1]  # CPUs=... RealMemory=...
        (d / "slurm.conf").write_text("\n".join([
            "ClusterName=ci", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={d}/munge.socket,cred_expire=10",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU_Memory", "DefMemPerCPU=2048", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none", "ReturnToService=2", "MailProg=/bin/true",
            "SchedulerParameters=sched_interval=5", f"NodeName={host} {node} State=UNKNOWN",
            f"PartitionName=ci Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
        try:
            sh("munged", "--force", f"--socket={d}/munge.socket", f"--pid-file={d}/munged.pid",
               f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed")
            sh("slurmctld", "-f", str(d / "slurm.conf"), env=self.env)
            sh("slurmd", "-f", str(d / "slurm.conf"), env=self.env)
            deadline = time.time() + 60
            while sh("sinfo", "--noheader", "--format=%T", env=self.env, check=False).strip() != "idle":
                if time.time() > deadline:
                    raise Failed(f"the node is not idle after 60 s: {sh('sinfo', env=self.env, check=False)}")
                time.sleep(0.5)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if (self.dir / "slurmctld.pid").is_file():
            sh("scancel", "--me", env=self.env, check=False)
            deadline = time.time() + 60
            while self.queue() and time.time() < deadline:
                time.sleep(0.5)
        for daemon in ("slurmd", "slurmctld", "munged"):
            try:
                pid = int((self.dir / f"{daemon}.pid").read_text())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            deadline = time.time() + 30
            while Path(f"/proc/{pid}").exists() and time.time() < deadline:
                time.sleep(0.1)

    def queue(self) -> dict:
        """``{job id: "STATE reason"}`` of the queue, array elements one by one."""
        out = sh("squeue", "--noheader", "--array", "--format=%i|%T|%r", env=self.env, check=False)
        return dict(l.split("|", 1) for l in out.splitlines() if "|" in l)


class Watcher(threading.Thread):
    """Looks at the queue every half second: records each job's changes of state (the squeue lines shown in the
    report) and calls ``act(queue)`` on each look. A requeued job waits for its BeginTime, cred_expire (10 s) after
    its end: releasing it at once (`scontrol update StartTime=now`) lost a job that submitit had requeued, twice."""

    def __init__(self, cluster, act=lambda queue: None):
        super().__init__(daemon=True)
        self.cluster, self.act, self.seen, self.changes, self.stop = cluster, act, {}, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            queue = self.cluster.queue()
            for job, state in [*queue.items(), *((j, "not in the queue") for j in self.seen if j not in queue)]:
                if self.seen.get(job) != state:
                    self.seen[job] = state
                    self.changes.append(f"{time.strftime('%H:%M:%S')} {job} {state.replace('|', ' ')}")
            self.act(queue)
            time.sleep(0.5)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()


def reproduce(*args) -> list:
    return [sys.executable, str(REPO / "code" / "reproduce.py"), *map(str, args)]


def shown(cmd) -> str:
    return "  $ python " + " ".join(cmd[1:]).replace(f"{REPO}/", "")


def read_table(path) -> dict:
    with open(path) as f:
        return {(r["key"], r["list"]): {c: r[c] for c in METRIC_COLUMNS} for r in csv.DictReader(f)}


def run_folder(runs_dir, key) -> Path:
    return next(Path(runs_dir).glob(f"LA_demo_{key}_*"))


def logged_iteration(run_dir) -> int:
    try:
        found = re.findall(r"\bit (\d+)/", (run_dir / "log.txt").read_text())
    except OSError:
        return 0
    return int(found[-1]) if found else 0


# ----------------------------------------------------------------------------------------------- the cases
def requeued(cluster, base, root) -> str:
    # a one-minute limit, USR2 20 s before it: Slurm 22.05 looks every 30 s and signals at the first look within 50 s
    # of the limit, 10 to 40 s after a start (never while the job's Python starts). 200 iterations: after the
    # requeue at about 20, more training than one start allows even at 5 it/s, so the time limit stops it too
    iters = 200
    demo = ["--demo", "--seeds", "1", "--la_root", root]
    flags = ["--", "--max_iterations", iters, *TINY]
    local = subprocess.run(reproduce(*demo, "--jobs", "2", "--runs_dir", base / "local", "--out",
                                     base / "local_out", *flags), env=cluster.env, capture_output=True, text=True)
    check(local.returncode == 0, f"the local launcher failed: {local.stdout[-2000:]} {local.stderr[-2000:]}")

    runs_dir, requeued_at, running_since = base / "slurm_runs", [], {}

    def requeue_once(queue):
        """`scontrol requeue` the CrossMatch job once, while it trains (its latest.pth written since the job
        started), past iteration 15 and not near the end."""
        if requeued_at:
            return
        try:
            run_dir = run_folder(runs_dir, "crossmatch")
            job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
            saved = (run_dir / "latest.pth").stat().st_mtime
        except (StopIteration, OSError, ValueError):
            return
        if not queue.get(job, "").startswith("RUNNING"):
            running_since.pop(job, None)
            return
        since = running_since.setdefault(job, time.time())
        it = logged_iteration(run_dir)
        if saved > since + 1 and 15 <= it <= iters - 40:
            sh("scontrol", "requeue", job, env=cluster.env)
            requeued_at.append((job, it))

    args = reproduce(*demo, *SLURM, "--slurm_time", 1, "--slurm_extra", "signal_delay_s=20", "--slurm_requeues", 10,
                     "--runs_dir", runs_dir, "--out", base / "slurm_out", *flags)
    print(shown(args))
    t0 = time.time()
    with Watcher(cluster, requeue_once) as watcher:
        r = subprocess.run(args, env=cluster.env, capture_output=True, text=True, timeout=900)
    seconds = time.time() - t0
    print("\n".join("  | " + l for l in r.stdout.splitlines()))
    check(r.returncode == 0, f"reproduce.py --launcher slurm: exit {r.returncode}: {r.stderr[-2000:]}; squeue: "
                             + "; ".join(watcher.changes))
    check(requeued_at, "the CrossMatch job was never seen running past iteration 15 (no scontrol requeue sent)")
    slurm_table, local_table = read_table(base / "slurm_out" / "demo.csv"), read_table(base / "local_out" / "demo.csv")
    check(slurm_table == local_table, f"the tables differ: slurm {slurm_table} local {local_table}")

    run_dir = run_folder(runs_dir, "crossmatch")
    log = (run_dir / "reproduce_output.log").read_text()
    starts = re.findall(r"^===== .* reproduce\.py \((\w+), Slurm job (\S+) on \S+, start (\d+)\): python (\S+)", log, re.M)
    stops = [l for l in log.splitlines() if re.search(r"SIGTERM|SIGUSR2", l) and "latest.pth" in l]
    print("  squeue, the CrossMatch job:\n" + "\n".join(
        "    " + c for c in watcher.changes if c.split()[1] == requeued_at[0][0]))
    print("  its reproduce_output.log:\n" + "\n".join(
        "    " + l for l in log.splitlines() if l.startswith("=====") or l in stops))
    job_log = Path(json.loads((run_dir / "slurm_job.json").read_text())["stderr"]).read_text()
    print("  its job log (submitit):\n" + "\n".join(
        "    " + l for l in job_log.splitlines() if re.search(r"Starting with|Caught signal|Requeued|SIGTERM", l)))
    check(any("SIGTERM" in l for l in stops), "no training stopped by SIGTERM (scontrol requeue) in the log")
    check(any("SIGUSR2" in l for l in stops), "no training stopped by SIGUSR2 (the time limit) in the log")
    resumed = [s for s in starts if s[0] == "resume" and s[3] == "code/train_la.py"]
    check(len(resumed) >= 2, f"expected two resumed trainings or more, the log has {starts}")
    final = f"iter_{iters}.pth"
    assert_same_training_state(run_dir / final, run_folder(base / "local", "crossmatch") / final)
    sup = run_folder(runs_dir, "supervised")
    assert_same_training_state(sup / final, run_folder(base / "local", "supervised") / final)
    line = ", ".join(f"{k}: dice {v['dice_mean']} hd95 {v['hd95_mean']}" for (k, _), v in sorted(slurm_table.items()))
    return (f"tables equal (local {line}); CrossMatch: scontrol requeue at iteration {requeued_at[0][1]}, "
            f"{len(stops)} stops, {len(resumed)} resumes, {len(starts)} commands in {max(int(s[2]) for s in starts)} "
            f"job starts; final checkpoints equal the local ones; slurm launcher {seconds:.0f} s")


def bad_flag(cluster, base, root) -> str:
    runs_dir = base / "bad_runs"
    args = reproduce("--demo", "--seeds", 2, 3, "--la_root", root, *SLURM, "--jobs", 1, "--slurm_time", 5,
                     "--runs_dir", runs_dir, "--out", base / "bad_out", "--", "--max_iterations", 20, "--labelnum", 5,
                     *TINY)
    print(shown(args))
    first = subprocess.Popen(args, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = ""
    try:
        while "submitted" not in out and first.poll() is None:
            out += first.stdout.readline()
        check(first.poll() is None, f"the first reproduce.py ended: {out[-2000:]}")
        first.send_signal(signal.SIGINT)
        out += first.communicate(timeout=60)[0]
    finally:
        if first.poll() is None:
            first.kill()
    print("\n".join("  1| " + l for l in out.splitlines()))
    queued = cluster.queue()
    recorded = {p.parent.name: json.loads(p.read_text())["job_id"] for p in runs_dir.glob("*/slurm_job.json")}
    check(first.returncode != 0 and "still queued or running" in out and "scancel" in out,
          f"the first reproduce.py, stopped, did not name the queued jobs: {out[-2000:]}")
    check(len(recorded) == 4 and all(j in out for j in recorded.values()), f"job ids {recorded} not in {out[-1500:]}")
    check(sum(j in queued for j in recorded.values()) >= 3, f"expected the jobs still queued: {queued}")

    second = subprocess.run(args, env=cluster.env, capture_output=True, text=True, timeout=600)
    print("\n".join("  2| " + l for l in second.stdout.splitlines()))
    again = {p.parent.name: json.loads(p.read_text())["job_id"] for p in runs_dir.glob("*/slurm_job.json")}
    check(again == recorded and not re.search(r"^submitted", second.stdout, re.M),
          f"the second reproduce.py submitted again: {recorded} -> {again}")
    check(second.stdout.count("attached:") == sum(j in queued for j in recorded.values()),
          f"not every queued job was attached: {second.stdout[-2000:]}")
    check(second.returncode == 1, f"expected exit status 1 (two runs failed), got {second.returncode}")
    failed = re.findall(r"^FAILED: demo/crossmatch seed (\d) \(Slurm job (\S+) ended, its run not finished: to train; "
                        r"run folder (\S+)\)", second.stdout, re.M)
    check(sorted(s for s, _, _ in failed) == ["2", "3"], f"expected both CrossMatch runs failed: {second.stdout}")
    check(second.stdout.count("error: --labelnum 5: all 5 cases of train.list labeled") >= 2,
          "the failed jobs' log lines (the training's error) are not shown")
    check(all(f"done: demo/supervised seed {s}" in second.stdout for s in (2, 3)), "the supervised runs did not finish")
    table = read_table(base / "bad_out" / "demo.csv")
    check(table[("supervised", "test.list")]["n_seeds"] == "2" and table[("crossmatch", "test.list")]["n_seeds"] == "0",
          f"the table: {table}")
    return (f"4 jobs ({', '.join(sorted(recorded.values()))}), first reproduce.py stopped with them queued, the second "
            f"attached to {second.stdout.count('attached:')} and submitted none; 2 CrossMatch jobs failed with their "
            "logs' last lines, 2 supervised finished")


CASES = {"requeued": requeued, "bad_flag": bad_flag}


def main(names) -> int:
    t_all = time.time()
    if os.geteuid() != 0:
        for name in names or CASES:
            print(f"{name:<10} skipped: needs root (apt-get, munged, slurmctld, slurmd)")
        return 0
    installed = install()
    print(f"slurm-wlm and munge: {'installed in %.0f s' % installed if installed else 'already installed'}",
          flush=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = make_la(base / "LA", n_train=5, n_test=2, shape=(36, 36, 24), seed=0)
        t0 = time.time()
        try:
            with Cluster(base / "cluster") as cluster:
                print(f"cluster up in {time.time() - t0:.1f} s ({sh('sinfo', '--version', env=cluster.env).strip()}): "
                      f"{sh('sinfo', env=cluster.env).splitlines()[-1]}", flush=True)
                for name in names or CASES:
                    t0 = time.time()
                    try:
                        result, status = CASES[name](cluster, base / name, root), "ok"
                    except (Failed, AssertionError) as e:
                        result, status, failed = str(e), "FAILED", failed + 1
                    print(f"{name:<10} {status:<8} {time.time() - t0:6.1f} s  {result}", flush=True)
        except Failed as e:
            print(f"cluster  FAILED  {e}")
            failed += 1
    print(f"tests/slurm.py: {time.time() - t_all:.0f} s in all{'; %d FAILED' % failed if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
