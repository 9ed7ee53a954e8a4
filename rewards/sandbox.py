"""Run untrusted code (a model's program, a model's SQL query) in a throwaway sandbox.

    result = run([sys.executable, "-I", "main.py"], files={"main.py": code}, stdin=b"1 2\\n", limits=Limits())
    result.ok, result.stdout, result.timed_out, result.error

Each call is one process tree in fresh Linux namespaces, made by util-linux ``unshare``:

- network: a namespace of its own with no interface up, so no connection to anything, not even 127.0.0.1, and no
  abstract Unix socket of the host;
- IPC and UTS: SysV shared memory, semaphores and message queues made inside vanish with the sandbox;
- PID: the sandbox's init is this file's ``_init``; when it exits or is killed, the kernel kills every process
  left in the namespace, however it forked, detached or renamed itself;
- mounts: the program sees a new root (``pivot_root``) that holds only what it needs, read-only: the system
  directories (``/usr``, ``/bin``, ``/lib*``), a few files of ``/etc`` (the linker cache, time zone, users), the
  Python installation and its packages (:func:`exposed`), ``/dev/null``-like devices and its own ``/proc``; plus
  three private tmpfs of ``workdir_mb`` each: the working directory ``/sandbox`` (holding ``files``), ``/tmp`` and
  ``/dev/shm``. Nothing else of the host is there: no home directory, no run data, checkpoints, other runs' files,
  Ray's session directory or pathname Unix sockets; everything vanishes with the namespace;
- the program runs with no capabilities and ``no_new_privs``, as a uid of its own when the host runs as root (as
  CI and these machines do; otherwise in a user namespace mapped to the caller), under rlimits on CPU seconds,
  address space, processes, file size and open files;
- one limit on the memory and the number of processes of the whole tree: a cgroup of its own (v2, or the v1
  ``memory`` and ``pids`` controllers) where this process may create one (root, or a delegated subtree). Elsewhere
  (an unprivileged user without delegation, a read-only /sys/fs/cgroup) processes are limited per uid, and a
  watchdog thread sums the tree's resident memory every 50 ms and kills it past ``memory_mb`` (a poll can be
  outrun for a moment; the per-process address-space limit holds meanwhile). :func:`containment` says which
  applies here.

Before the program starts, the init checks, as the program's uid, that it can execute ``argv[0]`` and read every
file it was given: a sandbox that cannot run the program is :attr:`Result.error` (the reward's failure, counted),
never a program that failed. The host kills the whole tree at the wall-clock ``timeout_s`` and stops collecting
output past ``max_output_bytes`` (the program is killed then too). The output comes back as bytes for the caller to
parse: nothing the program wrote is unpickled.

This file is also the sandbox's init (``python -I -S sandbox.py SPEC``), so it imports only the standard library.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

WORKDIR = "/sandbox"  # the program's working directory, inside the sandbox


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the sandbox (no ``unshare``, or namespaces refused): nothing untrusted is run."""


@dataclass
class Limits:
    timeout_s: float = 10.0  # wall clock, from start to the last process killed
    cpu_s: int = 5  # CPU seconds per process
    memory_mb: int = 1024  # the whole tree's memory (cgroup), and each process's address space
    max_procs: int = 16  # processes and threads of the whole tree (cgroup; else of the sandbox's uid)
    max_open_files: int = 64
    max_file_mb: int = 16  # largest file the program may write
    workdir_mb: int = 64  # size of each private tmpfs (the working directory, /tmp, /dev/shm)
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
    oom_killed: bool = False  # the tree reached its memory limit: the kernel killed a process of it (cgroup), or
    #                           the watchdog killed the sandbox (no cgroup)
    peak_memory_mb: float | None = None  # the tree's peak: its cgroup's, or the watchdog's (sampled) without one
    peak_procs: int | None = None  # likewise, processes and threads

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not (self.timed_out or self.output_limited or self.error)


@dataclass
class _Spec:
    argv: list[str]
    files: dict[str, str]  # relative path -> text
    limits: dict
    uid: int | None  # None: stay the (user-namespace) root, capabilities dropped
    nproc: int
    expose: list[list[str]]  # [host directory, where the sandbox shows it] (read-only): the Python installation
    status_fd: int  # the init's report to the host (see _init), which the program never holds
    env: dict = field(default_factory=dict)


_UNSHARE = ["unshare", "--net", "--ipc", "--uts", "--mount", "--pid", "--fork", "--kill-child",
            "--propagation", "private", "--mount-proc"]


