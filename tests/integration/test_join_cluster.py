"""`chorus train` joins an existing Ray cluster named by RAY_ADDRESS instead of starting its own, and leaves it
running when done."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


# A cluster started by `ray start` uses token authentication; a driver joining it by address must say so
# (the token itself is read from ~/.ray/auth_token).
ENV = {**os.environ, "RAY_AUTH_MODE": "token"}


@pytest.fixture
def ray_head():
    """A Ray head of its own (``ray start --block`` in a new session), stopped by killing that session only, so
    that no other Ray instance on the machine is touched."""
    port = "6391"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, env=ENV,
                             timeout=60).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "ray head did not come up"
            time.sleep(2)
        yield address
    finally:
        head.terminate()  # `ray start --block` stops its own processes on SIGTERM
        try:
            head.wait(timeout=60)
        finally:
            try:
                os.killpg(head.pid, signal.SIGKILL)  # whatever is left of that session
            except ProcessLookupError:
                pass
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_train_joins_ray_address_and_leaves_cluster_up(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    env = {**ENV, "RAY_ADDRESS": ray_head}
    proc = subprocess.run(
        [sys.executable, "-m", "actors.cli", "train", str(ROOT / "configs" / "from_scratch" / "reverse.yaml"),
         "--run-dir", str(run_dir), "train.steps=2", "data.synthetic.num_eval=10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Started a local Ray instance" not in proc.stderr
    assert "Connected to Ray cluster" in proc.stderr or "Connecting to existing Ray cluster" in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    status = subprocess.run([RAY, "status", f"--address={ray_head}"], capture_output=True, text=True, timeout=60,
                            env=ENV)
    assert status.returncode == 0 and "CPU" in status.stdout, status.stdout + status.stderr
