"""actors/pools.py without a cluster: what each actor asks Ray to place, and where DeepSpeed ranks meet."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from actors.config import ConfigError
from actors.pools import bundle, rendezvous

ROOT = Path(__file__).resolve().parents[2]


def test_zero_cpus_is_placed_only_with_a_gpu():
    assert bundle("learner", 0.0, 1.0) == {"CPU": 0.0, "GPU": 1.0}  # a GPU actor that reserves no CPU
    assert bundle("rollout", 0.5, 0) == {"CPU": 0.5, "GPU": 0}
    # Ray refuses a bundle of nothing ("Bundles cannot be an empty dictionary"): said at start with the key instead
    with pytest.raises(ConfigError, match=r"config key 'rollout.num_cpus': 0 reserves nothing for an actor without"):
        bundle("rollout", 0.0, 0)


def test_ranks_on_one_node_meet_on_loopback():
    assert rendezvous([("10.0.0.5", 4000)]) == ("127.0.0.1", 4000)
    assert rendezvous([("10.0.0.5", 4000), ("10.0.0.5", 4100)]) == ("127.0.0.1", 4000)  # rank 0's port
    assert rendezvous([("10.0.0.5", 4000), ("10.0.0.6", 4100)]) == ("10.0.0.5", 4000)  # across nodes: rank 0's node


# Two ranks of a gloo group set up as a learner does on one node; rank 0 lists the sockets it listens on while the
# group is up (the store's and gloo's), then both check an all-reduce went through.
_RANK = """
import json, socket, sys
from datetime import timedelta
import psutil, torch, torch.distributed as dist
from learners.learner import loopback_store
rank, port = int(sys.argv[1]), int(sys.argv[2])
store = loopback_store(rank, 2, port, timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
listening = sorted({c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN})
dist.barrier()
print(json.dumps({"sum": t.item(), "listening": listening}))
dist.destroy_process_group()
"""


def test_a_loopback_group_listens_on_loopback_only(tmp_path):
    pytest.importorskip("psutil")
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(rank), str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [r["sum"] for r in results] == [3.0, 3.0]  # 1 + 2 on both ranks
    assert results[0]["listening"] == ["127.0.0.1"]  # the store and gloo: no wildcard, no node address
    assert results[1]["listening"] in ([], ["127.0.0.1"])
