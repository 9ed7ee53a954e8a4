"""The run's actor pools: which actors, with what resources, environment, restart policy and deadline.

``start_learners`` starts the DeepSpeed groups (the policy, with its colocated reference, and the PPO critic), which
the driver restarts together from a checkpoint when one fails; ``start_pools`` the groups Ray restarts actor by actor
(rollout engines, reward actors, separate reference actors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
from pathlib import Path

import ray

from actors.config import ChorusConfig, ConfigError, LearnerConfig, loss_spec
from actors.group import ActorGroup

# vLLM warns on every weight reload that the rotary embedding has no weights to load (it has none to train
# either): at WARNING that is one line per step, so engines log errors only.
BASE_ENV = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore",
            "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def node_cpus() -> tuple[int, int]:
    """(CPUs of the smallest node that has any, number of such nodes) in the running Ray cluster. On this machine no
    more than the cores this process may run on: a local cluster may be told it has more CPUs than there are."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    here = {ray.util.get_node_ip_address()}
    with contextlib.suppress(OSError):  # a host name that does not resolve: the node's address alone
        here.add(socket.gethostbyname(socket.gethostname()))
    cpus = [int(n["Resources"]["CPU"]) if n["NodeManagerAddress"] not in here
            else min(int(n["Resources"]["CPU"]), len(os.sched_getaffinity(0))) for n in nodes]
    return max(1, min(cpus, default=1)), max(1, len(nodes))


def thread_plan(cfg: ChorusConfig, cpus: int, nodes: int) -> dict[str, int]:
    """Torch / OpenMP threads per actor of each role that computes (rollout, learner, critic, separate reference):
    ``<role>.num_threads`` where set, else (0) derived from the placement on ``nodes`` nodes of ``cpus`` CPUs
    (``node_cpus()``).

    Synchronous mode: the phases take turns (generate, reference, train), so each phase's actors share every CPU of
    their node; the learner and the critic train at the same time and share them. Async mode
    (``train.max_staleness`` > 0): generation overlaps the reference and training phases, so it and they split a
    node's CPUs in proportion to what they reserve (``num_cpus``), at least one each. A phase's actors are taken to
    spread evenly over the nodes."""
    from learners.advantages import needs_critic

    actors = {"rollout": cfg.rollout.num_actors * cfg.rollout.tensor_parallel_size, "learner": cfg.learner.num_actors}
    if needs_critic(cfg.algo.advantage):
        actors["critic"] = cfg.critic.num_actors
    if cfg.algo.kl_coef > 0 and not cfg.reference.colocate:
        actors["reference"] = cfg.reference.num_actors
    training = [r for r in ("learner", "critic") if r in actors]  # they train at the same time
    phases = [["rollout"], training, [r for r in ("reference",) if r in actors]]
    if cfg.train.max_staleness > 0:
        reserved = {r: n * getattr(cfg, r).num_cpus for r, n in actors.items()}
        share = reserved["rollout"] / sum(reserved.values()) if sum(reserved.values()) else 0.5
        generate = min(max(1, round(cpus * share)), cpus - 1) if cpus > 1 else 1
        budget = {r: generate if r == "rollout" else max(1, cpus - generate) for r in actors}
    else:
        budget = dict.fromkeys(actors, cpus)
    plan = {}
    for phase in phases:
        per_node = math.ceil(sum(actors[r] for r in phase) / nodes)
        for role in phase:
            plan[role] = getattr(cfg, role).num_threads or max(1, budget[role] // per_node)
    return plan


def describe_threads(cfg: ChorusConfig) -> str:
    """The log line saying how many threads each actor gets, and why."""
    cpus, nodes = node_cpus()
    plan = thread_plan(cfg, cpus, nodes)
    mode = ("async: generation and training split the CPUs" if cfg.train.max_staleness > 0
            else "synchronous: the phases take turns on the CPUs")
    given = ", ".join(f"{role} {n}{'' if getattr(cfg, role).num_threads else ' (derived)'}" for role, n in plan.items())
    return f"threads per actor: {given} ({mode}; {cpus} CPUs per node, {nodes} node{'s' * (nodes > 1)})"


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

    a, gpu, spec, plan = cfg.algo, _has_gpus(), loss_spec(cfg), thread_plan(cfg, *node_cpus())
    colocated_ref = a.kl_coef > 0 and cfg.reference.colocate
    learner_cfg = dataclasses.replace(cfg.learner, num_threads=plan["learner"])
    learners = deepspeed_group(
        "learner", LearnerActor, learner_cfg, gpu,
        lambda rank: dict(model_path=model_path, cfg=learner_cfg, spec=spec, dtype=cfg.model.dtype,
                          seed=cfg.train.seed, rank=rank, world_size=cfg.learner.num_actors, reference=colocated_ref))
    if not needs_critic(a.advantage):
        return learners, None
    from learners.critic import CriticActor

    critic_cfg = dataclasses.replace(cfg.critic, num_threads=plan["critic"])
    try:
        critic = deepspeed_group(
            "critic", CriticActor, critic_cfg, gpu,
            lambda rank: dict(model_path=model_path, cfg=critic_cfg, value_clip=a.value_clip, dtype=cfg.model.dtype,
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

    rc, gpu, threads = cfg.rollout, _has_gpus(), thread_plan(cfg, *node_cpus())["rollout"]
    return ActorGroup(
        "rollout", RolloutActor, rc.num_actors,
        bundle("rollout", rc.num_cpus, rc.tensor_parallel_size if gpu else 0),
        lambda rank: dict(backend=rc.backend, model_path=model_path, weights_dir=str(sync_dir),
                          num_threads=threads, dtype=rc.dtype or cfg.model.dtype, seed=cfg.train.seed + rank,
                          max_model_len=rc.max_model_len, tensor_parallel_size=rc.tensor_parallel_size,
                          kv_cache_gib=rc.kv_cache_gib, gpu_memory_utilization=rc.gpu_memory_utilization,
                          **({"compile": True} if rc.compile else {})),
        # vLLM on a CPU binds an engine's OpenMP threads to all cores but one it reserves (VLLM_CPU_OMP_THREADS_BIND
        # auto): one thread on 2 cores, whatever OMP_NUM_THREADS says. Unbound, it runs the threads it is given.
        env={**BASE_ENV, "OMP_NUM_THREADS": str(threads),
             "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")},
        max_restarts=-1, retries=3, deadline_s=rc.deadline_s)


def start_envs(cfg: ChorusConfig) -> ActorGroup | None:
    """The env actors of multi-turn rollouts (``env.name``), or None. Ray restarts one that dies; the episodes it
    held fail (their next call finds them gone), the run goes on."""
    if not cfg.env.name:
        return None
    from rewards.env_worker import EnvWorker

    e = cfg.env
    return ActorGroup("env", EnvWorker, e.num_actors, {"CPU": e.num_cpus},
                      lambda rank: dict(name=e.name, args=dict(e.args), timeout_s=e.timeout_s), env=BASE_ENV,
                      max_restarts=-1, retries=3, deadline_s=e.deadline_s)


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

            ref, threads = cfg.reference, thread_plan(cfg, *node_cpus())["reference"]
            started.append(ActorGroup(
                "reference", ReferenceActor, ref.num_actors,
                bundle("reference", ref.num_cpus, _gpus(ref.num_gpus, gpu)),
                lambda rank: dict(model_path=model_path, dtype=cfg.model.dtype, num_threads=threads,
                                  temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  precision=cfg.learner.autocast, attn=cfg.learner.attention),
                env={**BASE_ENV, "OMP_NUM_THREADS": str(threads)}, max_restarts=-1, retries=3,
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
