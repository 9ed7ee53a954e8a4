"""Run untrusted code (a model's program, a model's SQL query) in a throwaway sandbox.

    result = run([sys.executable, "-I", "main.py"], files={"main.py": code}, stdin=b"1 2\\n", limits=Limits())
    result.ok, result.stdout, result.timed_out, result.error

Each call is one process tree in fresh Linux namespaces, made by util-linux ``unshare``:

- network: a namespace of its own with no interface up, so no connection to anything, not even 127.0.0.1;
- PID: the sandbox's init is this file's ``_init``; when it exits or is killed, the kernel kills every process
  left in the namespace, however it forked, detached or renamed itself;
- mounts: home directories (``/root``, ``/home``: keys, tokens) are hidden under an empty tmpfs, except the Python
  installation itself, put back read-only at its own path; every mount is remounted read-only; the working
  directory is a private tmpfs of ``workdir_mb`` that holds the ``files`` and vanishes with the namespace, so
  nothing is written outside it and there is nothing to clean up;
- the program runs with no capabilities and ``no_new_privs``, as a uid of its own when the host runs as root (as
  CI and these machines do; otherwise in a user namespace mapped to the caller), under rlimits on CPU seconds,
  address space, processes, file size and open files.

The host kills the whole tree at the wall-clock ``timeout_s`` and stops collecting output past
``max_output_bytes`` (the program is killed then too). The output comes back as bytes for the caller to parse as
JSON: nothing the program wrote is unpickled.

This file is also the sandbox's init (``python -I -S sandbox.py SPEC``), so it imports only the standard library.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Exit codes of the sandbox's init, for failures before the program starts.
SETUP_FAILED = 125
EXEC_FAILED = 126


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the sandbox (no ``unshare``, or namespaces refused): nothing untrusted is run."""


@dataclass
class Limits:
    timeout_s: float = 10.0  # wall clock, from start to the last process killed
    cpu_s: int = 5  # CPU seconds per process
    memory_mb: int = 1024  # address space per process
    max_procs: int = 16  # processes and threads of the sandbox's uid
    max_open_files: int = 64
    max_file_mb: int = 16  # largest file the program may write
    workdir_mb: int = 64  # size of the private tmpfs working directory
    max_output_bytes: int = 1 << 20  # stdout and stderr each; the program is killed past it


@dataclass
class Result:
    returncode: int | None  # None when killed by the host (timeout, output limit); -N when a signal N ended it
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    output_limited: bool = False
    wall_s: float = 0.0
    error: str = ""  # the sandbox's own failure (setup, exec), never the program's

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not (self.timed_out or self.output_limited or self.error)


@dataclass
class _Spec:
    argv: list[str]
    files: dict[str, str]  # relative path -> text
    limits: dict
    workdir: str
    uid: int | None  # None: stay the (user-namespace) root, capabilities dropped
    nproc: int
    expose: list[str]  # directories under a hidden one that stay visible (read-only): the Python installation
    env: dict = field(default_factory=dict)


_UNSHARE = ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
            "--mount-proc"]


def run(argv: list[str], *, files: dict[str, str] | None = None, stdin: bytes = b"",
        limits: Limits | None = None, env: dict[str, str] | None = None) -> Result:
    """Run ``argv`` in a new sandbox whose working directory holds ``files``; see the module docstring."""
    limits = limits or Limits()
    if shutil.which("unshare") is None:
        raise SandboxUnavailable("the sandbox needs util-linux `unshare` (Debian: apt-get install util-linux)")
    root = os.geteuid() == 0
    host_dir = tempfile.mkdtemp(prefix="chorus-sandbox-")  # 0700; the sandbox mounts its tmpfs over it
    try:
        spec = _Spec(argv=list(argv), files=dict(files or {}), limits=asdict(limits), workdir=host_dir,
                     uid=_private_uid() if root else None,
                     nproc=limits.max_procs if root else _processes_of(os.getuid()) + limits.max_procs,
                     expose=sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}),
                     env=dict(env or {}))
        spec_path = Path(host_dir, ".spec.json")
        spec_path.write_text(json.dumps(asdict(spec)))
        cmd = [*_UNSHARE, *([] if root else ["--user", "--map-root-user"]),
               sys.executable, "-I", "-S", str(Path(__file__).resolve()), str(spec_path)]
        return _supervise(cmd, stdin, limits)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def _private_uid() -> int:
    """A uid no account uses, different per call, so that concurrent sandboxes share no process budget."""
    return 200_000 + int.from_bytes(os.urandom(4), "little") % 1_000_000


def _processes_of(uid: int) -> int:
    n = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            n += any(line.startswith("Uid:") and line.split()[1] == str(uid)
                     for line in status.read_text().splitlines())
        except OSError:
            pass
    return n


