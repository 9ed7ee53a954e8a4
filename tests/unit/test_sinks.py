"""Metric sinks against the real libraries: TensorBoard's event files read back with TensorBoard's own reader, and an
offline W&B run read back from its transaction log (run_dir/wandb/offline-run-*/run-ID.wandb)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from actors.sinks import TensorBoardSink, WandbSink

ROOT = Path(__file__).resolve().parents[2]

# Two records at step 0 (the starting model's evaluation, then step 0's training), a final evaluation at step 2 ==
# steps; values the sinks skip: None, text, a list. 0.1 is not a float32: TensorBoard holds 0.1 +- 1e-8.
RECORDS = [
    {"step": 0, "initial": True, "eval/target/accuracy": 0.25, "eval_seconds": 1.5},
    {"step": 0, "mu": 0.5, "loss": 0.1, "reward_mean": None, "phase": "sft", "lengths": [3, 4], "policy_lag": 0},
    {"step": 1, "mu": 0.25, "loss": float("nan"), "reward_mean": 0.5, "reward/exact_match": 0.5, "policy_lag": 1},
    {"step": 2, "final": True, "eval/target/accuracy": 0.75},
]


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag with its (step, value) events, as TensorBoard loads them (restart purges included)."""
    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _approx(events: list[tuple[int, float]]) -> list:
    return [(step, pytest.approx(value, rel=1e-6)) for step, value in events]


@pytest.mark.timeout(60)
def test_tensorboard_holds_each_numeric_key_at_its_step(tmp_path):
    sink = TensorBoardSink(tmp_path / "tensorboard")
    for record in RECORDS:
        sink.write(record)
    sink.close()
    got = _scalars(tmp_path / "tensorboard")
    assert set(got) == {"initial", "eval/target/accuracy", "eval_seconds", "mu", "loss", "policy_lag", "reward_mean",
                        "reward/exact_match", "final"}  # no step, phase, lengths
    assert got["eval/target/accuracy"] == _approx([(0, 0.25), (2, 0.75)])
    assert got["initial"] == [(0, 1.0)] and got["final"] == [(2, 1.0)]  # bools as 0/1
    assert got["eval_seconds"] == [(0, 1.5)]
    assert got["mu"] == _approx([(0, 0.5), (1, 0.25)])
    assert got["policy_lag"] == [(0, 0.0), (1, 1.0)]
    assert got["reward_mean"] == [(1, 0.5)]  # step 0's None left out
    assert got["reward/exact_match"] == [(1, 0.5)]
    (step0, loss0), (step1, loss1) = got["loss"]
    assert (step0, step1) == (0, 1) and loss0 == pytest.approx(0.1, rel=1e-6) and math.isnan(loss1)


@pytest.mark.timeout(60)
def test_tensorboard_record_is_on_disk_when_write_returns(tmp_path):
    """A crash after write() loses nothing: the event file is flushed per record, not every 120 s."""
    sink = TensorBoardSink(tmp_path)
    sink.write({"step": 7, "loss": 0.5})
    assert _scalars(tmp_path) == {"loss": [(7, 0.5)]}
    sink.write({"step": 8, "loss": 0.25})
    assert _scalars(tmp_path) == {"loss": [(7, 0.5), (8, 0.25)]}
    sink.close()


@pytest.mark.timeout(60)
def test_tensorboard_resume_replaces_the_redone_steps(tmp_path):
    """A run crashed after logging steps 0-3 and resumes from a checkpoint of 2 steps: TensorBoard shows steps 0-1
    from the first process and 2-4 from the second (the first's steps >= 2 purged, their tags too)."""
    first = TensorBoardSink(tmp_path)
    for step in range(4):
        first.write({"step": step, "loss": float(step), "old_only": 1.0})
    first.close()
    second = TensorBoardSink(tmp_path)
    for step in range(2, 5):
        second.write({"step": step, "loss": 10.0 + step})
    second.close()
    got = _scalars(tmp_path)
    assert got["loss"] == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0)]
    assert got["old_only"] == [(0, 1.0), (1, 1.0)]


# --- W&B: the transaction log is LevelDB's log format (https://github.com/google/leveldb/blob/main/doc/log_format.md)
# after a 7-byte header (":W&B", 0xBEE1, version 0); each record is a wandb_internal_pb2.Record.

