"""Stop signals: how a training or test script ends when it is told to stop (docs/RELIABILITY.md).

The signals of ``STOP_SIGNALS`` (SIGTERM: what ``kill``, Slurm, systemd and torchrun send; SIGUSR2: what Slurm sends
before a job's time limit for submitit, docs/REPRODUCE.md "On a Slurm cluster") and Ctrl-C (SIGINT) stop a script
the same way. In the training loop (``stop_signals_held``) the signal is remembered: the iteration in
progress finishes (one whose batch is still loading is dropped), ``latest.pth`` is written at the last finished
iteration, the loader workers are stopped and the script ends with one line and exit status 128 + the signal number
(143 for SIGTERM, 130 for Ctrl-C); under torchrun every rank stops at the same iteration. Anywhere else (set-up,
evaluation) the script stops at once (``Stopped``), a held write (a result file) being completed first. A Ctrl-C
after a first signal stops at once everywhere; a repeated stop signal changes nothing (Slurm and torchrun may both
send SIGTERM; under submitit, Slurm's SIGUSR2 before the time limit is followed by the requeue's SIGTERM).

The handler is installed in each main process (``stop_signals_handled``). A data-loader worker ignores the signals
(``worker_ignores_stop_signals``, its ``worker_init_fn``; before it runs, the inherited handler does nothing there):
its main process stops it. Were it to die of a SIGTERM sent to the whole process group (Slurm, systemd), torch
would raise "DataLoader worker ... killed by signal" in the main process in the middle of an iteration.
"""
import os
import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)  # each of these stops a script like Ctrl-C does

_state = {"pid": None, "held": 0, "received": 0}  # the main process, held-block depth, the first signal received


def signal_name(signum: int) -> str:
    return "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name


class Stopped(BaseException):
    """A stop signal or Ctrl-C ends the script: ``signum``, ``exit_code`` (128 + signum); str() names the signal."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum, self.exit_code = signum, 128 + signum


def as_stopped(error: BaseException) -> BaseException:
    """``Stopped`` for a KeyboardInterrupt (Ctrl-C where the handler is not installed), else ``error`` itself."""
    return Stopped(signal.SIGINT) if isinstance(error, KeyboardInterrupt) else error


def _on_signal(signum, frame):
    if os.getpid() != _state["pid"]:
        return  # a forked data-loader worker: its main process stops it
    again = bool(_state["received"])
    _state["received"] = _state["received"] or signum
    if not _state["held"] or (again and signum == signal.SIGINT):
        raise Stopped(signum)


@contextmanager
def stop_signals_handled():
    """Inside, Ctrl-C and the ``STOP_SIGNALS`` raise ``Stopped`` (or are remembered, in ``stop_signals_held``);
    the previous handlers are back afterwards. Only the main thread can install handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, *STOP_SIGNALS)}
    _state.update(pid=os.getpid(), held=0, received=0)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.update(pid=None, held=0, received=0)


@contextmanager
def stop_signals_held(then_stop: bool = True):
    """Inside, a stop signal is only remembered (``stop_requested``): what runs inside is not cut short (a second
    Ctrl-C still is). When the outermost block ends normally, a remembered signal raises ``Stopped`` unless
    ``then_stop`` is False."""
    _state["held"] += 1
    try:
        yield
    finally:
        _state["held"] -= 1
    if then_stop and not _state["held"] and _state["received"] and _state["pid"] == os.getpid():
        raise Stopped(_state["received"])


def stop_requested() -> int:
    """The first stop signal received (its number) while signals are held, or 0."""
    return _state["received"] if _state["pid"] == os.getpid() else 0


def worker_ignores_stop_signals(worker_id=None) -> None:
    """A data loader's ``worker_init_fn``: the worker ignores Ctrl-C and the stop signals (torch's own handler would
    end it on a SIGTERM from outside); its main process stops it."""
    for s in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(s, signal.SIG_IGN)
