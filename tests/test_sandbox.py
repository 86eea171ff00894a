"""The sandbox contains what a generated program might do: loops, forks, memory, files, network.

Sentinel files live outside the sandbox's temporary directory (in pytest's tmp_path); every
test checks they are untouched after the program tried to change them.
"""
from __future__ import annotations

import os

import pytest

from pktlib.errors import PktError
from pktlib.evaluation.sandbox import capabilities, run_code, run_many


@pytest.fixture
def sentinel(tmp_path):
    d = tmp_path / "project"
    d.mkdir()
    f = d / "keep.txt"
    f.write_text("precious")
    return f


def untouched(f) -> bool:
    return f.is_file() and f.read_text() == "precious" and sorted(os.listdir(f.parent)) == ["keep.txt"]


def test_passing_failing_and_crashing_programs():
    assert run_code("assert sum([1, 2]) == 3\nprint('ok')").status == "passed"
    r = run_code("def f(x):\n    return x\nassert f(1) == 2")
    assert r.status == "failed" and not r.passed and "AssertionError" in r.stderr
    assert run_code("1 / 0").status == "error"
    # a syntax error is no pass, and is found without starting a process
    bad = run_code("def f(:\n  pass")
    assert (bad.status, bad.returncode, bad.wall_s) == ("error", None, 0.0), bad
    assert "SyntaxError" in bad.stderr, bad.stderr
    assert run_code("x = 1\0").status == "error"  # a null byte: ValueError or SyntaxError by version
    # an error the compiler cannot see still runs in the child and fails there
    late = run_code("import no_such_module_here")
    assert late.status == "error" and late.returncode is not None and "ModuleNotFoundError" in late.stderr, late


def test_exiting_early_is_not_a_pass():
    # sys.exit(0) before the tests would otherwise read as success.
    r = run_code("import sys\nsys.exit(0)\nassert False")
    assert r.status == "error" and not r.passed


def test_infinite_loop_is_stopped_at_its_limit():
    r = run_code("while True:\n    pass", timeout=2)
    assert r.status == "timeout" and not r.passed, r
    assert r.wall_s >= 2, r  # it ran until its limit, then was stopped (run_code returned)
    r = run_code("import time\ntime.sleep(60)\nprint('woke up')", timeout=1)  # no CPU used: the wall clock decides
    assert r.status == "timeout" and "woke up" not in r.stdout, r


def test_fork_loop_is_contained(sentinel):
    r = run_code("import os\nwhile True:\n    os.fork()", timeout=5)
    assert r.status == "blocked" and "fork" in r.stderr
    r = run_code("import posix\nposix.fork()", timeout=5)
    assert r.status == "blocked"


def test_fork_is_refused_by_the_kernel_without_the_python_guard():
    if os.geteuid() == 0 and not capabilities()["drop_user"]:
        pytest.skip("root without a user to drop to: RLIMIT_NPROC does not bind root")
    r = run_code("import os\npid = os.fork()\nassert False, 'forked'", timeout=5, guard=False)
    assert r.status == "error" and ("BlockingIOError" in r.stderr or "Resource temporarily" in r.stderr), r


def test_huge_allocation_is_contained():
    r = run_code("x = bytearray(8 << 30)\nassert False", memory_mb=512)
    assert r.status == "memory", r
    r = run_code("x = []\nwhile True:\n    x.append(' ' * 10**6)", memory_mb=512, timeout=20)
    assert r.status == "memory", r


@pytest.mark.parametrize("call", [
    "os.system('rm -rf {d}')",
    "os.remove('{f}')",
    "os.unlink('{f}')",
    "os.rename('{f}', '{f}.moved')",
    "os.chmod('{f}', 0)",
    "shutil.rmtree('{d}')",
    "shutil.move('{f}', '.')",
    "subprocess.run(['rm', '-f', '{f}'])",
    "subprocess.Popen('rm -f {f}', shell=True).wait()",
    "open('{f}', 'w').write('gone')",
    "open('{f}', 'a').write('more')",
    "open('{d}/new.txt', 'x').write('new')",
    "os.open('{f}', os.O_WRONLY | os.O_TRUNC)",
    "pathlib.Path('{f}').write_text('gone')",
    "pathlib.Path('{f}').unlink()",
    "io.FileIO('{f}', 'w')",
    "os.makedirs('{d}/sub/dir')",
])
def test_destructive_calls_are_blocked(sentinel, call):
    prog = "import io, os, shutil, subprocess, pathlib\n" + call.format(f=sentinel, d=sentinel.parent)
    r = run_code(prog, timeout=5)
    assert r.status == "blocked", (call, r)
    assert untouched(sentinel)


def test_files_outside_are_protected_by_the_kernel_without_the_python_guard(sentinel):
    caps = capabilities()
    if not caps["drop_user"]:
        pytest.skip("the evaluation does not run as root: no other user to drop to")
    prog = f"open({str(sentinel)!r}, 'w').write('gone')"
    r = run_code(prog, timeout=5, guard=False)
    assert r.status == "error" and "PermissionError" in r.stderr, r
    assert untouched(sentinel)


def test_writing_inside_the_temporary_directory_works_and_is_removed():
    prog = ("import os\nopen('out.txt', 'w').write('x')\nassert open('out.txt').read() == 'x'\n"
            "os.makedirs('sub', exist_ok=True)\nopen('sub/a', 'w').close()\nprint(os.getcwd())")
    r = run_code(prog)
    assert r.status == "passed", r
    workdir = r.stdout.strip().splitlines()[-1]
    assert "pkt-sandbox-" in workdir and not os.path.exists(workdir)


def test_socket_is_blocked():
    r = run_code("import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))", timeout=5)
    assert r.status == "blocked"
    r = run_code("import socket\nsocket.create_connection(('example.com', 80), timeout=2)", timeout=5)
    assert r.status == "blocked"
    r = run_code("import urllib.request\nurllib.request.urlopen('http://example.com')", timeout=5)
    assert r.status in ("error", "blocked") and not r.passed


def test_network_namespace_without_the_python_guard():
    if not capabilities()["netns"]:
        pytest.skip("unshare -n is not available here")
    prog = ("import socket\ns = socket.socket()\ns.settimeout(2)\n"
            "assert s.connect_ex(('1.1.1.1', 80)) != 0, 'reached the network'\n"
            "assert [n for _, n in socket.if_nameindex()] == ['lo'], socket.if_nameindex()")
    r = run_code(prog, timeout=5, guard=False)
    assert r.status == "passed", r


def test_output_flood_is_bounded():
    r = run_code("while True:\n    print('x' * 10000)", timeout=10)
    assert r.status in ("error", "timeout") and len(r.stdout) <= 2000


def test_run_many_keeps_order_and_runs_concurrently():
    # Each program prints when it started and ended its (sleeping) work, then passes or fails.
    progs = [f"import time\nt0 = time.time()\ntime.sleep(1)\nprint(t0, time.time())\nassert {i} % 2 == 0"
             for i in range(6)]
    res = run_many(progs, workers=3)
    assert [r.passed for r in res] == [i % 2 == 0 for i in range(6)]
    spans = [tuple(map(float, r.stdout.split())) for r in res]
    # the most programs running at any moment: more than one (concurrent), at most `workers`
    running = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert 2 <= running <= 3, spans


def test_bad_limits_raise():
    with pytest.raises(PktError, match="timeout"):
        run_code("pass", timeout=0)