def _wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, payload = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # cut short by a crash
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def _items(items) -> dict:
    """History or config items as {key: value}; W&B stores a key in ``key`` or as a one-part ``nested_key``."""
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def _wandb_runs(run_dir: Path) -> list[dict]:
    """Each offline-run directory in order: its run id, config, and history rows as (step, {key: value}) without
    W&B's own keys (_step must equal the step, _runtime and _timestamp dropped)."""
    runs = []
    for run_path in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log_file,) = run_path.glob("run-*.wandb")
        run = {"dir": run_path, "id": None, "config": {}, "rows": []}
        for record in _wandb_records(log_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["config"] = _items(record.run.config.update)
            elif kind == "history":
                row = _items(record.history.item)
                assert row.pop("_step") == record.history.step.num
                run["rows"].append((record.history.step.num, {k: v for k, v in row.items() if not k.startswith("_")}))
        runs.append(run)
    return runs


def _wandb_core_children() -> list[str]:
    return [p.name() for p in psutil.Process().children(recursive=True) if "wandb" in p.name()]


@pytest.fixture
def wandb_cache(tmp_path, monkeypatch):
    """wandb-core's debug log goes to $WANDB_CACHE_DIR/wandb/logs (default ~/.cache): keep it out of $HOME."""
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


@pytest.mark.timeout(120)
def test_wandb_offline_history_and_resume(tmp_path, capfd, caplog, wandb_cache):
    caplog.set_level("INFO", logger="actors.sinks")
    run_dir = tmp_path / "run"
    sink = WandbSink(run_dir, project="chorus-test", name="unit", mode="offline", config={"algo": {"mu": 0.5}})
    for record in RECORDS:
        sink.write(record)
    sink.write({"step": 1, "loss": 9.0})  # lower than the open row (2): dropped, W&B would warn
    sink.close()
    assert _wandb_core_children() == []  # close() stopped wandb's service
    (first,) = _wandb_runs(run_dir)
    run_id = json.loads((run_dir / "wandb_run.json").read_text())["id"]
    assert first["id"] == run_id and first["config"]["algo"] == {"mu": 0.5}
    assert [step for step, _ in first["rows"]] == [0, 1, 2]
    assert first["rows"][0][1] == {"initial": 1, "eval/target/accuracy": 0.25, "eval_seconds": 1.5, "mu": 0.5,
                                   "loss": 0.1, "policy_lag": 0}  # both step-0 records in one row, None/text/list out
    row1 = dict(first["rows"][1][1])
    assert math.isnan(row1.pop("loss")) and row1 == {"mu": 0.25, "reward_mean": 0.5, "reward/exact_match": 0.5,
                                                     "policy_lag": 1}
    assert first["rows"][2] == (2, {"final": 1, "eval/target/accuracy": 0.75})
    assert type(first["rows"][2][1]["final"]) is int  # 1, not true: W&B charts plot numbers

    # Resumed from a checkpoint of 1 step: steps 1 and 2 are redone; W&B already holds them, so they are dropped.
    # Step 3 comes after the open row of step 4: dropped too (W&B would warn).
    sink = WandbSink(run_dir, project="chorus-test", name="unit", mode="offline", config={"algo": {"mu": 0.5}})
    for record in [{"step": 1, "loss": 8.0}, {"step": 2, "loss": 7.0}, {"step": 4, "loss": 0.125},
                   {"step": 4, "eval/target/accuracy": 0.5}, {"step": 3, "loss": 6.0}, {"step": 5, "final": True}]:
        sink.write(record)
    sink.close()
    assert "3 re-logged records dropped" in caplog.text  # steps 1, 2 and 3 of the resumed process
    assert _wandb_core_children() == []
    first_again, second = _wandb_runs(run_dir)
    assert first_again["dir"] == first["dir"] and [step for step, _ in first_again["rows"]] == [0, 1, 2]
    assert second["id"] == run_id  # the same W&B run: `wandb sync` uploads both directories into it
    assert second["rows"] == [(4, {"loss": 0.125, "eval/target/accuracy": 0.5}), (5, {"final": 1})]
    assert json.loads((run_dir / "wandb_run.json").read_text()) == {"id": run_id, "step": 5}
    out, err = capfd.readouterr()
    assert "wandb" not in (out + err).lower()  # silent: no banner, no step warnings


CRASH_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from actors.sinks import WandbSink
sink = WandbSink(Path(sys.argv[1]), project="chorus-test", name="crash", mode="offline", config={})
for step in range(4):
    sink.write({"step": step, "loss": float(step)})
time.sleep(3)  # the sink has wandb flush its transaction log each second
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(120)
def test_wandb_resume_after_a_crash(tmp_path, wandb_cache):
    """The driver is killed after logging steps 0-3: W&B holds rows 0-2 (3 was still open) and wandb_run.json says 2.
    The resumed run redoes steps 2-4: 2 is dropped, 3 and 4 go in. wandb's service dies with the driver."""
    run_dir = tmp_path / "run"
    crashed = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(run_dir)],
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert crashed.wait(timeout=90) == -signal.SIGKILL
    assert json.loads((run_dir / "wandb_run.json").read_text())["step"] == 2
    sink = WandbSink(run_dir, project="chorus-test", name="crash", mode="offline", config={})
    for step in range(2, 5):
        sink.write({"step": step, "loss": 10.0 + step})
    sink.close()
    first, second = _wandb_runs(run_dir)
    assert first["rows"] == [(0, {"loss": 0.0}), (1, {"loss": 1.0}), (2, {"loss": 2.0})]
    assert second["id"] == first["id"] and second["rows"] == [(3, {"loss": 13.0}), (4, {"loss": 14.0})]
    orphans = [p for p in psutil.process_iter(["name", "cmdline"]) if "wandb" in (p.info["name"] or "")
               and str(crashed.pid) in (p.info["cmdline"] or [])]  # wandb-core --pid PID
    assert psutil.wait_procs(orphans, timeout=10)[1] == []


