"""--malloc: what each choice does to the process (utils/allocator.py)."""
import os
import subprocess
import sys

import pytest

from conftest import CODE
from utils import allocator

SNIPPET = ("import sys; sys.path.insert(0, {code!r}); from utils.allocator import use_allocator; "
           "print('RESULT', use_allocator({choice!r}, 'cpu', may_reexec=True))")


def run_snippet(choice, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", SNIPPET.format(code=str(CODE), choice=choice)], env=env,
                         capture_output=True, text=True, timeout=120)
    return out


@pytest.mark.skipif(allocator.find_jemalloc() is None or not sys.platform.startswith("linux"),
                    reason="libjemalloc not installed here")
@pytest.mark.parametrize("choice", ["auto", "jemalloc"])
def test_jemalloc_is_preloaded_by_reexecuting_the_command(choice):
    out = run_snippet(choice)
    assert out.returncode == 0, out.stderr
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
    assert len(line) == 1 and line[0].startswith("RESULT jemalloc (LD_PRELOAD="), out.stdout
    assert allocator.JEMALLOC_CONF in line[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_retain_and_system_leave_the_process_on_glibc():
    out = run_snippet("retain")
    assert out.returncode == 0, out.stderr
    assert "RESULT glibc malloc + mallopt(M_MMAP_MAX=0" in out.stdout
    out = run_snippet("system")
    assert out.returncode == 0 and "RESULT glibc malloc" in out.stdout and "mallopt" not in out.stdout


def test_missing_jemalloc_is_a_clear_error_or_a_note(monkeypatch):
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: None)
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    with pytest.raises(SystemExit, match="--malloc jemalloc: libjemalloc not found"):
        allocator.use_allocator("jemalloc", "cpu", may_reexec=True)
    assert "jemalloc not found" in allocator.use_allocator("auto", "cpu", may_reexec=True)


def test_no_reexec_when_called_from_another_program_or_on_a_gpu(monkeypatch):
    def no_exec(*a):
        raise AssertionError("re-executed")

    monkeypatch.setattr(os, "execve", no_exec)
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: None)
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "/lib/libjemalloc.so.2")
    assert "not re-executing" in allocator.use_allocator("auto", "cpu", may_reexec=False)
    assert allocator.use_allocator("auto", "cuda", may_reexec=True).startswith("glibc malloc")
    with pytest.raises(ValueError, match="--malloc"):
        allocator.use_allocator("tcmalloc", "cpu", may_reexec=True)