def run(argv: list[str], *, files: dict[str, str] | None = None, stdin: bytes = b"",
        limits: Limits | None = None, env: dict[str, str] | None = None) -> Result:
    """Run ``argv`` in a new sandbox whose working directory holds ``files``; see the module docstring."""
    limits = limits or Limits()
    if shutil.which("unshare") is None:
        raise SandboxUnavailable("the sandbox needs util-linux `unshare` (Debian: apt-get install util-linux)")
    root = os.geteuid() == 0
    host_dir = tempfile.mkdtemp(prefix="chorus-sandbox-")  # 0700; the init mounts the new root over it
    group = Cgroup.create(limits)
    status_r, status_w = os.pipe()
    try:
        spec = _Spec(argv=list(argv), files=dict(files or {}), limits=asdict(limits),
                     uid=_private_uid() if root else None,
                     nproc=limits.max_procs if root else _processes_of(os.getuid()) + limits.max_procs,
                     expose=exposed(), status_fd=status_w, env=dict(env or {}))
        spec_path = Path(host_dir, ".spec.json")
        spec_path.write_text(json.dumps(asdict(spec)))
        cmd = [*_UNSHARE, *([] if root else ["--user", "--map-root-user"]),
               sys.executable, "-I", "-S", str(Path(__file__).resolve()), str(spec_path)]
        result = _supervise(cmd, stdin, limits, group, status_w)
        os.close(status_w)
        status_w = None
        result.error = _setup_error(_read_all(status_r), result)
        if group is not None:
            result.oom_killed, result.peak_memory_mb, result.peak_procs = group.report()
        return result
    finally:
        for fd in (status_r, status_w):
            if fd is not None:
                os.close(fd)
        if group is not None:
            group.remove()
        shutil.rmtree(host_dir, ignore_errors=True)


def _read_all(fd: int) -> str:
    """What the init reported: every writer is gone once the sandbox is (the program never held the pipe)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:  # a writer still open: only if the sandbox outlived its kill, which it cannot
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _setup_error(status: str, result: Result) -> str:
    """The sandbox's own failure from the init's report, never from what the program wrote or how it exited: a
    program may print "unshare: ..." or exit 125 without passing for the sandbox's failure."""
    lines = status.splitlines()
    if not lines or lines[0] != "init":  # unshare never started the init
        if result.returncode is None:  # killed at the deadline before the init ran: a stalled host
            return "sandbox: the init did not start before the timeout"
        stderr = result.stderr.decode(errors="replace").strip()
        if stderr.startswith("unshare:"):
            raise SandboxUnavailable(f"`unshare` refused to build the sandbox: {stderr}")
        return f"sandbox: the init did not start: {stderr[:300] or f'exit {result.returncode}'}"
    return f"sandbox: {lines[1]}" if len(lines) > 1 else ""


def exposed() -> list[list[str]]:
    """The host directories the sandbox shows besides the system ones, as ``[real path, path shown]``: the Python
    installation (``sys.prefix``, ``sys.base_prefix``) and the directories its packages live in (a venv's
    site-packages, or one a ``.pth`` file names), each at its real path and, where that differs, at the path this
    process knows it by (a venv reached through a symlink: ``sys.executable`` names that path). Never ``/``, and
    never a directory another one already shows."""
    given = {sys.prefix, sys.base_prefix, *site.getsitepackages()}
    given |= {p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))}
    pairs = set()
    for path in (p for p in given if p and os.path.isdir(p)):
        real = os.path.realpath(path)
        pairs |= {(real, real), (real, os.path.abspath(path))}
    pairs = {(src, dst) for src, dst in pairs if dst != "/" and not (dst + "/").startswith(_SYSTEM)}
    shown = {(src, dst) for src, dst in pairs  # left out: inside another pair, the same way round
             if not any(dst.startswith(d + "/") and src == s + dst[len(d):] for s, d in pairs)}
    return sorted([src, dst] for src, dst in shown)


def containment() -> str:
    """Which limit holds the whole tree here: ``"cgroup v2"``, ``"cgroup v1"`` or ``"rlimits"`` (processes per uid,
    memory by the watchdog)."""
    return _CgroupLayout.get().kind


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


