"""Run a command as an ordinary user, the way the Dockerfile's pods run (uid 1000), from a test running as root.

The project's venv may sit where that user cannot reach (here its interpreter is under /root, which is 0700), so
:func:`user_python` makes a venv of the system's ``python3.11`` that the user can read, whose ``.pth`` file puts
the project's installed packages and the repository on ``sys.path``: the same code, an interpreter the user can
execute. Tests that need this skip where the machine cannot provide it (not root, no ``setpriv``, no system
Python 3.11).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UID = 1000  # ops/Dockerfile's USER


def skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("running as another user needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("needs util-linux setpriv")
    if shutil.which("python3.11", path="/usr/local/bin:/usr/bin:/bin") is None:
        pytest.skip("needs a system python3.11 the user can execute")


def user_python(base: Path) -> Path:
    """A venv under ``base`` (made readable to everyone) that the user can run; returns its interpreter."""
    skip_unless_possible()
    venv = base / "venv"
    system = shutil.which("python3.11", path="/usr/local/bin:/usr/bin:/bin")
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    (pth,) = venv.glob("lib/python3.*/site-packages")
    (pth / "chorus.pth").write_text("\n".join([*site.getsitepackages(), str(ROOT)]) + "\n")
    for path in [base, *base.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    for exe in (venv / "bin").iterdir():
        if not exe.is_symlink():
            exe.chmod(0o755)
    return venv / "bin" / "python"


def readable_dir(prefix: str) -> Path:
    """A fresh directory the user may read and write (``tempfile.mkdtemp`` makes 0700 ones)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o777)
    return path


def as_user(argv: list[str], *, home: Path, **kwargs) -> subprocess.CompletedProcess:
    """``argv`` run as uid/gid 1000 with no supplementary groups, in the repository, HOME and TMPDIR ``home``."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(home), "LANG": "C.UTF-8"}
    return subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)
