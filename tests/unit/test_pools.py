"""actors/pools.py without a cluster: what each actor asks Ray to place, and where DeepSpeed ranks meet."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from actors.config import ConfigError, load_config
from actors.pools import bundle, rendezvous, thread_plan

ROOT = Path(__file__).resolve().parents[2]


def test_zero_cpus_is_placed_only_with_a_gpu():
    assert bundle("learner", 0.0, 1.0) == {"CPU": 0.0, "GPU": 1.0}  # a GPU actor that reserves no CPU
    assert bundle("rollout", 0.5, 0) == {"CPU": 0.5, "GPU": 0}
    # Ray refuses a bundle of nothing ("Bundles cannot be an empty dictionary"): said at start with the key instead
    with pytest.raises(ConfigError, match=r"config key 'rollout.num_cpus': 0 reserves nothing for an actor without"):
        bundle("rollout", 0.0, 0)


def _cfg(*overrides: str):
    return load_config(ROOT / "configs" / "grpo.yaml", ["rollout.num_threads=0", "learner.num_threads=0", *overrides])


def test_synchronous_phases_take_every_cpu_in_turn():
    # generate, then train: each phase's one actor gets both CPUs of the node
    assert thread_plan(_cfg(), 2, 1) == {"rollout": 2, "learner": 2}
    # two engines generate at once: they share the node's 16 CPUs; two learner ranks likewise
    assert thread_plan(_cfg("rollout.num_actors=2", "learner.num_actors=2"), 16, 1) == {"rollout": 8, "learner": 8}
    # spread over 2 nodes of 16 CPUs: 2 engines per node share one node's CPUs
    assert thread_plan(_cfg("rollout.num_actors=4"), 16, 2) == {"rollout": 8, "learner": 16}
    # PPO: the learner and the critic train at the same time (configs/ppo.yaml measured 2.8x slower with 2 each)
    assert thread_plan(load_config(ROOT / "configs" / "ppo.yaml", ["learner.num_threads=0", "critic.num_threads=0",
                                                                   "rollout.num_threads=0"]), 2, 1) == \
        {"rollout": 2, "learner": 1, "critic": 1}
    # a separate reference runs in a phase of its own, before training
    assert thread_plan(_cfg("reference.colocate=false"), 4, 1) == {"rollout": 4, "learner": 4, "reference": 4}


def test_async_generation_and_training_split_the_cpus():
    # by what they reserve: 0.5 and 0.5 CPUs, so half each
    assert thread_plan(_cfg("train.max_staleness=1"), 2, 1) == {"rollout": 1, "learner": 1}
    assert thread_plan(_cfg("train.max_staleness=1", "rollout.num_cpus=3", "learner.num_cpus=1"), 8, 1) == \
        {"rollout": 6, "learner": 2}
    # at least one each, however lopsided, and a separate reference on the training side
    assert thread_plan(_cfg("train.max_staleness=1", "rollout.num_cpus=0.01", "reference.colocate=false"), 4, 1) == \
        {"rollout": 1, "learner": 3, "reference": 3}
    assert thread_plan(_cfg("train.max_staleness=1"), 1, 1) == {"rollout": 1, "learner": 1}


def test_a_set_thread_count_is_kept():
    assert thread_plan(_cfg("rollout.num_threads=3"), 2, 1) == {"rollout": 3, "learner": 2}
    assert thread_plan(_cfg("learner.num_threads=1", "train.max_staleness=1"), 8, 1) == {"rollout": 4, "learner": 1}


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