def _supervise(cmd: list[str], stdin: bytes, limits: Limits, group: Cgroup | None, status_fd: int) -> Result:
    start = time.monotonic()
    prctl = _libc().prctl  # looked up before the fork: the child between fork and exec only calls it
    join = group.joiner() if group is not None else (lambda: None)

    def before_exec():
        # killed if this thread's process dies (a reward process killed at its deadline): then unshare's
        # --kill-child takes the whole sandbox down with it
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        join()  # into the tree's cgroup before anything forks, so that every descendant is counted

    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=before_exec, pass_fds=(status_fd,))
    watchdog = _Watchdog(proc, limits.memory_mb) if group is None else None
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
    if watchdog is not None:
        watchdog.stop()
    result = Result(returncode=None if killed else _signed(code), stdout=bytes(out[fd_out]),
                    stderr=bytes(out[fd_err]), timed_out=timed_out, output_limited=limited,
                    wall_s=time.monotonic() - start)
    if watchdog is not None:
        result.oom_killed, result.peak_memory_mb = watchdog.tripped, watchdog.peak_mb
    return result


class _Watchdog(threading.Thread):
    """Where no cgroup can be made: the tree's memory, polled. Every ``_WATCH_S`` it sums the resident memory of the
    processes in the sandbox's PID namespace and kills the sandbox past ``memory_mb``. A poll can be outrun for a
    moment (the per-process address-space limit still holds then), and memory shared after a fork counts once per
    process, so this errs on the side of the host."""

    def __init__(self, proc: subprocess.Popen, memory_mb: int):
        super().__init__(daemon=True, name="sandbox-watchdog")
        self.proc, self.limit = proc, memory_mb * _MB
        self.tripped, self.peak_mb, self._ns = False, 0.0, None
        self._done = threading.Event()
        self.start()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._done.wait(_WATCH_S):
            if self._ns is None:
                self._ns = self._namespace()
                continue
            rss, memfds = 0, {}
            for entry in os.scandir("/proc"):
                try:
                    if entry.name.isdigit() and os.readlink(f"/proc/{entry.name}/ns/pid") == self._ns:
                        rss += int(Path(f"/proc/{entry.name}/statm").read_text().split()[1]) * page
                        memfds.update(_memfds(entry.name))
                except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
                    pass
            rss += sum(memfds.values())
            self.peak_mb = max(self.peak_mb, rss / _MB)
            if rss > self.limit:
                self.tripped = True
                _kill(self.proc)
                return

    def _namespace(self) -> str | None:
        """The PID namespace of the sandbox's init (unshare's child), once it exists."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            return os.readlink(f"/proc/{children[0]}/ns/pid") if children else None
        except OSError:
            return None


_WATCH_S = 0.05


def _memfds(pid: str) -> dict[tuple[int, int], int]:
    """The anonymous files (memfd_create) process ``pid`` holds open, by inode: memory no RSS shows."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                found[(st.st_dev, st.st_ino)] = st.st_blocks * 512
        except OSError:
            pass
    return found


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
# The tree's cgroup, made by the host before the sandbox starts and removed after it.

_MB = 1024 * 1024


@dataclass
class _CgroupLayout:
    """Where this process may make cgroups: ``parents`` maps a controller (``memory``, ``pids``; ``""`` for the
    unified v2 tree) to the directory new cgroups go under. Found once per process."""
    kind: str
    parents: dict[str, str]

    _found = None

    @classmethod
    def get(cls) -> _CgroupLayout:
        if cls._found is None:
            cls._found = cls._find()
            cls._found.sweep()
        return cls._found

    @classmethod
    def _find(cls) -> _CgroupLayout:
        try:
            memberships = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
            mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        except OSError:
            return cls("rlimits", {})
        v1, v2 = {}, None
        for m in mounts:
            sep = m.index("-")
            fstype, super_opts, root, point = m[sep + 1], m[sep + 3].split(","), m[3], m[4]
            if fstype == "cgroup2":
                v2 = (root, point)
            elif fstype == "cgroup":
                for ctrl in ("memory", "pids"):
                    if ctrl in super_opts:
                        v1[ctrl] = (root, point)
        paths = {ctrls: path for _, ctrls, path in memberships}
        if v2 is not None and "" in paths:
            own = _under(*v2, paths[""])
            for parent in _v2_candidates(own, v2[1]) if own else []:
                if _v2_delegated(parent, enable=parent == own):
                    return cls("cgroup v2", {"": parent})
        found = {}
        for ctrl, mount in v1.items():
            member = next((path for ctrls, path in paths.items() if ctrl in ctrls.split(",")), None)
            parent = _under(*mount, member) if member is not None else None
            if parent and os.access(parent, os.W_OK):
                found[ctrl] = parent
        if set(found) == {"memory", "pids"}:
            return cls("cgroup v1", found)
        return cls("rlimits", {})

    def sweep(self) -> None:
        """Remove the cgroups of sandboxes whose host process died before it could (a SIGKILL mid-run): named
        ``chorus-sandbox-<pid>-...``, empty once their tree is gone."""
        for parent in self.parents.values():
            for name in os.listdir(parent):
                if name.startswith("chorus-sandbox-"):
                    pid = name.split("-")[2]
                    if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                        try:
                            os.rmdir(os.path.join(parent, name))
                        except OSError:  # still holds a process: leave it
                            pass


