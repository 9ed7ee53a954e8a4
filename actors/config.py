"""The config schema: one typed dataclass per component, loaded and validated once at the entry point.

A YAML file is merged onto the schema, then ``key=value`` overrides from the command line. An unknown key or a
value of the wrong type raises :class:`ConfigError` naming the full key path, before anything starts. Defaults
live here and nowhere else; each component receives only its own section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from learners.advantages import ADVANTAGES, AdvantageSpec, needs_critic
from learners.losses import AGGREGATIONS, IS_CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES, SFT_WEIGHTS, LossSpec
from learners.schedules import MU_SCHEDULES
from actors.evaluation import TARGET
from rollout.data import TASKS, distinct_strings
from rollout.tasks import FAMILIES, TOOL_DEMOS
from rollout.engine import BACKENDS


class ConfigError(ValueError):
    """A config that cannot run: the message names the file and the full key path."""


@dataclass
class RayConfig:
    address: str = ""  # Ray cluster to join; "" = $RAY_ADDRESS if set, else start a local cluster
    num_cpus: Optional[int] = None  # CPUs of a local cluster (None = all)
    dashboard: bool = False  # start the Ray dashboard with a local cluster


@dataclass
class ModelConfig:
    path: str = ""  # Hugging Face causal-LM directory; "" with `build` = a cache dir named after the build file
    build: str = ""  # JSON recipe of a tiny model + char tokenizer (configs/models/); built into `path` if absent
    dtype: str = "float32"  # float32 | bfloat16 | float16 (learner and engines)
    chat_template: str = ""  # a Jinja chat template file for conversation rows; "" = the tokenizer's own


@dataclass
class SyntheticTaskConfig:
    task: str = "reverse"  # reverse | sort | json: the string reversed / sorted / {"r": reversed, "n": length}
    seed: int = 0
    alphabet: str = "abcdefgh"
    min_len: int = 3
    max_len: int = 6
    num_prompts: int = 4000  # RL prompts
    num_expert: int = 4000  # expert demonstrations (prompt + correct response)
    num_eval: int = 200  # held-out, disjoint from the other two


@dataclass
class TasksConfig:
    mixture: dict[str, float] = field(default_factory=dict)  # task family -> its share of the prompt and expert
    #                                                           rows (rollout/tasks.py: rev, sort, count, upper, add2, add3)
    eval: list[str] = field(default_factory=list)  # families with a held-out set: the first is the target
    #                                                (data.eval), the others retention sets (data.retention)
    seed: int = 0  # also fixes the held-out rows, which no run with this seed trains on
    num_prompts: int = 4000  # RL prompts
    num_expert: int = 4000  # expert demonstrations (prompt + correct response)
    num_eval: int = 200  # held-out rows per evaluated family
    chat: bool = False  # rows as conversations: a user turn (the prompt), the assistant's (the answer)
    tool: str = ""  # chat: "calc" = expert conversations call the calculator first (arithmetic families: add2,
    #                 add3), for env tools (rollout/tasks.py: as_chat)


@dataclass
class DataConfig:
    prompts: str = ""  # JSONL/Parquet: {"prompt": str, "answer": str, ...}; "" = generated (`synthetic`, `tasks`)
    expert: str = ""  # JSONL/Parquet: {"prompt": str, "response": str}
    eval: str = ""  # JSONL/Parquet held-out set of the target task: {"prompt": str, "answer": str}
    retention: dict[str, str] = field(default_factory=dict)  # name -> held-out file of a skill to keep, evaluated
    #                                                          alongside data.eval (forgetting is their accuracy's fall)
    synthetic: Optional[SyntheticTaskConfig] = None  # generate prompts, expert and eval from one string task
    tasks: Optional[TasksConfig] = None  # generate them, and the retention sets, from the task families
    on_bad_row: str = "stop"  # a malformed row (bad JSON, a missing field): stop at start naming file and line, or
    #                           skip: leave it out, log it and count it (chorus_data_rows_skipped_total)


@dataclass
class RolloutConfig:
    backend: str = "vllm"  # vllm | hf (a transformers model in chorus's decode loop; faster for small models on CPU)
    compile: bool = False  # hf: torch.compile the model (dynamic shapes); the 27M bench model's generate phase
    #                        a quarter shorter here, after a first call that compiles for up to a minute
    dtype: str = ""  # the engines' precision: "" = model.dtype; bfloat16 engines with a float32 learner are faster
    #                  and differ from it (the mismatch algo.recompute_logprobs measures and is_correction corrects)
    num_actors: int = 1
    n: int = 8  # samples per prompt (the GRPO group size)
    max_new_tokens: int = 16
    temperature: float = 1.0  # > 0; the learner computes every log-probability on the same distribution
    top_p: float = 1.0  # nucleus sampling, in (0, 1]; likewise
    max_model_len: int = 256
    tensor_parallel_size: int = 1  # vLLM tensor parallelism inside one actor (GPUs per actor)
    num_cpus: float = 0.5  # CPUs reserved per actor (placement bundle)
    num_threads: int = 0  # torch / OpenMP threads per actor on CPU; 0 = from the placement (actors/pools.py: thread_plan)
    kv_cache_gib: int = 1  # vLLM KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = 0.5  # vLLM on GPU
    deadline_s: float = 1800.0  # one actor's generate call; past it the actor is killed, restarted and its work
    #                             retried (0 = no deadline)
    sync_dir: str = ""  # where learner rank 0 hands weights to the engines: "" = node-local /dev/shm (learner rank 0
    #                     and every engine on one node); a directory every node sees (shared storage) = multi-node


@dataclass
class RewardFnConfig:
    name: str = MISSING  # registered reward name (rewards/registry.py)
    weight: float = 1.0
    args: dict = field(default_factory=dict)  # keyword arguments of the reward function
    isolation: str = ""  # process (its own, killed when it hangs) | thread; "" = the reward's own default


@dataclass
class RewardConfig:
    num_actors: int = 1
    functions: list[RewardFnConfig] = field(default_factory=lambda: [RewardFnConfig(name="exact_match")])
    timeout_s: float = 10.0  # per reward function call on one batch
    fallback: float = 0.0  # score given to a sample whose reward raised, hung or returned NaN
    on_failure: str = "fallback"  # fallback: such a sample keeps the fallback score | drop_group: its prompt's
    #                               whole group of rollout.n samples leaves the step (counted and logged)
    num_cpus: float = 0.25
    deadline_s: float = 1800.0  # one reward actor's call on its share of a step (all functions, their reloads);
    #                             past it the actor is killed, restarted and its work retried (0 = no deadline)


@dataclass
class EnvConfig:
    name: str = ""  # "" = single-turn rollouts; an environment (rewards/envs.py: tools, guess) or module:Class,
    #                 which makes each rollout a multi-turn episode
    args: dict = field(default_factory=dict)  # keyword arguments of the environment's __init__
    max_turns: int = 4  # model turns per episode
    max_tokens: int = 0  # response tokens per episode, the model's and the observations'; 0 = rollout.max_model_len
    reward_weight: float = 1.0  # the episode's return (the sum of its step rewards) in the rollout's reward
    timeout_s: float = 30.0  # one env actor's call on its episodes; past it their process is killed, they fail
    num_actors: int = 1
    num_cpus: float = 0.25
    deadline_s: float = 300.0  # one env actor's call as a whole (its process restarts included); past it the actor
    #                            is killed and restarted, its episodes fail (0 = no deadline)


@dataclass
class LearnerConfig:
    num_actors: int = 1  # data-parallel ranks
    zero_stage: int = 2  # with more than one rank (num_actors); one rank trains unpartitioned (stage 0)
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0  # linear learning-rate warmup
    decay_steps: int = 0  # cosine decay after warmup to min_lr_ratio * lr (0 = constant lr)
    min_lr_ratio: float = 0.0
    micro_batch_size: int = 64  # rows per forward/backward; the step accumulates over the rest
    num_cpus: float = 0.5
    num_gpus: Optional[float] = None  # GPUs per learner; None = 1 if the cluster has GPUs, else 0
    num_threads: int = 0  # torch / OpenMP threads per rank on CPU; 0 = from the placement, as rollout.num_threads
    autocast: str = ""  # "" = every product in model.dtype | bfloat16: forward passes under torch.autocast (matrix
    #                     products in bfloat16; weights, gradients, AdamW state in float32): faster on CPUs with
    #                     AVX512-BF16 or AMX and on GPUs, and a small engine/learner mismatch (algo.is_correction)
    attention: str = ""  # attention kernel: eager | sdpa; "" = eager on a CPU (faster here for short rows), sdpa on
    #                      a GPU
    compile: bool = False  # torch.compile the model (dynamic shapes): the 27M bench model's train phase 0.66 -> 0.49 s
    #                        here, after a first step that compiles for up to a minute (bench/peers.py)
    backend: str = ""  # torch.distributed backend; "" = nccl with GPUs, gloo without
    deadline_s: float = 1800.0  # one optimiser step or weight save of the group; past it the group counts as failed
    #                             (train.max_learner_failures) and restarts from the last checkpoint (0 = none)


@dataclass
class ReferenceConfig:
    colocate: bool = True  # the frozen reference lives in each learner process; False = its own actors
    num_actors: int = 1  # separate reference actors (colocate: false)
    num_cpus: float = 0.5
    num_gpus: Optional[float] = None  # per separate reference actor; None = 1 if the cluster has GPUs, else 0
    num_threads: int = 0  # 0 = from the placement, as rollout.num_threads


@dataclass
class AlgoConfig:
    prompts_per_step: int = 8  # B: prompts per step, each sampled rollout.n times
    expert_ratio: float = 0.2  # share of a step's rows drawn from the expert set
    mu_peak: float = 0.5
    mu_valley: float = 0.02
    mu_schedule: str = "cosine"  # how mu decays from mu_peak to mu_valley: cosine | linear (learners/schedules.py)
    mu_warmup_steps: int = 0  # linear warmup 0 -> mu_peak
    mu_hold_steps: int = 0  # then mu_peak held this long (SFT-then-RL: hold with mu_peak 1, mu_valley 0)
    mu_decay_steps: int = 0  # then decay to mu_valley (0 = a step)
    sft_weight: str = "nll"  # per-token weight of the expert NLL: nll (1) | phi (p(1-p), CHORD-phi)
    advantage: str = "grpo"  # grpo (group-normalised) | rloo (leave-one-out baseline) | gae (PPO with a critic: see
    #                          `critic`)  (learners/advantages.py)
    adv_std_normalize: bool = True  # grpo: divide by the group's std; False = Dr. GRPO
    gamma: float = 1.0  # gae: discount
    lam: float = 0.95  # gae: lambda
    whiten_rewards: bool = False  # gae: normalise the step's rewards to mean 0, std 1 before GAE
    whiten_advantages: bool = True  # gae: normalise advantages over the step's tokens
    value_clip: Optional[float] = 0.2  # gae: clip the critic's update around its old values (null = off)
    policy_loss: str = "ppo"  # ppo (token-level ratio) | gspo (sequence-level ratio, GSPO)  (learners/losses.py)
    clip_eps: float = 0.2  # ratio clipped to [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: Optional[float] = None  # null = clip_eps; larger = DAPO's clip-higher (e.g. 0.28)
    dual_clip: Optional[float] = None  # e.g. 3.0
    loss_agg: str = "token-mean"  # RL term: token-mean | seq-mean-token-mean | seq-mean-token-sum |
    #                               seq-mean-token-sum-norm (Dr. GRPO: divided by loss_agg_norm tokens per sequence)
    loss_agg_norm: Optional[float] = None  # seq-mean-token-sum-norm's constant; null = rollout.max_new_tokens (with an
    #                                        environment, env.max_tokens: an episode's budget)
    kl_coef: float = 0.0  # KL(policy || frozen reference) penalty; 0 = no reference model
    kl_estimator: str = "k3"  # k1 | k2 | k3: as a loss term k2 follows KL(policy || ref), k3 KL(ref || policy), and
    #                           k1 has zero expected gradient (reward only)
    kl_penalty: str = "loss"  # where the penalty goes: loss (a term of the RL loss) | reward (subtracted per token
    #                           from the reward, before the advantages)
    recompute_logprobs: bool = False  # the learner recomputes the rollouts' log-probabilities before training (the
    #                                   proximal policy); the engine's become the behaviour policy of is_correction
    is_correction: str = "none"  # engine/learner mismatch: none | token-truncate (TIS) | token-mask | seq-truncate |
    #                              seq-mask; needs recompute_logprobs
    is_cap: float = 2.0  # C: importance ratios above C are truncated to C (or, masked: outside [1/C, C] dropped)
    dynamic_sampling: bool = False  # DAPO: groups whose rewards are all equal (no GRPO signal) leave the step and
    #                                 more prompts are sampled to keep prompts_per_step groups
    max_sample_rounds: int = 3  # dynamic_sampling: generation rounds per step at most (the first included); still
    #                             short, the step trains on the groups it has (logged)
    overlong_filter: bool = False  # DAPO: responses cut off at rollout.max_new_tokens leave the loss
    overlong_buffer: int = 0  # DAPO's soft overlong penalty over the last N tokens of rollout.max_new_tokens (0 = off)
    overlong_penalty: float = 1.0  # its size at the budget (the reward falls linearly to -overlong_penalty)
    epochs: int = 1  # optimiser passes over each step's rows
    mini_batches: int = 1  # optimiser steps per pass (rows shuffled each pass)


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    eval_every: int = 20  # steps between evaluations (0 = only at the end)
    eval_max_rows: int = 0  # evaluate on the first N rows of each held-out set (0 = all)
    eval_samples: int = 0  # n > 0: also n samples per target row at temperature 1, for pass@1 and pass@n
    eval_at_start: bool = False  # evaluate the starting model too (a line with "initial": true in metrics.jsonl)
    max_staleness: int = 0  # 0 = synchronous; k > 0 = async: rollouts run up to k policy versions behind,
    #                         generating the next steps while the learner trains this one
    max_learner_failures: int = 3  # learner (or critic) group failures the run survives by restarting the group
    #                                from the newest checkpoint; one more stops the run


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (0 = none but on SIGTERM); one is always written after the last step
    keep: int = 2  # newest complete checkpoints kept; older ones are deleted once a new one is in place
    dir: str = ""  # "" = RUN_DIR/checkpoints; on a multi-node cluster a path every node sees (shared storage)
    grace_s: float = 120.0  # after SIGTERM: finish or abandon the step, write a checkpoint and exit within this


@dataclass
class MetricsConfig:
    host: str = "127.0.0.1"  # bind address of /metrics; anything else must be set here on purpose
    port: int = 0  # 0 = any free port (printed at start and written to the run dir)
    tensorboard: bool = False  # also write metrics.jsonl's records as TensorBoard scalars into RUN_DIR/tensorboard
    wandb: bool = False  # also log them to a Weights & Biases run in RUN_DIR/wandb
    wandb_mode: str = "offline"  # offline (nothing leaves the machine; `wandb sync` uploads it later) | online
    wandb_project: str = "chorus"
    wandb_name: str = ""  # the W&B run's name; "" = the run directory's name


@dataclass
class ChorusConfig:
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    critic: LearnerConfig = field(default_factory=LearnerConfig)  # value model of algo.advantage = gae
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)  # frozen model of algo.kl_coef > 0
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# Each key's allowed values; a registry (learners/registry.py) is asked when the config is checked, so a variant
# registered by any module imported before then is a choice.
_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "rollout.dtype": ("", "float32", "bfloat16", "float16"),
    "rollout.backend": tuple(BACKENDS),
    "learner.backend": ("", "gloo", "nccl"),
    "learner.autocast": ("", "bfloat16"),
    "critic.autocast": ("", "bfloat16"),
    "learner.attention": ("", "eager", "sdpa"),
    "critic.attention": ("", "eager", "sdpa"),
    "critic.backend": ("", "gloo", "nccl"),
    "algo.advantage": ADVANTAGES,
    "algo.policy_loss": POLICY_LOSSES,
    "algo.sft_weight": SFT_WEIGHTS,
    "algo.mu_schedule": MU_SCHEDULES,
    "algo.is_correction": IS_CORRECTIONS,
    "algo.kl_penalty": ("loss", "reward"),
    "reward.on_failure": ("fallback", "drop_group"),
    "data.on_bad_row": ("stop", "skip"),
    "algo.loss_agg": AGGREGATIONS,
    "algo.kl_estimator": KL_ESTIMATORS,
    "data.synthetic.task": tuple(TASKS),
    "metrics.wandb_mode": ("offline", "online"),
}


def _error(source: str, exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).split("\n")[0]
    return ConfigError(f"{source}: config key '{key}': {msg}")


# Fields holding a list of dataclasses: OmegaConf checks their elements without the list's path, so they are
# checked here element by element to name the key in full (``reward.functions[1].wieght``).
_LISTS = {("reward", "functions"): RewardFnConfig}


def _check_lists(source: str, layer: DictConfig) -> None:
    for (section, key), schema in _LISTS.items():
        items = OmegaConf.select(layer, f"{section}.{key}", default=None)
        if items is None:
            continue
        if not OmegaConf.is_list(items):
            raise ConfigError(f"{source}: config key '{section}.{key}': expected a list of "
                              f"{{{', '.join(f.name for f in fields(schema))}}}, "
                              f"e.g. {section}.{key}='[{{name: exact_match}}]'")
        for i, item in enumerate(items):
            try:
                OmegaConf.merge(OmegaConf.structured(schema), item)
            except OmegaConfBaseException as exc:
                exc.full_key = f"{section}.{key}[{i}].{exc.full_key}" if exc.full_key else f"{section}.{key}[{i}]"
                raise _error(source, exc) from None


# Keys that were renamed: the error says what replaces them, and a config written before (a checkpoint's) is
# translated when loaded with ``legacy=True``: old key -> (new key, old value -> new value).
_RENAMED = {"algo.phi": "algo.sft_weight (phi: true is sft_weight: phi; false is sft_weight: nll)"}
_TRANSLATE = {("algo", "phi"): ("sft_weight", lambda phi: "phi" if phi else "nll")}


def _translate(layer: DictConfig) -> DictConfig:
    """A config written by an earlier chorus, its renamed keys under their new names."""
    for (section, old), (new, convert) in _TRANSLATE.items():
        part = layer.get(section) if isinstance(layer, DictConfig) else None
        if isinstance(part, DictConfig) and old in part:
            value = part.pop(old)
            part.setdefault(new, convert(value))
    return layer


def _merge(cfg: DictConfig, layer, source: str) -> DictConfig:
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{source}: a config must be a mapping of sections (ray, model, data, ...)")
    _check_lists(source, layer)
    try:
        return OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as exc:
        if (new := _RENAMED.get(getattr(exc, "full_key", None) or "")):
            raise ConfigError(f"{source}: config key '{exc.full_key}' was renamed: use {new}") from None
        raise _error(source, exc) from None


def load_config(path: str | Path | None, overrides: list[str] = (), *, legacy: bool = False) -> ChorusConfig:
    """Schema <- YAML file <- ``key=value`` overrides; returns a validated :class:`ChorusConfig` object. ``legacy``:
    the file was written by an earlier chorus (a checkpoint's config.yaml): renamed keys are translated, not refused."""
    cfg: DictConfig = OmegaConf.structured(ChorusConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            layer = OmegaConf.load(path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        cfg = _merge(cfg, _translate(layer) if legacy else layer, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
    try:
        layer = OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"command line: cannot parse overrides: {exc}") from None
    cfg = _merge(cfg, layer, "command line")
    try:
        obj: ChorusConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _error(str(path), exc) from None
    validate(obj)
    return obj


_ABSENT = object()  # a key under an optional section that is not set (data.synthetic: null)


def _get(cfg: ChorusConfig, key: str):
    for part in key.split("."):
        if cfg is None:
            return _ABSENT
        cfg = getattr(cfg, part)
    return cfg


def _floats(obj, prefix: str = ""):
    """(key, value) of every float the config holds: fields, list elements (``learner.betas[1]``) and reward
    functions (``reward.functions[0].weight``); a reward's ``args`` are its own to check."""
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for k, v in items:
            if isinstance(v, float):
                yield k, v
            elif is_dataclass(v):
                yield from _floats(v, k + ".")


def _betas(v: list[float]) -> bool:
    return len(v) == 2 and all(0.0 <= b < 1.0 for b in v)


_LEARNERS = ("learner", "critic")  # the same schema (LearnerConfig)
_ACTORS = ("rollout", "learner", "critic", "reference")  # actors with num_cpus, num_threads

# (key, test, what the value must be): ranges the types cannot express. A float must also be finite (checked
# first, for every float key), so a test here never sees nan or inf.
_RULES = [
    *((k, lambda v: v >= 1, ">= 1") for k in (
        "rollout.num_actors", "rollout.n", "rollout.max_new_tokens", "rollout.tensor_parallel_size",
        "rollout.max_model_len", "rollout.kv_cache_gib",
        "reward.num_actors", "learner.num_actors", "learner.micro_batch_size", "algo.prompts_per_step",
        "critic.num_actors", "critic.micro_batch_size", "reference.num_actors", "algo.epochs", "algo.mini_batches",
        "algo.max_sample_rounds", "env.max_turns", "env.num_actors",
        "train.steps", "checkpoint.keep",
        "data.synthetic.min_len", "data.synthetic.num_prompts", "data.synthetic.num_eval",
        "data.tasks.num_prompts", "data.tasks.num_eval")),
    *((k, lambda v: v >= 0, ">= 0") for k in (
        "learner.warmup_steps", "learner.decay_steps", "critic.warmup_steps", "critic.decay_steps",
        "algo.mu_warmup_steps", "algo.mu_hold_steps", "algo.mu_decay_steps", "algo.kl_coef",
        "train.eval_every", "train.eval_max_rows", "train.max_staleness",
        "rollout.deadline_s", "reward.deadline_s", "learner.deadline_s", "critic.deadline_s", "env.deadline_s",
        "train.max_learner_failures", "checkpoint.every", "checkpoint.grace_s", "data.synthetic.num_expert",
        "data.tasks.num_expert", "train.eval_samples", "algo.overlong_buffer", "algo.overlong_penalty",
        "env.max_tokens", "env.reward_weight",
        *(f"{k}.weight_decay" for k in _LEARNERS))),
    *((k, lambda v: 0.0 <= v <= 1.0, "in [0, 1]") for k in (
        "algo.mu_peak", "algo.mu_valley", "learner.min_lr_ratio", "critic.min_lr_ratio", "algo.gamma",
        "algo.lam")),
    # 0 CPUs: the actor reserves none, which Ray can place only with a GPU in its bundle (checked at start,
    # actors/pools.py); reward actors never have one.
    *((f"{k}.num_cpus", lambda v: v >= 0, ">= 0 (0 = reserve no CPU, for an actor with a GPU)") for k in _ACTORS),
    *((f"{k}.num_threads", lambda v: v >= 0, ">= 0 (0 = from the placement)") for k in _ACTORS),
    ("reward.num_cpus", lambda v: v > 0, "> 0"),
    ("ray.num_cpus", lambda v: v is None or v >= 1, ">= 1 (or null: all)"),
    *((f"{k}.num_gpus", lambda v: v is None or v >= 0, ">= 0 (or null: 1 if the cluster has GPUs, else 0)")
      for k in ("learner", "critic", "reference")),
    ("rollout.gpu_memory_utilization", lambda v: 0.0 < v <= 1.0, "in (0, 1] (a share of each GPU's memory)"),
    ("reward.timeout_s", lambda v: v > 0, "> 0 (seconds one reward function may take on one batch)"),
    ("env.timeout_s", lambda v: v > 0, "> 0 (seconds one env actor may take on its episodes' turn)"),
    ("env.num_cpus", lambda v: v > 0, "> 0"),
    ("metrics.port", lambda v: 0 <= v <= 65535, "in [0, 65535] (0 = any free port)"),
    ("algo.expert_ratio", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("algo.clip_eps", lambda v: 0 < v < 1, "in (0, 1) (the ratio's lower bound 1 - clip_eps must be > 0)"),
    ("algo.clip_eps_high", lambda v: v is None or v > 0, "> 0 (or null: clip_eps)"),
    ("algo.loss_agg_norm", lambda v: v is None or v > 0, "> 0 (or null: the response budget)"),
    ("algo.is_cap", lambda v: v > 1.0, "> 1 (importance ratios above it are truncated or masked)"),
    ("checkpoint.grace_s", lambda v: v > 0, "> 0 (seconds to write the checkpoint after SIGTERM)"),
    ("algo.dual_clip", lambda v: v is None or v > 1.0, "> 1 (or null)"),
    ("algo.value_clip", lambda v: v is None or v > 0, "> 0 (or null)"),
    ("data.synthetic.alphabet", lambda v: len(v) >= 1, "a non-empty string (the characters of the task's strings)"),
    *((f"{k}.zero_stage", lambda v: v in (0, 1, 2, 3), "0, 1, 2 or 3") for k in _LEARNERS),
    *((f"{k}.lr", lambda v: v > 0, "> 0") for k in _LEARNERS),
    *((f"{k}.betas", _betas, "two numbers in [0, 1) (AdamW's beta1, beta2)") for k in _LEARNERS),
    *((f"{k}.grad_clip", lambda v: v >= 0, ">= 0 (the gradient norm's limit; 0 = no clipping)") for k in _LEARNERS),
    ("rollout.temperature", lambda v: v > 0, "> 0 (training samples; greedy decoding would repeat one response)"),
    ("rollout.top_p", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
]


def _check_synthetic(cfg: ChorusConfig) -> None:
    s = cfg.data.synthetic
    if s is None:
        return
    if s.max_len < s.min_len:
        raise ConfigError(f"config key 'data.synthetic.max_len': must be >= data.synthetic.min_len ({s.min_len}), "
                          f"got {s.max_len}")
    universe = distinct_strings(s.alphabet, s.min_len, s.max_len, 4 * s.num_eval)
    if universe < 4 * s.num_eval:
        raise ConfigError(f"config key 'data.synthetic.num_eval': {s.num_eval} held-out rows need at least "
                          f"{4 * s.num_eval} distinct strings, but alphabet {s.alphabet!r} with lengths "
                          f"{s.min_len}..{s.max_len} has only {universe}")
    if cfg.algo.expert_ratio > 0 and s.num_expert == 0:
        raise ConfigError("config key 'data.synthetic.num_expert': algo.expert_ratio > 0 needs expert rows, got 0")


def _check_tasks(cfg: ChorusConfig) -> None:
    t = cfg.data.tasks
    if t is None:
        return
    if cfg.data.synthetic is not None:
        raise ConfigError("config key 'data.tasks': set data.tasks or data.synthetic, not both")
    for key in ("prompts", "expert", "eval"):
        if getattr(cfg.data, key):
            raise ConfigError(f"config key 'data.{key}': data.tasks generates it; set one or the other")
    if not t.mixture:
        raise ConfigError(f"config key 'data.tasks.mixture': name at least one task family and its share, "
                          f"e.g. {{add3: 1.0}}; families: {list(FAMILIES)}")
    for name, share in t.mixture.items():
        if name not in FAMILIES:
            raise ConfigError(f"config key 'data.tasks.mixture.{name}': not a task family; choose from "
                              f"{list(FAMILIES)}")
        if not (math.isfinite(share) and share > 0):
            raise ConfigError(f"config key 'data.tasks.mixture.{name}': a share must be > 0, got {share!r}")
    if not t.eval:
        raise ConfigError("config key 'data.tasks.eval': name the target family first (and retention families)")
    for i, name in enumerate(t.eval):
        if name not in FAMILIES:
            raise ConfigError(f"config key 'data.tasks.eval[{i}]': {name!r} is not a task family; choose from "
                              f"{list(FAMILIES)}")
    if len(set(t.eval)) != len(t.eval):
        raise ConfigError(f"config key 'data.tasks.eval': a family is named twice in {list(t.eval)}")
    if t.tool and not t.chat:
        raise ConfigError("config key 'data.tasks.tool': tool calls are turns of a conversation: set data.tasks.chat "
                          "true")
    if t.tool and t.tool not in TOOL_DEMOS:
        raise ConfigError(f"config key 'data.tasks.tool': {t.tool!r} is not one of {list(TOOL_DEMOS)}")
    if t.tool and (bad := [f for f in t.mixture if f not in TOOL_DEMOS[t.tool]]):
        raise ConfigError(f"config key 'data.tasks.mixture': the {t.tool} tool's demonstrations cover "
                          f"{list(TOOL_DEMOS[t.tool])}, not {bad}")
    if cfg.data.retention and (clash := set(cfg.data.retention) & set(t.eval[1:])):
        raise ConfigError(f"config key 'data.retention': {sorted(clash)} are also data.tasks.eval families")
    if cfg.algo.expert_ratio > 0 and t.num_expert == 0:
        raise ConfigError("config key 'data.tasks.num_expert': algo.expert_ratio > 0 needs expert rows, got 0")


def _check_algo(cfg: ChorusConfig) -> None:
    a = cfg.algo
    if a.kl_coef > 0 and a.kl_penalty == "loss" and a.kl_estimator == "k1":
        raise ConfigError("config key 'algo.kl_estimator': k1 as a loss term has zero expected gradient, so it "
                          "regularises nothing; use k2 (gradient of KL(policy || reference)) or k3 (gradient of "
                          "KL(reference || policy)), or put k1 in the reward with algo.kl_penalty: reward")
    if a.is_correction != "none" and not a.recompute_logprobs:
        raise ConfigError(f"config key 'algo.is_correction': {a.is_correction} weighs the learner's log-probabilities "
                          f"against the engine's; set algo.recompute_logprobs: true so the learner computes them")
    if a.advantage == "rloo" and cfg.rollout.n < 2:
        raise ConfigError("config key 'rollout.n': rloo's baseline is the other samples of the prompt; needs n >= 2")
    if a.overlong_buffer >= cfg.rollout.max_new_tokens:
        raise ConfigError(f"config key 'algo.overlong_buffer': must be < rollout.max_new_tokens "
                          f"({cfg.rollout.max_new_tokens}): the penalty spans the last tokens of the budget, got "
                          f"{a.overlong_buffer}")
    if a.dynamic_sampling and cfg.rollout.n < 2:
        raise ConfigError("config key 'algo.dynamic_sampling': a group of one sample has no reward spread; needs "
                          "rollout.n >= 2")
    clip_high = a.clip_eps if a.clip_eps_high is None else a.clip_eps_high
    if a.dual_clip is not None and a.dual_clip <= 1.0 + clip_high:
        raise ConfigError(f"config key 'algo.dual_clip': must be > 1 + the upper clip ({1.0 + clip_high:g}); a cap "
                          f"inside the clip range zeroes the gradient of ratios PPO keeps, got {a.dual_clip}")
    if a.policy_loss == "gspo" and a.loss_agg != "seq-mean-token-mean":
        raise ConfigError(f"config key 'algo.loss_agg': gspo's objective averages each sequence's tokens "
                          f"(seq-mean-token-mean); {a.loss_agg} would weight its sequences by their length")
    if a.dynamic_sampling and needs_critic(a.advantage):
        raise ConfigError(f"config key 'algo.dynamic_sampling': it drops groups whose rewards are all equal, which "
                          f"carry no signal only for group baselines (grpo, rloo), not for {a.advantage}")
    if a.clip_eps_high is not None and a.clip_eps_high < a.clip_eps:
        raise ConfigError(f"config key 'algo.clip_eps_high': must be >= algo.clip_eps ({a.clip_eps}), got "
                          f"{a.clip_eps_high} (clip-higher widens the upper side only)")


def loss_spec(cfg: ChorusConfig) -> LossSpec:
    """The learner's loss, chosen once from the config."""
    a = cfg.algo
    return LossSpec(
        policy_loss=a.policy_loss, clip_low=a.clip_eps,
        clip_high=a.clip_eps if a.clip_eps_high is None else a.clip_eps_high, dual_clip=a.dual_clip,
        agg=a.loss_agg, agg_norm=float(a.loss_agg_norm or response_budget(cfg)), sft_weight=a.sft_weight,
        kl_estimator=a.kl_estimator, kl_coef=a.kl_coef if a.kl_penalty == "loss" else 0.0,
        is_correction=a.is_correction, is_cap=a.is_cap, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)


def response_budget(cfg: ChorusConfig) -> int:
    """The most tokens a rollout's response may hold: rollout.max_new_tokens, or for a multi-turn episode
    env.max_tokens (0: rollout.max_model_len)."""
    if cfg.env.name:
        return cfg.env.max_tokens or cfg.rollout.max_model_len
    return cfg.rollout.max_new_tokens


def advantage_spec(cfg: ChorusConfig) -> AdvantageSpec:
    a = cfg.algo
    return AdvantageSpec(group_size=cfg.rollout.n, std_normalize=a.adv_std_normalize, gamma=a.gamma, lam=a.lam,
                         whiten_rewards=a.whiten_rewards, whiten_advantages=a.whiten_advantages)


def validate(cfg: ChorusConfig) -> None:
    """Checks the schema's types cannot express; each message names the key."""
    for key, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}': must be a finite number, got {value!r}")
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value is not _ABSENT and value is not None and value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(allowed)}")
    for key, ok, what in _RULES:
        value = _get(cfg, key)
        if value is not _ABSENT and not ok(value):
            raise ConfigError(f"config key '{key}': must be {what}, got {value!r}")
    if cfg.rollout.max_model_len <= cfg.rollout.max_new_tokens:
        raise ConfigError(f"config key 'rollout.max_model_len': must be > rollout.max_new_tokens "
                          f"({cfg.rollout.max_new_tokens}), since the context holds the prompt and the response; "
                          f"got {cfg.rollout.max_model_len}")
    for section in _LEARNERS:
        if getattr(cfg, section).autocast and cfg.model.dtype != "float32":
            raise ConfigError(f"config key '{section}.autocast': autocasts float32 weights to "
                              f"{getattr(cfg, section).autocast}; with model.dtype {cfg.model.dtype} the weights "
                              f"are not float32: set model.dtype float32 (mixed precision) or {section}.autocast ''")
        lc = getattr(cfg, section)
        if lc.compile and lc.zero_stage == 3 and lc.num_actors > 1:
            raise ConfigError(f"config key '{section}.compile': torch.compile under ZeRO-3's partitioned weights "
                              f"(zero_stage 3 across {lc.num_actors} ranks) is not verified in chorus; use "
                              f"{section}.zero_stage 0-2 or {section}.compile false")
    if cfg.rollout.compile and cfg.rollout.backend != "hf":
        raise ConfigError(f"config key 'rollout.compile': compiles the hf backend's model; vLLM's own compilation is "
                          f"not enabled by chorus (its engines run eagerly): set rollout.backend hf or "
                          f"rollout.compile false (rollout.backend is {cfg.rollout.backend!r})")
    _check_synthetic(cfg)
    _check_tasks(cfg)
    for name in cfg.data.retention:
        if name == TARGET or not name or "/" in name:
            raise ConfigError(f"config key 'data.retention.{name}': a set's name must be non-empty, hold no '/' "
                              f"and not be '{TARGET}' (the name of data.eval's set)")
    if not cfg.reward.functions and not cfg.env.name:
        raise ConfigError("config key 'reward.functions': at least one reward function is needed (or an environment, "
                          "env.name, whose rewards are the rollouts')")
    if not cfg.env.name:
        for f in fields(EnvConfig):
            if getattr(cfg.env, f.name) != getattr(EnvConfig(), f.name):
                raise ConfigError(f"config key 'env.{f.name}': set, but env.name is empty (single-turn rollouts, "
                                  f"no environment): set env.name or leave env.{f.name} out")
    if cfg.env.name and needs_critic(cfg.algo.advantage):
        raise ConfigError(f"config key 'algo.advantage': {cfg.algo.advantage} estimates per-token values over a "
                          f"contiguous response; in multi-turn episodes (env.name) observations interleave the "
                          f"model's turns: use grpo or rloo")
    if cfg.env.name and cfg.algo.overlong_buffer:
        raise ConfigError("config key 'algo.overlong_buffer': DAPO's overlong penalty measures one response against "
                          "rollout.max_new_tokens; a multi-turn episode (env.name) has turns and env.max_tokens: "
                          "set it to 0")
    if cfg.env.max_tokens and cfg.env.max_tokens > cfg.rollout.max_model_len:
        raise ConfigError(f"config key 'env.max_tokens': {cfg.env.max_tokens} does not fit in the engines' context "
                          f"(rollout.max_model_len {cfg.rollout.max_model_len}); 0 = the context")
    for i, f in enumerate(cfg.reward.functions):
        if f.isolation not in ("", "process", "thread"):
            raise ConfigError(f"config key 'reward.functions[{i}].isolation': {f.isolation!r} is not one of "
                              f"['process', 'thread'] (or empty: the reward's default)")
    if not cfg.model.path and not cfg.model.build:
        raise ConfigError("config key 'model.path': set a Hugging Face model directory (or model.build)")
    if cfg.model.build and not Path(cfg.model.build).is_file():
        raise ConfigError(f"config key 'model.build': recipe file '{cfg.model.build}' not found "
                          f"(paths are relative to the working directory)")
    if cfg.model.chat_template and not Path(cfg.model.chat_template).is_file():
        raise ConfigError(f"config key 'model.chat_template': Jinja template file '{cfg.model.chat_template}' not "
                          f"found (paths are relative to the working directory)")
    generated = cfg.data.synthetic is not None or cfg.data.tasks is not None
    if not generated and not (cfg.data.prompts and cfg.data.eval):
        raise ConfigError("config key 'data.prompts': set data.prompts and data.eval, or data.tasks (or "
                          "data.synthetic)")
    if cfg.algo.expert_ratio > 0 and not generated and not cfg.data.expert:
        raise ConfigError("config key 'data.expert': algo.expert_ratio > 0 needs an expert data file")
    _check_algo(cfg)
    if cfg.algo.expert_ratio == 0 and max(cfg.algo.mu_peak, cfg.algo.mu_valley) > 0:
        raise ConfigError("config key 'algo.expert_ratio': mu > 0 weights an SFT term, but expert_ratio 0 gives "
                          "it no rows (set mu_peak = mu_valley = 0 for pure RL)")


def to_yaml(cfg: ChorusConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