@pytest.mark.timeout(60)
def test_wandb_disabled_writes_no_run(tmp_path, wandb_cache):
    sink = WandbSink(tmp_path, project="chorus-test", name="unit", mode="disabled", config={})
    sink.write({"step": 0, "loss": 1.0})
    sink.close()
    assert list((tmp_path / "wandb").glob("*run-*")) == []


# The sink in a fresh interpreter, with every Python name lookup refused and HTTP(S) proxies pointing at a local
# listener: a connection attempt by the Python side or wandb-core (Go honours the proxy variables), before or at exit,
# shows up. Without wandb.setup(mode) in the sink, wandb's telemetry CONNECTs to its server at exit. HOME is a fresh
# folder, to see what wandb writes outside the run dir.
NETWORK_SCRIPT = """
import socket, sys
from pathlib import Path
def refuse(host, *args, **kwargs):
    print("LOOKUP", host, file=sys.stderr, flush=True)
    raise socket.gaierror(socket.EAI_NONAME, "no network in this test")
socket.getaddrinfo = refuse
from actors.sinks import WandbSink
sink = WandbSink(Path(sys.argv[1]), project="chorus-test", name="net", mode="offline", config={})
for step in range(3):
    sink.write({"step": step, "loss": 1.0 / (step + 1)})
sink.close()
"""


@pytest.mark.timeout(120)
def test_wandb_offline_touches_no_network(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(5)
                seen.append(conn.recv(200))

    threading.Thread(target=accept, daemon=True).start()
    proxy = f"http://127.0.0.1:{listener.getsockname()[1]}"
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items()
           if k.lower() != "no_proxy" and not k.startswith(("WANDB_", "XDG_"))}
    env.update(HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, https_proxy=proxy, PYTHONPATH=str(ROOT),
               HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-c", NETWORK_SCRIPT, str(tmp_path / "run")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=90)
    listener.close()
    assert done.returncode == 0, done.stderr
    assert "LOOKUP" not in done.stderr and seen == []
    outside = sorted(str(p.relative_to(tmp_path / "home")).split("-debug-")[0] for p in (tmp_path / "home").rglob("*")
                     if p.is_file())
    assert outside == [".cache/wandb/logs/core", ".cache/wandb/logs/symon"]  # the service's debug logs, no more
    assert [row for run in _wandb_runs(tmp_path / "run") for row in run["rows"]] == [
        (0, {"loss": 1.0}), (1, {"loss": 0.5}), (2, {"loss": pytest.approx(1 / 3)})]