def _under(root: str, point: str, member: str) -> str | None:
    """The directory of cgroup ``member`` in a hierarchy whose ``root`` is mounted at ``point``."""
    if not (member == root or member.startswith(root.rstrip("/") + "/")):
        return None
    path = os.path.join(point, member[len(root):].lstrip("/"))
    return path if os.path.isdir(path) else None


def _v2_candidates(own: str, mount: str) -> list[str]:
    """This process's cgroup, then its ancestors up to the hierarchy's root: where a sandbox cgroup may go."""
    found = [own]
    while found[-1].rstrip("/") != mount.rstrip("/") and found[-1] != "/":
        found.append(os.path.dirname(found[-1].rstrip("/")))
    return found


def _v2_delegated(parent: str, enable: bool) -> bool:
    """Children of ``parent`` get the memory and pids controllers. Enabling them (only tried on this process's own
    cgroup) fails where it holds processes itself and is not the root; an ancestor that already enables them
    (the root, when this process may write there) will do instead. Else the sandbox falls back to rlimits."""
    control = Path(parent, "cgroup.subtree_control")
    try:
        if enable and not {"memory", "pids"} <= set(control.read_text().split()):
            control.write_text("+memory +pids")
        return {"memory", "pids"} <= set(control.read_text().split()) and os.access(parent, os.W_OK)
    except OSError:
        return False


