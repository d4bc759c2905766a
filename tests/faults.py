"""Fault cases that need real processes racing, signals or a mount (docs/RELIABILITY.md); .ci/run runs it after
pytest. Each case runs the real scripts on tiny synthetic ACDC data (CPU, one thread per process) and prints one
line: the case, the seconds it took, what happened. Exit status 1 when a case fails.

    python tests/faults.py                  # every case (about 3.5 minutes on 2 cores)
    python tests/faults.py sigint stall     # some of them: two_runs, torchrun_killed, stall, sigint, sigterm,
                                            # sigterm_torchrun, disk_full, read_only

disk_full and read_only mount a tmpfs: they need root (CAP_SYS_ADMIN) and are skipped, with the reason, without it.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CODE = Path(__file__).resolve().parents[1] / "code"
sys.path.insert(0, str(CODE))

from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.run_folder import hold_run_dir, release_run_dir  # noqa: E402
from utils.synthetic import make_acdc  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
FLAGS = ["--labelnum", "1", "--patch_size", "48", "48", "--batch_size", "4", "--labeled_bs", "2", "--device", "cpu",
         "--num_workers", "0", "--save_every", "1", "--log_every", "1"]


class Failed(AssertionError):
    pass


def check(condition, what):
    if not condition:
        raise Failed(what)


def train_cmd(root, out, exp, *extra, iters=40, torchrun=False) -> list:
    """The command of train_acdc.py (or torchrun with 2 processes) on the tiny data."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"] if torchrun \
        else [sys.executable]
    return [*launcher, str(CODE / "train_acdc.py"), "--root_path", str(root), "--out_dir", str(out), "--exp", exp,
            "--max_iterations", str(iters), *FLAGS, *extra]


def train(*args, popen=None, **kw):
    """Start train_cmd(*args, **kw) in the background."""
    return subprocess.Popen(train_cmd(*args, **kw), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, **(popen or {}))


