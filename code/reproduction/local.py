"""--launcher local (the default): the runs on this machine, ``--jobs`` at once, the GPUs of ``--gpus`` handed to
them in turn as CUDA_VISIBLE_DEVICES. Each run's commands go through ``runs.execute``; Ctrl-C or SIGTERM stops the
children (their latest.pth stays, to be resumed). Not submitit's LocalExecutor: it starts every job at once and
sets CUDA_VISIBLE_DEVICES itself."""
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from reproduction.progress import Progress
from reproduction.runs import child_env, execute, shell


def run_local(runs, entries, args, out=sys.stdout) -> int:
    """Every run not finished, ``args.jobs`` at once; exit status 1 when one failed."""
    slots = [args.gpus[i % len(args.gpus)] if args.gpus else None for i in range(args.jobs)]
    env = child_env((os.cpu_count() or 1) // args.jobs)  # the CPU's cores shared by the runs at once
    report = Progress(runs, entries, len(slots), out)
    queue = report.start(f"{len(slots)} at once" + (f" on GPUs {','.join(args.gpus)}" if args.gpus else ""))
    lock, procs = threading.Lock(), {}

    def one(run, gpu):
        def started(proc):
            with lock:
                procs[run] = proc
        where = f"CUDA_VISIBLE_DEVICES={gpu if gpu is not None else 'unset'}"
        try:
            return execute(run, dict(env, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})), where, started)
        finally:
            with lock:
                procs.pop(run, None)

    free, pending = list(range(len(slots))), {}
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        try:
            while queue or pending:
                while queue and free:
                    run, slot = queue.pop(0), free.pop(0)
                    report.started[run] = time.time()
                    pending[pool.submit(one, run, slots[slot])] = (run, slot)
                report.progress(len(queue))
                finished, _ = wait(pending, timeout=60, return_when=FIRST_COMPLETED)
                for future in finished:
                    run, slot = pending.pop(future)
                    free.append(slot)
                    code, cmd = future.result()
                    if code == 0:
                        report.done_run(run)
                    else:
                        report.failed_run(run, f"(exit {code}): {shell(cmd)}")
        except BaseException:  # Ctrl-C, SIGTERM: stop the children (their latest.pth stays, to be resumed)
            queue.clear()
            with lock:
                for proc in procs.values():
                    proc.terminate()
            raise
    report.progress(0, final=True)
    return 1 if report.failed else 0