class Cgroup:
    """One sandbox tree's cgroup(s), with its memory and process limits."""

    def __init__(self, kind: str, dirs: dict[str, str]):
        self.kind, self.dirs = kind, dirs  # controller ("" for v2) -> the cgroup's directory
        self._fds: list[int] = []  # its cgroup.procs files, open for the sandbox's first process to join

    @classmethod
    def create(cls, limits: Limits) -> Cgroup | None:
        layout = _CgroupLayout.get()
        if not layout.parents:
            return None
        name = f"chorus-sandbox-{os.getpid()}-{os.urandom(4).hex()}"
        group = cls(layout.kind, {})
        try:
            for ctrl, parent in layout.parents.items():
                path = os.path.join(parent, name)
                os.mkdir(path)
                group.dirs[ctrl] = path
            memory, procs = str(limits.memory_mb * _MB), str(limits.max_procs)
            if layout.kind == "cgroup v2":
                group._write("", "memory.max", memory)
                group._write("", "memory.swap.max", "0", optional=True)
                group._write("", "pids.max", procs)
            else:
                group._write("memory", "memory.limit_in_bytes", memory)
                group._write("memory", "memory.memsw.limit_in_bytes", memory, optional=True)  # no swapping out
                group._write("pids", "pids.max", procs)
        except OSError:
            group.remove()
            _CgroupLayout._found = _CgroupLayout("rlimits", {})  # it cannot be done here: do not try again
            return None
        return group

    def _write(self, ctrl: str, name: str, value: str, optional: bool = False) -> None:
        path = os.path.join(self.dirs[ctrl], name)
        if optional and not os.path.exists(path):
            return
        Path(path).write_text(value)

    def _read(self, ctrl: str, name: str) -> str | None:
        try:
            return Path(self.dirs[ctrl], name).read_text()
        except (OSError, KeyError):
            return None

    def joiner(self):
        """A function for the sandbox's first process to call between fork and exec: it moves itself in."""
        fds = [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC) for d in self.dirs.values()]

        def join():
            for fd in fds:
                os.write(fd, b"0")  # "0": the writing process

        self._fds = fds
        return join

    def report(self) -> tuple[bool, float | None, int | None]:
        """(killed by the memory limit, peak memory in MiB, peak processes) of the tree that ran."""
        v2 = self.kind == "cgroup v2"
        events = self._read("" if v2 else "memory", "memory.events" if v2 else "memory.oom_control") or ""
        oom = any(line.split()[:1] == ["oom_kill"] and int(line.split()[1]) > 0 for line in events.splitlines())
        peak = self._read("" if v2 else "memory", "memory.peak" if v2 else "memory.max_usage_in_bytes")
        procs = self._read("" if v2 else "pids", "pids.peak")
        return oom, int(peak) / _MB if peak else None, int(procs) if procs else None

    def remove(self) -> None:
        """Remove the cgroups; the kernel refuses while a killed process of the tree is still exiting."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        for path in self.dirs.values():
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        self.dirs = {}


# ---------------------------------------------------------------------------------------------------------------
# Inside the sandbox: PID 1 of the new namespaces, still privileged there. Build the new root over the spec's
# directory, pivot into it, write the working files, then fork the program with no privileges and wait for it.

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC = 1, 2, 4, 8, 32, 4096, 16384
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME, _MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_MNT_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "noatime": _MS_NOATIME,
              "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME, "strictatime": _MS_STRICTATIME}
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP = 1, 38, 24
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}

_SYSTEM = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib32/", "/lib64/", "/libx32/")  # shown whole (read-only)
_ETC = ("ld.so.cache", "ld.so.conf", "localtime", "passwd", "group", "nsswitch.conf")  # of /etc, only these
_DEVICES = ("null", "zero", "full", "random", "urandom")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source, target: str, fstype, flags: int, data) -> None:
    enc = (lambda s: None if s is None else s.encode())
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _mounts_at(top: str) -> list[tuple[str, int]]:
    """(mount point, per-mount flags) of the mounts at ``top`` and beneath it, parents first. In a user namespace
    the flags are locked: a remount must keep them, adding read-only."""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")  # \040 etc.
        if point == top or point.startswith(top.rstrip("/") + "/"):
            found[point] = sum(_MNT_FLAGS.get(opt, 0) for opt in fields[5].split(","))  # the newest one there
    return sorted(found.items(), key=lambda item: item[0].count("/"))


def _bind(libc, source: str, target: str, *, nodev: bool = True) -> None:
    """``source`` shown read-only at ``target``, with the mounts beneath it (a user namespace may not bind a
    directory without them: on GPU hosts, driver libraries are often mounted inside /usr), each made read-only."""
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        Path(target).touch(mode=0o644)
    _mount(libc, source, target, None, _MS_BIND | _MS_REC, None)
    for point, flags in _mounts_at(target):
        flags |= _MS_RDONLY | _MS_NOSUID | (_MS_NODEV if nodev else 0)
        _mount(libc, None, point, None, _MS_REMOUNT | _MS_BIND | flags, None)


def _tmpfs(libc, target: str, size_mb: int, mode: str) -> None:
    os.makedirs(target, mode=0o755, exist_ok=True)
    _mount(libc, "tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size_mb}m,mode={mode}")


def _build_root(libc, new: str, spec: dict) -> None:
    """The sandbox's file system, on a tmpfs over ``new``: see the module docstring."""
    size = spec["limits"]["workdir_mb"]
    _mount(libc, "tmpfs", new, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    _tmpfs(libc, f"{new}/dev/shm", size, "1777")  # first: an exposed directory may lie under /tmp
    _tmpfs(libc, f"{new}/tmp", size, "1777")
    _tmpfs(libc, new + WORKDIR, size, "0700")
    for top in (p.strip("/") for p in _SYSTEM):
        host = "/" + top
        if os.path.islink(host):  # a merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(host), os.path.join(new, top))
        elif os.path.isdir(host):
            _bind(libc, host, os.path.join(new, top))
    for name in _ETC:
        if os.path.isfile(f"/etc/{name}"):
            _bind(libc, f"/etc/{name}", f"{new}/etc/{name}")
    for source, target in spec["expose"]:
        _bind(libc, source, new + target)
    for name in _DEVICES:
        if os.path.exists(f"/dev/{name}"):
            _bind(libc, f"/dev/{name}", f"{new}/dev/{name}", nodev=False)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{new}/dev/{name}")
    os.makedirs(f"{new}/proc")
    _mount(libc, "/proc", f"{new}/proc", None, _MS_BIND, None)  # the PID namespace's own, from --mount-proc


def _pivot(libc, new: str) -> None:
    """Make ``new`` the root and drop the old one entirely (not just hide it, as chroot would)."""
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(f"pivot_root: unknown syscall number on {platform.machine()}")
    os.chdir(new)
    os.mkdir(".old")
    if libc.syscall(ctypes.c_long(number), b".", b".old") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")
    os.chdir("/")
    if libc.umount2(b"/.old", _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount the old root: {os.strerror(err)}")
    os.rmdir("/.old")
    _mount(libc, None, "/", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")


def _limit_namespaces(spec: dict) -> None:
    """Limits kept inside the sandbox's own namespaces. Its IPC namespace: SysV shared memory at most memory_mb (no
    process holds a segment's memory, so neither the watchdog nor an OOM kill would free it). As root: the init
    itself out of the OOM killer's reach where the host allows it, so that a kill frees the program's memory. In a user
    namespace (no cgroup as a rule): no nested user namespace, in which the program could mount a tmpfs of any
    size, memory no process holds."""
    mb = spec["limits"]["memory_mb"]
    Path("/proc/sys/kernel/shmmax").write_text(str(mb * _MB))
    Path("/proc/sys/kernel/shmall").write_text(str(mb * _MB // os.sysconf("SC_PAGE_SIZE")))
    if spec["uid"] is not None:
        try:
            Path("/proc/self/oom_score_adj").write_text("-1000")
        except OSError:  # refused on some hosts; the program's +1000 still makes it the one the killer takes
            pass
    else:
        Path("/proc/sys/user/max_user_namespaces").write_text("0")


def _drop_privileges(libc, spec: dict) -> None:
    """In the forked child, just before exec: rlimits, then no way back to any privilege."""
    lim = spec["limits"]
    for what, value in ((resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
                        (resource.RLIMIT_AS, (lim["memory_mb"] * _MB,) * 2),
                        (resource.RLIMIT_NPROC, (spec["nproc"],) * 2),
                        (resource.RLIMIT_FSIZE, (lim["max_file_mb"] * _MB,) * 2),
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


def _check_access(spec: dict) -> None:
    """As the program's uid: it can run ``argv[0]`` and read its files (else the sandbox, not the program, failed:
    the error that scored every answer 0 when the working directory was unreachable to the sandbox's uid)."""
    exe = spec["argv"][0]
    exe = exe if "/" in exe else shutil.which(exe, path="/usr/local/bin:/usr/bin:/bin") or exe
    if not os.access(exe, os.X_OK):
        raise OSError(f"the sandbox's uid cannot execute {exe}")
    for rel in spec["files"]:
        if not os.access(os.path.join(WORKDIR, rel), os.R_OK):
            raise OSError(f"the sandbox's uid cannot read {rel}")


def _init(spec_path: str) -> int:
    """PID 1 of the sandbox. It reports to the host on the status pipe, which the program never holds: "init" once
    it runs, then one line if the program could not be started (setup, exec); the exit code is the program's."""
    spec = json.loads(Path(spec_path).read_text())
    status = spec["status_fd"]
    os.write(status, b"init\n")
    libc = _libc()
    try:
        _limit_namespaces(spec)
        _build_root(libc, os.path.dirname(spec_path), spec)
        _pivot(libc, os.path.dirname(spec_path))
        for rel, text in spec["files"].items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise OSError(f"file name {rel!r} leaves the working directory")
            path = Path(WORKDIR, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, errors="replace")  # a lone surrogate in a response becomes '?'
        if spec["uid"] is not None:
            for dirpath, dirnames, filenames in os.walk(WORKDIR):
                for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                    os.chown(name, spec["uid"], spec["uid"])
        os.chdir(WORKDIR)
    except Exception as exc:  # noqa: BLE001  (whatever it is, the program must not start)
        os.write(status, f"setup failed: {exc}\n".encode())
        return 1
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", **spec["env"]}
    pid = os.fork()
    if pid == 0:
        try:
            os.set_inheritable(status, False)  # closed by the exec: the program never holds it
            Path("/proc/self/oom_score_adj").write_text("1000")  # the first the OOM killer takes, never the init
            _drop_privileges(libc, spec)
            _check_access(spec)
            os.execve(spec["argv"][0], spec["argv"], env)
        except OSError as exc:
            os.write(status, f"cannot start {spec['argv'][0]}: {exc}\n".encode())
        os._exit(1)
    os.close(status)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:  # reap whatever gets reparented to us; leave when the program itself is done
        done, status = os.wait()
        if done == pid:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(_init(sys.argv[1]))