def _supervise(cmd: list[str], stdin: bytes, limits: Limits) -> Result:
    start = time.monotonic()
    prctl = _libc().prctl  # looked up before the fork: the child between fork and exec only calls it
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True,
                            # killed if this thread's process dies (a reward process killed at its deadline):
                            # then unshare's --kill-child takes the whole sandbox down with it
                            preexec_fn=lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
    fd_out, fd_err = proc.stdout.fileno(), proc.stderr.fileno()
    out = {fd_out: bytearray(), fd_err: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    try:
        proc.stdin.write(stdin)
    except BrokenPipeError:  # the program did not read it all: its business
        pass
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
    timed_out = limited = False
    deadline = start + limits.timeout_s
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = out[key.fd]
            buf += chunk[: max(0, limits.max_output_bytes - len(buf))]
            if len(buf) >= limits.max_output_bytes:
                limited = True
        if limited:
            break
    killed = timed_out or limited
    if killed:
        _kill(proc)
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # output closed but the init lingers: same as running past the deadline
        timed_out = killed = True
        _kill(proc)
        code = proc.wait()
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    sel.close()
    stdout, stderr = bytes(out[fd_out]), bytes(out[fd_err])
    error = ""
    if not killed and code in (SETUP_FAILED, EXEC_FAILED):
        error = stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {code}"]
        error = f"sandbox: {error[0]}"
    if not killed and code == 1 and stderr.startswith(b"unshare:"):
        raise SandboxUnavailable(f"`unshare` refused to build the sandbox: {stderr.decode(errors='replace')}")
    return Result(returncode=None if killed else _signed(code), stdout=stdout, stderr=stderr, timed_out=timed_out,
                  output_limited=limited, wall_s=time.monotonic() - start, error=error)


def _signed(code: int) -> int:
    """The init reports a program killed by signal N as 128 + N; return it as -N, as subprocess does."""
    return -(code - 128) if 128 < code < 128 + 65 else code


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL ``unshare`` and its session; ``--kill-child`` then kills the sandbox's init, and the kernel every
    process left in its PID namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Inside the sandbox: PID 1 of the new namespaces, still privileged there. Make the mounts read-only, build the
# working directory, then fork the program with no privileges and wait for it.

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC = 1, 2, 4, 8, 32, 4096, 16384
_MNT_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC}
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP = 1, 38, 24


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source, target: str, fstype, flags: int, data) -> None:
    enc = (lambda s: None if s is None else s.encode())
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _mounts() -> list[tuple[str, int]]:
    """(mount point, per-mount flags) of every mount, parents before children."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")  # \040 etc.
        flags = sum(_MNT_FLAGS.get(opt, 0) for opt in fields[5].split(","))
        found.append((point, flags))
    return found


_HIDDEN = ("/root", "/home")


def _hide_homes(libc, expose: list[str]) -> None:
    """An empty tmpfs over each home directory, with the ``expose`` directories under it bound back in place."""
    for hidden in _HIDDEN:
        if not os.path.isdir(hidden):
            continue
        keep = [p for p in expose if p.startswith(hidden + "/")]
        handles = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in keep}  # reachable once covered
        _mount(libc, "tmpfs", hidden, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
        for path, fd in handles.items():
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC, None)
            os.close(fd)


def _lock_down(libc, spec: dict) -> None:
    workdir, limits = spec["workdir"], spec["limits"]
    _hide_homes(libc, spec["expose"])
    for point, flags in _mounts():
        if point == "/proc" or point.startswith("/proc/"):
            continue  # the namespace's own procfs: read-only to the unprivileged program anyway
        try:
            _mount(libc, None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags, None)
        except OSError as exc:
            if not os.statvfs(point).f_flag & os.ST_RDONLY:
                raise OSError(f"cannot make {point} read-only ({exc.strerror})") from None
    _mount(libc, "tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={limits['workdir_mb']}m,mode=0700")


def _drop_privileges(libc, spec: dict) -> None:
    """In the forked child, just before exec: rlimits, then no way back to any privilege."""
    lim = spec["limits"]
    mb = 1024 * 1024
    for what, value in ((resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
                        (resource.RLIMIT_AS, (lim["memory_mb"] * mb,) * 2),
                        (resource.RLIMIT_NPROC, (spec["nproc"],) * 2),
                        (resource.RLIMIT_FSIZE, (lim["max_file_mb"] * mb,) * 2),
                        (resource.RLIMIT_NOFILE, (lim["max_open_files"],) * 2),
                        (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(what, value)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS)")
    if spec["uid"] is not None:  # root on the host: become a uid of our own, which clears every capability
        uid = spec["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    else:  # root of a user namespace: keep the uid, drop the capabilities (bounding set, then the sets)
        for cap in range(64):
            libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset")


def _init(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    workdir = spec["workdir"]
    libc = _libc()
    try:
        _lock_down(libc, spec)
        for rel, text in spec["files"].items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise OSError(f"file name {rel!r} leaves the working directory")
            path = Path(workdir, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if spec["uid"] is not None:
            for dirpath, dirnames, filenames in os.walk(workdir):
                for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                    os.chown(name, spec["uid"], spec["uid"])
        os.chdir(workdir)
    except Exception as exc:  # noqa: BLE001  (whatever it is, the program must not start)
        print(f"setup failed: {exc}", file=sys.stderr)
        return SETUP_FAILED
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", **spec["env"]}
    pid = os.fork()
    if pid == 0:
        try:
            _drop_privileges(libc, spec)
            os.execve(spec["argv"][0], spec["argv"], env)
        except OSError as exc:
            os.write(2, f"cannot start {spec['argv'][0]}: {exc}\n".encode())
        os._exit(EXEC_FAILED)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:  # reap whatever gets reparented to us; leave when the program itself is done
        done, status = os.wait()
        if done == pid:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(_init(sys.argv[1]))
