"""The run's actor pools: which actors, with what resources, environment, restart policy and deadline.

``start_learners`` starts the DeepSpeed groups (the policy, with its colocated reference, and the PPO critic), which
the driver restarts together from a checkpoint when one fails; ``start_pools`` the groups Ray restarts actor by actor
(rollout engines, reward actors, separate reference actors).
"""

from __future__ import annotations

from pathlib import Path

import ray

from actors.config import ChorusConfig, ConfigError, LearnerConfig, loss_spec
from actors.group import ActorGroup

# vLLM warns on every weight reload that the rotary embedding has no weights to load (it has none to train
# either): at WARNING that is one line per step, so engines log errors only.
BASE_ENV = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore",
            "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0  # the driver may run on a node without GPUs


def _gpus(num_gpus: float | None, gpu: bool) -> float:
    return num_gpus if num_gpus is not None else float(gpu)


def bundle(role: str, cpus: float, gpus: float) -> dict[str, float]:
    """One actor's placement bundle. ``<role>.num_cpus`` 0 reserves no CPU, which Ray can place only when the actor
    has a GPU: say so at start rather than let Ray refuse an empty bundle."""
    if not cpus and not gpus:
        raise ConfigError(f"config key '{role}.num_cpus': 0 reserves nothing for an actor without a GPU (no GPU in "
                          f"the cluster, or {role}.num_gpus 0): set it > 0")
    return {"CPU": cpus, "GPU": gpus}


def start_learners(cfg: ChorusConfig, model_path: str) -> tuple[ActorGroup, ActorGroup | None]:
    """The policy's DeepSpeed ranks (with the colocated reference) and the PPO critic's, fresh from the model."""
    from learners.advantages import needs_critic
    from learners.learner import LearnerActor

    a, gpu, spec = cfg.algo, _has_gpus(), loss_spec(cfg)
    colocated_ref = a.kl_coef > 0 and cfg.reference.colocate
    learners = deepspeed_group(
        "learner", LearnerActor, cfg.learner, gpu,
        lambda rank: dict(model_path=model_path, cfg=cfg.learner, spec=spec, dtype=cfg.model.dtype,
                          seed=cfg.train.seed, rank=rank, world_size=cfg.learner.num_actors, reference=colocated_ref))
    if not needs_critic(a.advantage):
        return learners, None
    from learners.critic import CriticActor

    try:
        critic = deepspeed_group(
            "critic", CriticActor, cfg.critic, gpu,
            lambda rank: dict(model_path=model_path, cfg=cfg.critic, value_clip=a.value_clip, dtype=cfg.model.dtype,
                              seed=cfg.train.seed, rank=rank, world_size=cfg.critic.num_actors))
    except BaseException:
        learners.shutdown()
        raise
    return learners, critic


def deepspeed_group(role: str, cls: type, lc: LearnerConfig, gpu: bool, make_kwargs) -> ActorGroup:
    """Data-parallel DeepSpeed ranks: start them, then join their process group at rank 0's address."""
    group = ActorGroup(role, cls, lc.num_actors, bundle(role, lc.num_cpus, _gpus(lc.num_gpus, gpu)), make_kwargs,
                       env={**BASE_ENV, "OMP_NUM_THREADS": str(lc.num_threads)}, deadline_s=lc.deadline_s)
    try:
        addr, port = rendezvous(group.all(lambda a: a.address.remote()))
        group.all(lambda a: a.setup.remote(addr, port))
    except BaseException:
        group.shutdown()
        raise
    return group


def rendezvous(addresses: list[tuple[str, int]]) -> tuple[str, int]:
    """Where the ranks of a process group meet, from each rank's (node address, free port): rank 0's node hosts it.
    When every rank is on that node it is the loopback address, so the group listens on no network interface
    (learners/learner.py:loopback_store); across nodes, rank 0's node address."""
    (addr, port), *_ = addresses
    return ("127.0.0.1" if all(a == addr for a, _ in addresses) else addr), port


def start_rollouts(cfg: ChorusConfig, model_path: str, sync_dir: Path) -> ActorGroup:
    """The rollout engines: each loads ``model_path``, then the newest weights file in ``sync_dir`` if any."""
    from rollout.engine import RolloutActor

    rc, gpu = cfg.rollout, _has_gpus()
    return ActorGroup(
        "rollout", RolloutActor, rc.num_actors,
        bundle("rollout", rc.num_cpus, rc.tensor_parallel_size if gpu else 0),
        lambda rank: dict(backend=rc.backend, model_path=model_path, weights_dir=str(sync_dir),
                          num_threads=rc.num_threads, dtype=rc.dtype or cfg.model.dtype, seed=cfg.train.seed + rank,
                          max_model_len=rc.max_model_len, tensor_parallel_size=rc.tensor_parallel_size,
                          kv_cache_gib=rc.kv_cache_gib, gpu_memory_utilization=rc.gpu_memory_utilization),
        env={**BASE_ENV, "OMP_NUM_THREADS": str(rc.num_threads)}, max_restarts=-1, retries=3,
        deadline_s=rc.deadline_s)


def start_pools(cfg: ChorusConfig, model_path: str, sync_dir: Path
                ) -> tuple[ActorGroup | None, ActorGroup, ActorGroup]:
    """(separate reference actors or None, rollout engines, reward actors). Ray restarts their actors however often
    they die over a run of days (max_restarts -1); each piece of work is retried at most 3 times, and an actor that
    cannot come back fails the run after its group's ready_timeout_s."""
    from rewards.actor import RewardActor

    gpu, started = _has_gpus(), []
    try:
        if cfg.algo.kl_coef > 0 and not cfg.reference.colocate:
            from learners.reference import ReferenceActor

            ref = cfg.reference
            started.append(ActorGroup(
                "reference", ReferenceActor, ref.num_actors,
                bundle("reference", ref.num_cpus, _gpus(ref.num_gpus, gpu)),
                lambda rank: dict(model_path=model_path, dtype=cfg.model.dtype, num_threads=ref.num_threads,
                                  temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p),
                env={**BASE_ENV, "OMP_NUM_THREADS": str(ref.num_threads)}, max_restarts=-1, retries=3,
                deadline_s=cfg.learner.deadline_s))
        else:
            started.append(None)
        started.append(start_rollouts(cfg, model_path, sync_dir))
        started.append(ActorGroup(
            "reward", RewardActor, cfg.reward.num_actors, {"CPU": cfg.reward.num_cpus},
            lambda rank: dict(cfg=cfg.reward), env=BASE_ENV, max_restarts=-1, retries=3,
            deadline_s=cfg.reward.deadline_s))
    except BaseException:
        for group in started:
            if group is not None:
                group.shutdown()
        raise
    references, rollouts, rewards = started
    return references, rollouts, rewards
