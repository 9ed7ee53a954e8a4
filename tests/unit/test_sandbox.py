"""The sandbox against hostile programs, on the real kernel: each test runs a real process tree in it.

Every escape attempt is also checked from the outside (the file did not appear, the listener got no connection, no
process of the sandbox's uid is left), not only by what the program reports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from rewards.sandbox import Limits, containment, exposed, run
from tests.users import as_user, readable_dir, user_python

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


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm"])
def test_temp_directories_are_private(where):
    target = Path(where, f"chorus-escape-{uuid.uuid4().hex}")
    r = py(f"open({str(target)!r}, 'w').write('x')\nprint(open({str(target)!r}).read())")
    assert r.ok and r.stdout == b"x\n", r.stderr  # the program has a /tmp of its own ...
    assert not target.exists()  # ... that is not the host's


@pytest.mark.parametrize("where", ["/usr", "/etc", "/", "/sandbox/../usr"])
def test_writes_outside_the_working_directory_fail(where):
    target = Path(where, f"chorus-escape-{uuid.uuid4().hex}")
    r = py(f"open({str(target)!r}, 'w').write('x')")
    assert r.returncode == 1 and b"Read-only file system" in r.stderr, r.stderr
    assert not Path(os.path.normpath(target)).exists()


def test_the_file_system_holds_only_what_the_program_needs(tmp_path):
    """Files the host can read (a run's held-out answers in a world-readable directory, the repository, shared
    memory, Ray's session directory) are not there at all; the root holds the system and the sandbox's own dirs."""
    run_dir = Path(tempfile.mkdtemp(prefix="chorus-run-"))
    run_dir.chmod(0o755)
    planted = [run_dir / "eval.jsonl", Path("/dev/shm", f"chorus-{uuid.uuid4().hex}")]
    try:
        for path in planted:
            path.write_text('{"answer": "42"}')
            path.chmod(0o644)
        looked_at = [*map(str, planted), str(ROOT / "README.md"), "/tmp/ray", "/root", "/home", "/sys/fs/cgroup",
                     "/etc/hostname", "/var", "/work"]
        r = py("import json, os, sys\n"
               f"print(json.dumps([os.path.exists(p) for p in {looked_at!r}]))\n"
               "print(json.dumps(sorted(os.listdir('/'))))\n"
               "print(json.dumps(sys.prefix))")
        assert r.ok, r.stderr
        seen, top, prefix = (json.loads(line) for line in r.stdout.decode().splitlines())
        # the Python installation, when it lies under /work or /root, is shown at its own path, and only it
        shown = [target for _, target in exposed()]
        assert [p for p, there in zip(looked_at, seen) if there and not any(t.startswith(p) for t in shown)] == []
        assert set(top) <= {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc", "tmp",
                            "sandbox", *(shown.split("/")[1] for _, shown in exposed())}, top
        assert prefix == sys.prefix
    finally:
        for path in planted:
            path.unlink()
        shutil.rmtree(run_dir)


def test_sysv_ipc_made_inside_does_not_outlive_the_sandbox():
    key = 0x43480000 + os.getpid() % 0xFFFF
    r = py("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
           f"shm = libc.shmget({key}, 4096, 0o1666)\nmsg = libc.msgget({key}, 0o1666)\nprint(shm >= 0, msg >= 0)")
    assert r.ok and r.stdout == b"True True\n", (r.stdout, r.stderr)  # it could make them ...
    for table in ("/proc/sysvipc/shm", "/proc/sysvipc/msg"):  # ... in its own IPC namespace, gone with it
        keys = [int(line.split()[0]) for line in Path(table).read_text().splitlines()[1:]]
        assert key not in keys, table


def test_host_unix_sockets_are_out_of_reach(tmp_path):
    """A pathname socket in a world-writable place and an abstract one, both listening on the host."""
    where = Path(tempfile.mkdtemp(prefix="chorus-sock-"))
    where.chmod(0o777)
    path, abstract = where / "s", f"\0chorus-{uuid.uuid4().hex}"
    servers = []
    try:
        for address in (str(path), abstract):
            server = socket.socket(socket.AF_UNIX)
            server.bind(address)
            server.listen()
            server.settimeout(0.5)
            servers.append(server)
        path.chmod(0o777)
        r = py("import socket\nfor a in (%r, %r):\n"
               "    try:\n        socket.socket(socket.AF_UNIX).connect(a); print('connected')\n"
               "    except OSError as e: print(type(e).__name__)" % (str(path), abstract))
        assert r.ok and r.stdout.split() == [b"FileNotFoundError", b"ConnectionRefusedError"], (r.stdout, r.stderr)
        for server in servers:
            with pytest.raises(TimeoutError):
                server.accept()  # nothing got through
    finally:
        for server in servers:
            server.close()
        shutil.rmtree(where)


TREE = ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n"
        "        x = bytearray(200 * 1024 * 1024)\n        for i in range(0, len(x), 4096): x[i] = 1\n"
        "        time.sleep(5); os._exit(0)\n"
        "for _ in range(4): print(os.wait())")


@pytest.mark.skipif(containment() == "rlimits", reason="no cgroup this process may create here")
def test_one_memory_limit_holds_the_whole_tree():
    """Four processes of 200 MiB each stay under the per-process limit (512 MiB), not under the tree's."""
    r = py(TREE, memory_mb=512, timeout_s=30)
    assert r.oom_killed and b"signal" not in r.stderr, r
    assert r.peak_memory_mb is not None and r.peak_memory_mb <= 512.5, r.peak_memory_mb
    statuses = [line for line in r.stdout.decode().splitlines()]
    assert any(line.endswith(" 9)") for line in statuses), statuses  # (pid, 9): killed by the kernel
    ok = py("x = bytearray(300 * 1024 * 1024)\nprint(len(x))", memory_mb=512)
    assert ok.ok and not ok.oom_killed  # one process under the limit is fine


def test_without_a_cgroup_the_watchdog_holds_the_tree(monkeypatch):
    """The fallback of an ordinary user without a delegated cgroup (as the Dockerfile's pods usually are)."""
    from rewards import sandbox

    monkeypatch.setattr(sandbox._CgroupLayout, "_found", sandbox._CgroupLayout("rlimits", {}))
    start = time.monotonic()
    r = py(TREE, memory_mb=512, timeout_s=30)
    assert r.oom_killed and r.returncode == -signal.SIGKILL and r.peak_memory_mb > 512, r
    assert time.monotonic() - start < 5  # killed while the children sleep, not at the timeout
    ok = py("x = bytearray(300 * 1024 * 1024)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint(len(x))",
            memory_mb=512)
    assert ok.ok and not ok.oom_killed and 200 < ok.peak_memory_mb < 512, ok  # sampled: short of the 300 at times


@pytest.mark.skipif(containment() == "rlimits", reason="no cgroup this process may create here")
def test_one_process_limit_holds_the_whole_tree():
    code = ("import threading, time\nn = 0\nfor _ in range(50):\n    try:\n"
            "        threading.Thread(target=time.sleep, args=(3,), daemon=True).start(); n += 1\n"
            "    except RuntimeError: break\nprint(n)")
    r = py(code, max_procs=8)
    assert r.ok and int(r.stdout) < 8 and r.peak_procs <= 8, (r.stdout, r.peak_procs)


def test_the_program_cannot_pass_for_the_sandbox_failing():
    """Only the init's report, on a pipe the program never holds, says the sandbox failed: not an exit code the
    program can choose, nor what it writes to stderr (which once raised SandboxUnavailable for a whole batch)."""
    for code in ("import os; os._exit(125)", "import os; os._exit(126)",
                 "import os; os.write(2, b'unshare: unshare failed: Operation not permitted\\n'); os._exit(1)",
                 "import os; os.write(2, b'setup failed: x\\n'); os._exit(1)"):
        r = py(code)
        assert r.error == "" and r.returncode in (1, 125, 126) and not r.ok, (code, r)
    r = py("import os\nprint(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))")
    assert r.ok and r.stdout == b"[0, 1, 2, 3]\n", r.stdout  # 3: the listing's own descriptor


def test_a_sandbox_that_cannot_run_the_program_is_an_error_not_a_failed_program(tmp_path):
    """What scored every answer 0: the sandbox's uid could not reach the program. Now it is the sandbox's error."""
    private = Path(tempfile.mkdtemp(prefix="chorus-private-"))  # 0700, like a reward process's TMPDIR
    exe = private / "python"
    exe.symlink_to(sys.executable)
    try:
        r = run([str(exe), "-c", "print(1)"])
        if os.geteuid() == 0:  # the program's uid is not root: it cannot enter the 0700 directory
            assert r.error and "cannot execute" in r.error and not r.ok, r
        r = run(["/no/such/interpreter"])
        assert r.error and "cannot execute /no/such/interpreter" in r.error, r
    finally:
        shutil.rmtree(private)


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


_AS_USER = r'''
import json, os, sys
from rewards.sandbox import Limits, containment, run
secret = sys.argv[1]
code = f"import os\nprint(input()[::-1], os.path.exists({secret!r}))\nopen('/usr/x', 'w')"
r = run([sys.executable, "-I", "main.py"], files={"main.py": code}, stdin=b"olleh\n")
tree = run([sys.executable, "-I", "main.py"], files={"main.py": sys.argv[2]}, limits=Limits(memory_mb=512))
memfd = ("import os, time\nfds = [os.memfd_create('x') for _ in range(40)]\n"
         "for fd in fds: os.write(fd, b'x' * (16 << 20))\ntime.sleep(5)")
held = run([sys.executable, "-I", "main.py"], files={"main.py": memfd}, limits=Limits(memory_mb=256, timeout_s=20))
nested = run([sys.executable, "-I", "-c", "import ctypes; print(ctypes.CDLL(None).unshare(0x10000000))"])
print(json.dumps({"stdout": r.stdout.decode(), "stderr": r.stderr.decode()[-300:], "code": r.returncode,
                  "error": r.error, "containment": containment(), "tree_oom": tree.oom_killed,
                  "memfd_oom": held.oom_killed, "memfd_s": held.wall_s, "nested": nested.stdout.decode()}))
'''


def test_an_ordinary_user_gets_the_same_sandbox():
    """As the Dockerfile's uid: a user namespace instead of a private uid, the same file system view."""
    home = readable_dir("chorus-user-")
    try:
        python = user_python(home)
        secret = home / "secret.txt"  # the user's own file: readable by that user, not by its sandbox
        secret.write_text("token")
        (home / "as_user.py").write_text(_AS_USER)
        done = as_user([str(python), str(home / "as_user.py"), str(secret), TREE], home=home, timeout=60)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.splitlines()[-1])
        assert out["error"] == "" and out["stdout"] == "hello False\n", out
        assert out["code"] == 1 and "Read-only file system" in out["stderr"], out
        assert out["tree_oom"], out  # its tree's memory is held too (by the watchdog where it has no cgroup)
        assert out["memfd_oom"] and out["memfd_s"] < 5, out  # memory in anonymous files counts
        assert out["nested"] == "-1\n", out  # no user namespace of its own, to mount a tmpfs of any size in
    finally:
        shutil.rmtree(home)


def test_a_python_reached_through_a_symlink_runs_in_the_sandbox(tmp_path):
    """sys.executable names the link's path; the sandbox shows the installation there too."""
    link = tmp_path / "venv-link"
    link.symlink_to(sys.prefix)
    code = ("import sys\nfrom rewards.sandbox import run\n"
            "r = run([sys.executable, '-I', '-c', 'print(6 * 7)'])\nprint(r.error or r.stdout.decode().strip())")
    done = subprocess.run([str(link / "bin" / "python"), "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "42", (done.stdout, done.stderr[-2000:])
