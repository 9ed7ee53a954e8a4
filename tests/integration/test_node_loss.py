"""A Ray node that disappears mid-run (`ray.cluster_utils.Cluster`: a head and two worker nodes on this machine).

Every actor starts on node A (node B joins after they are placed); then node A's processes are killed. Ray
reschedules the placement-group bundles on node B and restarts the rollout and reward actors there (their work is
retried); the learner, whose DeepSpeed group cannot lose a rank, is restarted by the driver from the last
checkpoint. The run completes every step once, and the actors live on node B. The hf backend: a vLLM engine's
restart is covered by test_fault_tolerance.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from actors.config import load_config
from tests.integration.test_fault_tolerance import records

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


def _node_of(actor) -> str:
    from actors.internals import ray_actor_entry

    return ray_actor_entry(actor)["Address"]["NodeID"]


def test_run_completes_after_the_node_holding_its_actors_is_removed(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from actors.driver import Trainer

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node runs no actor
    trainer = None
    try:
        node_a = cluster.add_node(num_cpus=2)
        cluster.connect()
        cfg = load_config(ROOT / "configs" / "smoke.yaml", [
            "rollout.backend=hf", f"train.steps={STEPS}", "train.eval_every=0", "algo.mu_peak=0.5",
            "algo.mu_valley=0.5", "reward.functions=[{name: char_match}]"])
        trainer = Trainer(cfg, tmp_path / "run")
        groups = [trainer.learners, trainer.rollouts, trainer.rewards]
        assert {_node_of(a) for g in groups for a in g.actors} == {node_a.node_id}
        node_b = cluster.add_node(num_cpus=2)

        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(summary=trainer.run()), daemon=True)
        runner.start()
        deadline = time.monotonic() + 300
        while len(records(trainer.run_dir)) < 6:  # past the checkpoint of step 4
            assert runner.is_alive() and time.monotonic() < deadline, "the run stopped before step 6"
            time.sleep(0.05)
        cluster.remove_node(node_a, allow_graceful=False)  # its raylet and every worker on it are killed
        runner.join(420)
        assert not runner.is_alive(), "the run did not finish after the node loss"
        assert result["summary"]["steps"] == STEPS and result["summary"]["learner_failures"] == 1

        steps = records(trainer.run_dir)
        assert [r["step"] for r in steps] == list(range(STEPS))  # every step once (redone ones rolled back)
        assert all(r["samples"] == cfg.algo.prompts_per_step * cfg.rollout.n for r in steps)
        groups = [trainer.learners, trainer.rollouts, trainer.rewards]
        assert {_node_of(a) for g in groups for a in g.actors} == {node_b.node_id}
        assert trainer.rollouts.restarts >= 1 and trainer.rewards.restarts >= 1
        assert trainer.metrics.restarts.labels("learner")._value.get() == 1
        assert ray.get(trainer.rollouts.actors[0].ready.remote())  # the restarted engine answers
    finally:
        if trainer is not None:
            trainer.close()
        ray.shutdown()
        cluster.shutdown()
