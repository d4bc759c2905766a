"""What both launchers tell while runs go on: a line per finished or failed run, one progress line (runs done /
running / left / failed, rows done, an ETA), the runs in conflict left out before anything starts."""
import statistics
import sys
import time

from reproduction.runs import fmt_duration, log_tail, logged_training_seconds


class Progress:
    """The runs' bookkeeping for a launcher: ``start`` (the runs to do), ``done_run`` / ``failed_run`` (a line each),
    ``progress`` (the counts); ``parallel`` runs at once share the ETA."""

    def __init__(self, runs, entries, parallel: int, out=sys.stdout):
        self.runs, self.parallel, self.out = runs, parallel, out
        self.rows = {}  # (table, key) -> its runs
        for row, _, run in entries:
            self.rows.setdefault((row["table"], row["key"]), []).append(run)
        self.started, self.done, self.failed, self.finished_before = {}, [], [], []
        self.last = ("", 0.0)  # the last progress line printed (without time and ETA), and when
        self.tty = hasattr(out, "isatty") and out.isatty()

    def start(self, where: str) -> list:
        """The runs to do (not finished, not in conflict: those are reported failed), after a line with the counts."""
        queue = [r for r in self.runs if r.state() != "finished"]
        self.finished_before = [r for r in self.runs if r not in queue]
        for run in [r for r in queue if r.state() == "conflict"]:
            queue.remove(run)
            self.failed.append(run)
            self.say(f"FAILED: {run.name}: {run.run_dir} holds a run trained with other settings "
                     f"({', '.join(run.conflicts())}); move it away or pass another --runs_dir")
        self.say(f"{len(self.runs)} runs: {len(self.finished_before)} finished, {len(queue)} to do, {where}")
        return queue

    def done_run(self, run) -> None:
        self.done.append(run)
        self.say(f"done: {run.name} ({run.run_dir.name})"
                 + (f" in {fmt_duration(run.duration)}" if run.duration is not None else ""))

    def failed_run(self, run, what: str) -> None:
        """A failed run: ``what`` happened ("(exit 1): command", the job), then the last lines of its log."""
        self.failed.append(run)
        self.say(f"FAILED: {run.name} {what}\n{log_tail(run)}")

    def running(self) -> list:
        return [r for r in self.started if r not in self.done and r not in self.failed]

    def eta(self, n_queued: int):
        """Seconds left: the mean duration of the runs finished here (else the training time in the logs of the
        runs found finished) for each queued run and the rest of each running one, ``parallel`` at once."""
        measured = [r.duration for r in self.done if r.duration]
        if not measured:
            measured = [s for s, _ in filter(None, map(logged_training_seconds, (r.run_dir for r in self.finished_before)))]
        if not measured:
            return None
        mean, now = statistics.mean(measured), time.time()
        rest = sum(max(mean - (now - self.started[r]), 0) for r in self.running())
        return (rest + mean * n_queued) / self.parallel

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
