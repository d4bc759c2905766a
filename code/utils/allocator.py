"""The C allocator behind torch's CPU tensors (``--malloc``), and how to read and reset its memory.

glibc serves every large block (above a threshold of at most 32 MB) by mmap and unmaps it when it is freed,
so each training iteration on the CPU maps its activation memory afresh and the kernel zeroes it page by
page. That system time grows with the memory an iteration touches, so it weighs more on CrossMatch (four
decoder batches) than on a supervised step: an ACDC CrossMatch iteration cost 4.96 supervised ones with
glibc and 3.22 with jemalloc, FLOP ratio 3.28 (docs/PERFORMANCE.md). An allocator that keeps freed memory for reuse avoids it:

- ``jemalloc``: the process re-executes itself once with ``LD_PRELOAD`` naming libjemalloc (it cannot be
  swapped in after start) and ``MALLOC_CONF`` keeping freed pages (dirty_decay_ms:-1, muzzy_decay_ms:-1);
  about as much memory as glibc. Needs the library (Debian/Ubuntu: ``apt-get install libjemalloc2``).
- ``retain``: glibc told (mallopt) never to mmap and never to trim; no library needed, but the heap
  fragments (about a third more resident memory).
- ``auto`` (default): jemalloc when the device is the CPU and the library is found, else glibc as it is.
- ``system``: leave the allocator alone.

On a GPU none of this matters (the CUDA caching allocator reuses device memory); ``auto`` does nothing there.
"""
import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

CHOICES = ("auto", "system", "jemalloc", "retain")
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
_REEXEC_MARK = "CROSSMATCH_MALLOC_REEXEC"
_JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                   "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2",
                   "/opt/homebrew/lib/libjemalloc.2.dylib", "/usr/local/lib/libjemalloc.2.dylib")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # glibc mallopt parameters


def add_malloc_arg(parser) -> None:
    parser.add_argument("--malloc", choices=CHOICES, default="auto",
                        help="CPU memory allocator: auto = jemalloc when found (the process re-executes itself once "
                             "with LD_PRELOAD), else the system's; retain = glibc keeping freed memory; system = as is "
                             "(code/utils/allocator.py)")


def loaded_allocator():
    """'jemalloc' / 'tcmalloc' / 'mimalloc' when one is mapped into this process, else None (glibc)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return None


def find_jemalloc():
    """Path of the jemalloc shared library, or None."""
    for path in _JEMALLOC_PATHS:
        if os.path.exists(path):
            return path
    name = ctypes.util.find_library("jemalloc")
    return name if name and os.path.isabs(name) and os.path.exists(name) else None


def retain_freed_memory() -> bool:
    """glibc: serve large blocks from the heap (no mmap) and never give the heap back; True if it took."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def _reexec_with_jemalloc(path: str) -> None:
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush(), sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


_applied = None   # the line use_allocator returned, for the log


def applied() -> str:
    """What use_allocator did in this process (for the run's log), or the allocator as found."""
    return _applied or describe()


def use_allocator(choice: str, device_type: str, may_reexec: bool) -> str:
    global _applied
    _applied = _use_allocator(choice, device_type, may_reexec)
    return _applied


def _use_allocator(choice: str, device_type: str, may_reexec: bool) -> str:
    """Apply ``--malloc`` at the start of a script (before any worker or process group exists).

    May replace the process (same pid, same arguments) to preload jemalloc; only when ``may_reexec`` (the script
    runs from its own command line, not called from another program). Returns a line for the log."""
    if choice not in CHOICES:
        raise ValueError(f"--malloc {choice!r}: expected one of {', '.join(CHOICES)}")
    reexecuted = os.environ.pop(_REEXEC_MARK, None)   # set by our own re-exec; not passed on to children
    loaded = loaded_allocator()
    if choice == "system" or (choice == "auto" and device_type != "cpu"):
        return describe()
    if choice == "retain":
        if loaded is not None:
            raise SystemExit(f"error: --malloc retain tunes glibc malloc, but {loaded} is preloaded "
                             f"(LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}); use --malloc system")
        if not retain_freed_memory():
            raise SystemExit("error: --malloc retain: mallopt is not available here (glibc only); use --malloc system")
        return describe(retained=True)
    # jemalloc, or auto on the CPU
    if loaded is not None:
        return describe()
    path = find_jemalloc()
    if path is None:
        if choice == "jemalloc":
            raise SystemExit("error: --malloc jemalloc: libjemalloc not found (looked in "
                             f"{', '.join(_JEMALLOC_PATHS[:3])}, ...); install it (Debian/Ubuntu: apt-get install "
                             "libjemalloc2) or use --malloc auto")
        return describe() + " (jemalloc not found: each CPU iteration maps its memory afresh, see --malloc)"
    if reexecuted or not may_reexec or not hasattr(sys, "orig_argv"):
        why = "preloading it did not take" if reexecuted else "not re-executing a script called from another program"
        if choice == "jemalloc" and reexecuted:
            raise SystemExit(f"error: --malloc jemalloc: preloading {path} did not take")
        return describe() + f" ({why})"
    _reexec_with_jemalloc(path)
    return describe()   # not reached


def describe(retained: bool = False) -> str:
    loaded = loaded_allocator()
    if loaded is not None:
        return (f"{loaded} (LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}, "
                f"MALLOC_CONF={os.environ.get('MALLOC_CONF', '')})")
    tun = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    return ("glibc malloc" + (" + mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=max) (--malloc retain)" if retained else "")
            + (f", environment {tun}" if tun else ""))


def release_free_memory_fn():
    """A function handing freed heap memory back to the system: jemalloc's purge of every arena when jemalloc is
    loaded (it keeps freed pages otherwise), else glibc's malloc_trim(0); None if neither exists."""
    try:
        proc = ctypes.CDLL(None)
    except OSError:
        return None
    if hasattr(proc, "mallctl"):   # jemalloc: "arena.<MALLCTL_ARENAS_ALL = 4096>.purge"
        return lambda: proc.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
    if hasattr(proc, "malloc_trim"):
        return lambda: proc.malloc_trim(ctypes.c_size_t(0))
    return None