def run(cmd, timeout=300):
    """Run a command to its end: exit status, stdout, stderr."""
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def errors(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error:") or "Traceback" in line]


def wait_for(condition, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise Failed(f"no {what} within {seconds} s")


def saved_iteration(run_dir):
    try:
        return load_checkpoint(run_dir / "latest.pth")["iteration"]
    except Exception:
        return 0


def signal_when_saved(proc, run_dir, iteration: int, send) -> tuple:
    """Once latest.pth in ``run_dir`` holds ``iteration``: ``send(proc)`` (a signal), then wait for the end of
    ``proc``. Returns its stderr and the seconds from the signal to its end."""
    try:
        wait_for(lambda: saved_iteration(run_dir) >= iteration, 180, "checkpoint")
        send(proc)
        t0 = time.time()
        err = proc.communicate(timeout=120)[1]
        return err, time.time() - t0
    finally:
        proc.kill()
        proc.wait()


def children(pid: int) -> list:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=", 1)[1])


# ------------------------------------------------------------------------------------------------ cases
def two_runs(root, base):
    """Two runs started at once with the same --exp: one trains, the other is refused naming it; a --resume
    started while the winner runs is refused too and takes nothing from it (no temporary file removed)."""
    out = base / "two"
    procs = [train(root, out, "same") for _ in range(2)]
    wait_for(lambda: any(p.poll() is not None for p in procs), 120, "refusal")
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    err = loser.stderr.read()
    check(loser.returncode == 1 and errors(err) == [err.strip()], f"the second run: exit {loser.returncode}, {err!r}")
    check(f"is in use by pid {winner.pid} on {socket.gethostname()} since " in err, err)
    run_dir = out / "ACDC_same_1_labeled"
    wait_for(lambda: saved_iteration(run_dir) >= 2, 120, "checkpoint of the winner")
    t0 = time.time()
    late = run(train_cmd(root, out, "same", "--resume"))
    check(late.returncode == 1 and f"in use by pid {winner.pid}" in late.stderr, late.stderr)
    refused_in = time.time() - t0
    check(winner.poll() is None, "the winner ended before the --resume was refused (make the run longer)")
    rest = winner.communicate(timeout=300)[1]
    check(winner.returncode == 0 and "removed" not in rest, f"the winner: exit {winner.returncode}, {rest[-2000:]}")
    log = (run_dir / "log.txt").read_text()
    check(log.count("ACDC crossmatch:") == 1 and not (run_dir / "run.lock").exists(), log[-2000:])
    return (f"second run refused: {err.strip()}; --resume during the run refused in {refused_in:.1f} s; winner "
            f"rc 0").replace(str(base), "<tmp>")


def torchrun_killed(root, base):
    """SIGKILL to the torchrun launcher: both ranks are gone at once (PR_SET_PDEATHSIG), nothing is written after,
    and run.lock is free again."""
    out = base / "killed"
    proc = train(root, out, "tk", iters=2000, torchrun=True)
    run_dir = out / "ACDC_tk_1_labeled"
    try:
        wait_for(lambda: saved_iteration(run_dir) >= 1, 180, "checkpoint")
        ranks = [p for p in children(proc.pid) if "train_acdc.py" in Path(f"/proc/{p}/cmdline").read_text()]
        check(len(ranks) == 2, f"rank processes {ranks}")
        proc.send_signal(signal.SIGKILL)
        t0 = time.time()
        wait_for(lambda: not any(map(running, ranks)), 10, "end of the ranks")
        gone = time.time() - t0
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    before = (run_dir / "latest.pth").stat().st_mtime_ns
    time.sleep(1)
    check((run_dir / "latest.pth").stat().st_mtime_ns == before, "latest.pth written after the kill")
    hold_run_dir(run_dir)  # refused (SystemExit) if a rank still held it
    release_run_dir()
    return f"launcher SIGKILLed at iteration {saved_iteration(run_dir)}: both ranks gone after {gone:.2f} s; run.lock free"


def stall(root, base):
    """SIGSTOP on rank 1 of 2 (Gloo, --ddp_timeout 10): rank 0 ends with one line after about 10 s; torchrun then
    stops the stopped rank (SIGTERM, SIGKILL after its 30 s grace) and exits."""
    out = base / "stall"
    proc = train(root, out, "st", "--ddp_timeout", "10", iters=2000, torchrun=True)
    run_dir = out / "ACDC_st_1_labeled"

    def stop_rank_1(proc):
        rank1 = next(p for p in children(proc.pid) if "train_acdc.py" in Path(f"/proc/{p}/cmdline").read_text()
                     and rank_of(p) == 1)
        os.kill(rank1, signal.SIGSTOP)
    err, ended = signal_when_saved(proc, run_dir, 2, stop_rank_1)
    ours = [line for line in errors(err) if line.startswith("error:")]
    check(len(ours) == 1 and ours[0].startswith("error: rank 0 of 2: a collective failed in iteration "), err[-3000:])
    check("stalled longer than --ddp_timeout or died" in ours[0] and "resume with --resume" in ours[0], ours[0])
    check(proc.returncode != 0 and ended < 10 + 45, f"torchrun exit {proc.returncode} after {ended:.0f} s")
    return f"{ours[0].replace(str(base), '<tmp>')}; torchrun exited {proc.returncode} {ended:.0f} s after the SIGSTOP"


def stop_signal(root, base, signum, exp, torchrun=False, to="group"):
    """``signum`` to the process group of a run (what Ctrl-C in a terminal, Slurm and systemd do: the loader workers
    and the torchrun ranks get it too), or ``to="rank1"`` to torchrun's rank 1 alone: exit 128 + signum, one line
    naming the signal and an iteration N that latest.pth holds, no process left, no temporary file; --resume then
    finishes the run. Returns the line (base as <tmp>) and the seconds from the signal to the end."""
    out = base / exp
    run_dir = out / f"ACDC_{exp}_1_labeled"
    workers = [] if torchrun else ["--num_workers", "2"]
    proc = train(root, out, exp, *workers, "--save_every", "1000", iters=20, torchrun=torchrun,
                 popen=dict(start_new_session=True))
    family = []

    def send(proc):
        family.extend(p for c in children(proc.pid) for p in [c, *children(c)])
        if to == "rank1":
            os.kill(next(p for p in family if "train_acdc.py" in Path(f"/proc/{p}/cmdline").read_text()
                         and rank_of(p) == 1), signum)
        else:
            os.killpg(proc.pid, signum)
    wait_for(lambda: (run_dir / "log.txt").is_file() and " it 1/20 " in (run_dir / "log.txt").read_text(), 180,
             "first iteration")
    err, ended = signal_when_saved(proc, run_dir, 0, send)
    ours = [line for line in errors(err) if line.startswith("error:") or not torchrun]  # torchrun's own traceback
    name = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name
    check(len(ours) == 1 and ours[0].startswith(f"error: stopped by {name} after iteration "), err[-3000:])
    done = int(ours[0].split("after iteration ")[1].split()[0])
    check(ours[0].endswith(f"holds iteration {done}: resume with --resume") and saved_iteration(run_dir) == done,
          f"{ours[0]}; latest.pth holds {saved_iteration(run_dir)}")
    check(torchrun or proc.returncode == 128 + signum, f"exit {proc.returncode}")
    check(len(family) >= 2 and not any(map(running, family)), f"processes left: {[p for p in family if running(p)]}")
    check(not list(run_dir.glob("*.tmp")) and not (run_dir / "run.lock").exists(), "a temporary file or run.lock left")
    res = run(train_cmd(root, out, exp, *workers, "--resume", iters=20, torchrun=torchrun), timeout=600)
    check(res.returncode == 0 and (run_dir / "iter_20.pth").is_file(), res.stderr[-2000:])
    return ours[0].replace(str(base), "<tmp>"), ended


def sigint(root, base):
    """Ctrl-C in a terminal: SIGINT to the process group of a run with 2 loader workers."""
    line, ended = stop_signal(root, base, signal.SIGINT, "int")
    return f"{line} (exit 130, {ended:.1f} s after SIGINT; workers gone); --resume finished the run"


def sigterm(root, base):
    """SIGTERM to the process group of a run with 2 loader workers (Slurm, systemd)."""
    line, ended = stop_signal(root, base, signal.SIGTERM, "term")
    return f"{line} (exit 143, {ended:.1f} s after SIGTERM; workers gone); --resume finished the run"


def sigterm_torchrun(root, base):
    """SIGTERM to torchrun and its 2 ranks (Gloo; Slurm's scancel), then to rank 1 alone: both ranks stop at the
    same iteration, rank 0 writes latest.pth and says so."""
    lines = []
    for to in ("group", "rank1"):
        line, ended = stop_signal(root, base, signal.SIGTERM, f"ddp{to}", torchrun=True, to=to)
        lines.append(f"to the {'process group' if to == 'group' else 'rank 1 alone'}: {line} (torchrun ended "
                     f"{ended:.1f} s after SIGTERM; ranks gone)")
    return "; ".join(lines) + "; --resume finished both runs"


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                         text=True)
    if res.returncode:
        raise Skip(f"cannot mount a tmpfs ({res.stderr.strip() or 'not root'})")


class Skip(Exception):
    pass


def disk_full(root, base):
    """--out_dir on a 20 MB tmpfs: the first latest.pth (about 15 MB) fits, the second does not."""
    mnt = base / "small"
    mount_tmpfs(mnt, "20m")
    try:
        run_dir = mnt / "ACDC_full_1_labeled"
        t0 = time.time()
        res = run(train_cmd(root, mnt, "full", iters=5))
        line = f"error: no space left on {mnt} while writing {run_dir / 'latest.pth'}; the previous checkpoint is intact"
        check(res.returncode == 1 and errors(res.stderr) == [line], res.stderr[-3000:])
        check(saved_iteration(run_dir) == 1 and not list(run_dir.glob("*.tmp")), "latest.pth damaged")
        return f"{line.replace(str(base), '<tmp>')} (exit 1, {time.time() - t0:.1f} s in all); latest.pth loads"
    finally:
        subprocess.run(["umount", str(mnt)])


def read_only(root, base):
    """A read-only file system: training is refused before the data load, test_acdc.py --run before evaluating."""
    mnt = base / "ro"
    mount_tmpfs(mnt, "40m")
    try:
        res = run(train_cmd(root, mnt, "ro", iters=1))
        check(res.returncode == 0, res.stderr[-2000:])
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        t0 = time.time()
        res = run(train_cmd(root / "nowhere", mnt, "ro2"))
        train_line = errors(res.stderr)
        check(res.returncode == 1 and train_line == [f"error: --out_dir {mnt}: cannot write the run folder "
                                                     f"ACDC_ro2_1_labeled there (Read-only file system)"], res.stderr)
        train_s = time.time() - t0
        t0 = time.time()
        res = run([sys.executable, str(CODE / "test_acdc.py"), "--run", str(mnt / "ACDC_ro_1_labeled"), "--list",
                   "val.list", "--device", "cpu"])
        check(res.returncode == 1 and errors(res.stderr)[0].startswith("error: output folder ")
              and "is not a writable folder (pass --out)" in res.stderr and res.stdout == "", res.stderr + res.stdout)
        return (f"training (root {root / 'nowhere'}: the run folder is checked first): {train_line[0]} "
                f"({train_s:.1f} s); test_acdc.py --run: {errors(res.stderr)[0]} ({time.time() - t0:.1f} s)"
                ).replace(str(base), "<tmp>")
    finally:
        subprocess.run(["umount", str(mnt)])


CASES = {"two_runs": two_runs, "torchrun_killed": torchrun_killed, "stall": stall, "sigint": sigint,
         "sigterm": sigterm, "sigterm_torchrun": sigterm_torchrun, "disk_full": disk_full, "read_only": read_only}


def main(names) -> int:
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = make_acdc(base / "ACDC", n_train_patients=2, n_val=1, n_test=0, shape=(16, 48, 48), shape_jitter=0.0)
        for name in names or CASES:
            t0 = time.time()
            try:
                result = CASES[name](root, base)
                status = "ok"
            except Skip as e:
                result, status = str(e), "skipped"
            except Failed as e:
                result, status, failed = str(e), "FAILED", failed + 1
            print(f"{name:<16} {status:<8} {time.time() - t0:6.1f} s  {result}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
