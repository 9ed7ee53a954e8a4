"""The sandbox against hostile programs, on the real kernel: each test runs a real process tree in it.

Every escape attempt is also checked from the outside (the file did not appear, the listener got no connection, no
process of the sandbox's uid is left), not only by what the program reports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from rewards.sandbox import Limits, run

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def py(code: str, stdin: bytes = b"", **limits):
    return run([sys.executable, "-I", "main.py"], files={"main.py": code}, stdin=stdin, limits=Limits(**limits))


def sandbox_processes() -> list[str]:
    """Processes of any sandbox uid (200000 and up) still alive on the host."""
    out = subprocess.run(["ps", "-eo", "uid=,pid=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if int(line.split()[0]) >= 200_000]


def test_runs_a_program_with_stdin_and_files():
    r = run([sys.executable, "main.py"], stdin=b"hello\n",  # not -I: that leaves the script's directory out
            files={"main.py": "import helper\nprint(helper.rev(input()))", "helper.py": "rev = lambda s: s[::-1]"})
    assert r.ok and r.stdout == b"olleh\n", r
    assert r.returncode == 0 and not r.timed_out and r.error == ""


def test_exit_code_and_signal_come_back():
    assert py("raise SystemExit(3)").returncode == 3
    assert py("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)").returncode == -signal.SIGSEGV


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    r = py("while True: pass", cpu_s=1, timeout_s=20)
    assert r.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not r.timed_out, r
    assert r.wall_s < 10


def test_sleeping_program_is_killed_at_the_wall_clock_timeout():
    r = py("import time; time.sleep(100)", timeout_s=1.5)
    assert r.timed_out and r.returncode is None and not r.ok
    assert 1.5 <= r.wall_s < 6


def test_fork_bomb_is_contained_and_leaves_nothing_behind():
    r = py("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", timeout_s=3, max_procs=8)
    assert not r.ok
    assert sandbox_processes() == []


def test_detached_children_die_with_the_sandbox():
    r = py("import subprocess\nsubprocess.Popen(['sleep', '1000'], start_new_session=True)\nprint('spawned')")
    assert r.ok and r.stdout == b"spawned\n"
    assert sandbox_processes() == []


def test_no_network_even_to_a_listener_on_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        r = py(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)")
        assert r.returncode == 1 and b"Network is unreachable" in r.stderr, r.stderr
        with pytest.raises(TimeoutError):
            server.accept()  # nothing got through
    finally:
        server.close()


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm", str(ROOT)])
def test_writes_outside_the_working_directory_fail(where):
    target = Path(where, f"chorus-escape-{uuid.uuid4().hex}")
    r = py(f"open({str(target)!r}, 'w').write('x')")
    assert r.returncode == 1 and b"Read-only file system" in r.stderr, r.stderr
    assert not target.exists()


def test_working_directory_is_writable_and_private():
    r = py("import os, tempfile\nopen('out.txt', 'w').write('kept')\ntempfile.mkstemp()\n"
           "print(os.getcwd()); print(open('out.txt').read())")
    assert r.ok, r.stderr
    cwd, text = r.stdout.decode().split()
    assert text == "kept" and not Path(cwd).exists()  # gone with the sandbox


def test_file_size_and_workdir_size_are_capped():
    r = py("open('big', 'wb').write(b'x' * (8 * 1024 * 1024))", max_file_mb=1)
    assert r.returncode == 1 and b"File too large" in r.stderr, r.stderr  # Python ignores SIGXFSZ: EFBIG
    r = py("f = open('big', 'wb')\nfor _ in range(64): f.write(b'x' * (1024 * 1024))\nf.flush()", workdir_mb=8)
    assert r.returncode == 1 and b"No space left on device" in r.stderr, r.stderr


def test_memory_limit():
    r = py("x = bytearray(2 * 1024 ** 3)", memory_mb=512)
    assert r.returncode == 1 and b"MemoryError" in r.stderr, r.stderr


def test_huge_output_is_cut_and_the_program_killed():
    r = py("import sys\nwhile True: sys.stdout.write('x' * 65536)", max_output_bytes=100_000, timeout_s=20)
    assert r.output_limited and r.returncode is None and len(r.stdout) == 100_000
    assert r.wall_s < 10


@pytest.mark.skipif(os.geteuid() != 0, reason="a secret in /root needs root to plant")
def test_home_directories_are_hidden_but_python_still_runs():
    secret = Path("/root", f"chorus-secret-{uuid.uuid4().hex}")
    secret.write_text("token")
    try:
        r = py(f"import os\nprint(os.path.exists({str(secret)!r}))")
        assert r.ok and r.stdout == b"False\n", r
    finally:
        secret.unlink()


def test_no_privilege_left_to_undo_the_lock_down():
    r = py("import subprocess\np = subprocess.run(['mount', '-o', 'remount,rw', '/'], capture_output=True)\n"
           "print(p.returncode)\nimport os\nos.setuid(0)")
    assert r.stdout.strip() != b"0" and b"PermissionError" in r.stderr, (r.stdout, r.stderr)


def test_file_names_may_not_leave_the_working_directory():
    r = run([sys.executable, "-I", "main.py"], files={"../main.py": "print(1)"})
    assert not r.ok and "leaves the working directory" in r.error
