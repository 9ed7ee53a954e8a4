"""actors/config.py: every shipped YAML loads; typos, wrong types and bad choices fail with the full key path."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from actors.config import ChorusConfig, ConfigError, load_config, loss_spec, to_yaml
from learners.losses import LossSpec

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))

# The smallest config that validates: a model and a data source.
BASE_DICT = {"model": {"build": "configs/models/tiny_llama.json"}, "data": {"synthetic": {"task": "reverse"}}}
BASE = yaml.safe_dump(BASE_DICT)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def base_with(key: str, value) -> str:
    """BASE plus ``key: value`` at the dotted path ``key`` (merged into the existing sections)."""
    tree = copy.deepcopy(BASE_DICT)
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return yaml.safe_dump(tree)


def test_configs_dir_is_not_empty():
    assert CONFIGS, "no configs/*.yaml found: the parametrised load test below would silently run nothing"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, ChorusConfig)
    # Its YAML dump (what a run dir keeps) loads back to the same config.
    assert load_config(write(tmp_path, to_yaml(cfg))) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_header_names_launch_command(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert "launch" in "\n".join(header).lower(), f"{path.name}: the header comment should say how to launch it"


def test_base_config_is_valid(tmp_path):
    # the error tests below add one mistake to this config; it must load cleanly on its own
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.data.synthetic.task == "reverse" and cfg.train.steps == 100


def test_override_sets_value(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.steps=7", "algo.dual_clip=3.0", "algo.sft_weight=phi"])
    assert (cfg.train.steps, cfg.algo.dual_clip, cfg.algo.sft_weight) == (7, 3.0, "phi")


@pytest.mark.parametrize("key", ["model.foo", "train.stepz", "data.synthetic.alphabett", "bogus"])
def test_unknown_key_in_yaml(tmp_path, key):
    path = write(tmp_path, base_with(key, 1))
    with pytest.raises(ConfigError, match=f"'{key}'") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("override, key", [
    ("model.foo=1", "model.foo"),
    ("train.stepz=3", "train.stepz"),
    ("data.synthetic.alphabett=ab", "data.synthetic.alphabett"),
])
def test_unknown_key_in_override(tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'") as exc:
        load_config(write(tmp_path, BASE), [override])
    assert "command line" in str(exc.value)


@pytest.mark.parametrize("override, key", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("algo.expert_ratio=abc", "algo.expert_ratio"),
    ("algo.recompute_logprobs=maybe", "algo.recompute_logprobs"),
    ("learner.betas=[a,b]", "learner.betas[0]"),
])
def test_wrong_type_in_override(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, BASE), [override])


@pytest.mark.parametrize("overrides, key, why", [
    (["algo.kl_coef=0.1", "algo.kl_estimator=k1"], "algo.kl_estimator", "zero expected gradient"),
    (["algo.is_correction=token-truncate"], "algo.is_correction", "recompute_logprobs: true"),
    (["algo.advantage=rloo", "rollout.n=1"], "rollout.n", "n >= 2"),
    (["algo.clip_eps=0.2", "algo.clip_eps_high=0.1"], "algo.clip_eps_high", "upper side only"),
    (["algo.overlong_buffer=16", "rollout.max_new_tokens=16"], "algo.overlong_buffer", "last tokens of the budget"),
    (["algo.dynamic_sampling=true", "rollout.n=1"], "algo.dynamic_sampling", "rollout.n >= 2"),
    (["algo.policy_loss=gspo", "algo.loss_agg=token-mean"], "algo.loss_agg", "seq-mean-token-mean"),
    (["algo.dual_clip=1.1", "algo.clip_eps_high=0.28"], "algo.dual_clip", "> 1 + the upper clip (1.28)"),
    (["algo.dynamic_sampling=true", "algo.advantage=gae"], "algo.dynamic_sampling", "not for gae"),
    (["learner.autocast=bfloat16", "model.dtype=bfloat16"], "learner.autocast", "set model.dtype float32"),
    (["critic.autocast=bfloat16", "model.dtype=float16"], "critic.autocast", "are not float32"),
    (["learner.compile=true", "learner.zero_stage=3", "learner.num_actors=2"], "learner.compile", "not verified"),
    (["rollout.compile=true", "rollout.backend=vllm"], "rollout.compile", "set rollout.backend hf"),
    (["env.name=tools", "algo.advantage=gae"], "algo.advantage", "use grpo or rloo"),
    (["env.name=tools", "algo.overlong_buffer=4"], "algo.overlong_buffer", "set it to 0"),
    (["env.name=tools", "env.max_tokens=999"], "env.max_tokens", "does not fit"),
    (["env.max_turns=2"], "env.max_turns", "env.name is empty"),
    (["reward.functions=[]"], "reward.functions", "at least one reward function is needed"),
])
def test_algorithm_combinations_that_cannot_mean_what_they_say(tmp_path, overrides, key, why):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'") + ".*" + re.escape(why)):
        load_config(write(tmp_path, BASE), overrides)


@pytest.mark.parametrize("override, key", [
    ("learner.autocast=float16", "learner.autocast"),
    ("learner.attention=flash", "learner.attention"),
    ("rollout.num_threads=-1", "rollout.num_threads"),
])
def test_precision_attention_and_threads_are_checked(tmp_path, override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load_config(write(tmp_path, BASE), [override])
    cfg = load_config(write(tmp_path, BASE), ["learner.autocast=bfloat16", "learner.attention=sdpa"])
    assert (cfg.learner.autocast, cfg.learner.attention, cfg.rollout.num_threads) == ("bfloat16", "sdpa", 0)


def test_tool_demonstrations_are_conversations_of_arithmetic_families():
    for override, why in (("data.tasks.chat=false", "'data.tasks.tool': tool calls are turns of a conversation"),
                          ("data.tasks.mixture={sortrep: 1.0}", "'data.tasks.mixture': the calc tool's "
                                                                "demonstrations cover ['add2', 'add3']")):
        with pytest.raises(ConfigError, match=re.escape(why)):
            load_config(Path("configs/tool_use.yaml"), [override])


def test_an_environment_takes_the_rewards_place_and_its_budget_is_dr_grpos(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["env.name=tools", "reward.functions=[]", "env.max_tokens=100",
                                              "algo.loss_agg=seq-mean-token-sum-norm"])
    assert cfg.reward.functions == [] and loss_spec(cfg).agg_norm == 100.0  # an episode's budget, not one turn's
    cfg = load_config(write(tmp_path, BASE), ["env.name=tools", "algo.loss_agg=seq-mean-token-sum-norm"])
    assert loss_spec(cfg).agg_norm == float(cfg.rollout.max_model_len)


def test_k1_is_accepted_in_the_reward_and_without_a_reference(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["algo.kl_coef=0.1", "algo.kl_estimator=k1", "algo.kl_penalty=reward"])
    assert loss_spec(cfg).kl_coef == 0.0  # the penalty is in the reward, not the loss
    load_config(write(tmp_path, BASE), ["algo.kl_estimator=k1"])  # kl_coef 0: no penalty anywhere


def test_loss_spec_from_the_config(tmp_path):
    cfg = load_config(write(tmp_path, BASE), [
        "algo.policy_loss=ppo", "algo.clip_eps=0.0003", "algo.clip_eps_high=0.0004", "algo.dual_clip=3.0",
        "algo.loss_agg=seq-mean-token-sum-norm", "algo.sft_weight=phi", "algo.kl_coef=0.05", "algo.kl_estimator=k2",
        "algo.recompute_logprobs=true", "algo.is_correction=seq-mask", "algo.is_cap=3.0", "rollout.temperature=0.7",
        "rollout.top_p=0.9", "rollout.max_new_tokens=24"])
    assert loss_spec(cfg) == LossSpec(
        policy_loss="ppo", clip_low=0.0003, clip_high=0.0004, dual_clip=3.0, agg="seq-mean-token-sum-norm",
        agg_norm=24.0, sft_weight="phi", kl_estimator="k2", kl_coef=0.05, is_correction="seq-mask", is_cap=3.0,
        temperature=0.7, top_p=0.9)
    # clip_eps_high null = symmetric; loss_agg_norm set = that constant
    cfg = load_config(write(tmp_path, BASE), ["algo.clip_eps=0.1", "algo.loss_agg_norm=100"])
    assert (loss_spec(cfg).clip_low, loss_spec(cfg).clip_high, loss_spec(cfg).agg_norm) == (0.1, 0.1, 100.0)


@pytest.mark.parametrize("phi, weight", [(True, "phi"), (False, "nll")])
def test_a_checkpoint_config_with_a_renamed_key_still_loads_and_resumes(tmp_path, phi, weight):
    """A checkpoint written before algo.phi became algo.sft_weight: its config.yaml translates, so the run resumes."""
    from actors.checkpoint import check_resumable

    old = tmp_path / "ckpt"
    old.mkdir()
    cfg = load_config(write(tmp_path, BASE), [f"algo.sft_weight={weight}"])
    text = to_yaml(cfg).replace(f"sft_weight: {weight}", f"phi: {str(phi).lower()}")
    assert "phi:" in text and "sft_weight" not in text
    (old / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="was renamed"):
        load_config(old / "config.yaml")  # a user's file says what to change
    assert load_config(old / "config.yaml", legacy=True).algo.sft_weight == weight
    check_resumable(cfg, old)  # same run: resumable
    other = load_config(write(tmp_path, BASE), [f"algo.sft_weight={'nll' if phi else 'phi'}"])
    with pytest.raises(ConfigError, match="'algo.sft_weight' was"):
        check_resumable(other, old)


def test_a_variant_registered_later_is_a_choice(tmp_path):
    from learners.advantages import ADVANTAGES

    with pytest.raises(ConfigError, match="'algo.advantage'"):
        load_config(write(tmp_path, BASE), ["algo.advantage=test_median_baseline"])
    ADVANTAGES.register("test_median_baseline")(lambda *a, **k: None)
    try:
        assert load_config(write(tmp_path, BASE), ["algo.advantage=test_median_baseline"]).algo.advantage \
            == "test_median_baseline"
    finally:
        del ADVANTAGES._fns["test_median_baseline"]


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_renamed_key_says_what_replaces_it(tmp_path, where):
    path = write(tmp_path, base_with("algo.phi", "true") if where == "yaml" else BASE)
    with pytest.raises(ConfigError, match=r"'algo.phi' was renamed: use algo.sft_weight \(phi: true is sft_weight: "
                                          r"phi"):
        load_config(path, [] if where == "yaml" else ["algo.phi=true"])


def test_wrong_type_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match="'train.steps'"):
        load_config(write(tmp_path, base_with("train.steps", "abc")))




def test_bad_choice_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match="'rollout.backend'.*tpu"):
        load_config(write(tmp_path, base_with("rollout.backend", "tpu")))


@pytest.mark.parametrize("override, key", [
    # not one of the choices
    ("rollout.backend=tpu", "rollout.backend"),
    ("model.dtype=fp8", "model.dtype"),
    ("learner.backend=mpi", "learner.backend"),
    ("data.synthetic.task=add", "data.synthetic.task"),
    ("reward.on_failure=skip", "reward.on_failure"),
    ("data.on_bad_row=drop", "data.on_bad_row"),
    ("reward.functions=[{name: f, isolation: fork}]", "reward.functions[0].isolation"),
    # out of range
    ("train.steps=0", "train.steps"),
    ("rollout.n=0", "rollout.n"),
    ("algo.expert_ratio=1.0", "algo.expert_ratio"),
    ("algo.mu_peak=1.5", "algo.mu_peak"),
    ("reward.functions=[]", "reward.functions"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("algo.advantage=ppo", "algo.advantage"),
    ("algo.policy_loss=grpo", "algo.policy_loss"),
    ("algo.loss_agg=mean", "algo.loss_agg"),
    ("algo.kl_estimator=k4", "algo.kl_estimator"),
    ("algo.kl_penalty=both", "algo.kl_penalty"),
    ("algo.sft_weight=tis", "algo.sft_weight"),
    ("algo.mu_schedule=step", "algo.mu_schedule"),
    ("algo.is_correction=tis", "algo.is_correction"),
    ("algo.is_cap=1.0", "algo.is_cap"),
    ("algo.clip_eps=1.0", "algo.clip_eps"),
    ("algo.clip_eps_high=0", "algo.clip_eps_high"),
    ("algo.loss_agg_norm=0", "algo.loss_agg_norm"),
    ("algo.max_sample_rounds=0", "algo.max_sample_rounds"),
    ("algo.overlong_buffer=-1", "algo.overlong_buffer"),
    ("algo.overlong_penalty=-0.5", "algo.overlong_penalty"),
    ("algo.dual_clip=0.5", "algo.dual_clip"),
    ("learner.zero_stage=4", "learner.zero_stage"),
    ("algo.mu_decay_steps=-1", "algo.mu_decay_steps"),
    ("algo.expert_ratio=0", "algo.expert_ratio"),  # mu > 0 with no expert rows
])
def test_invalid_value_names_its_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):  # a key may hold brackets: [0]
        load_config(write(tmp_path, BASE), [override])


# Values the types accept but the run cannot mean (issue 13): each one stops the start, naming its key and saying
# what it must be. YAML spells them as a user would (.nan, .inf, a list of one), through the config file.
@pytest.mark.parametrize("key, value, must, named", [
    ("reward.fallback", float("nan"), "finite", None),
    ("reward.functions", [{"name": "exact_match", "weight": float("inf")}], "finite", "reward.functions[0].weight"),
    ("reward.functions", [{"name": "exact_match"}, {"name": "exact_match", "weight": float("nan")}], "finite",
     "reward.functions[1].weight"),
    ("reward.timeout_s", 0.0, "> 0", None),
    ("reward.timeout_s", float("inf"), "finite", None),
    ("reward.num_cpus", 0.0, "> 0", None),
    ("reward.deadline_s", float("inf"), "finite", None),
    ("learner.lr", float("inf"), "finite", None),
    ("critic.lr", 0.0, "> 0", None),
    ("learner.betas", [0.9], "two numbers in [0, 1)", None),
    ("learner.betas", [0.9, 0.99, 0.999], "two numbers in [0, 1)", None),
    ("critic.betas", [0.9, 1.0], "two numbers in [0, 1)", None),
    ("learner.betas", [0.9, float("nan")], "finite", "learner.betas[1]"),
    ("learner.grad_clip", -1.0, ">= 0", None),
    ("critic.grad_clip", float("inf"), "finite", None),
    ("learner.weight_decay", -0.1, ">= 0", None),
    ("learner.num_cpus", -1.0, ">= 0", None),
    ("critic.num_cpus", -0.5, ">= 0", None),
    ("rollout.num_cpus", -1.0, ">= 0", None),
    ("reference.num_cpus", -1.0, ">= 0", None),
    ("ray.num_cpus", 0, ">= 1", None),
    ("learner.num_gpus", -1.0, ">= 0", None),
    ("reference.num_gpus", float("inf"), "finite", None),
    ("learner.num_threads", -1, ">= 0 (0 = from the placement)", None),
    ("rollout.num_threads", -1, ">= 0", None),
    ("reference.num_threads", -2, ">= 0", None),
    ("rollout.kv_cache_gib", 0, ">= 1", None),
    ("rollout.max_model_len", 0, ">= 1", None),
    ("rollout.max_model_len", 16, "> rollout.max_new_tokens (16)", None),  # no room for the prompt
    ("rollout.gpu_memory_utilization", 7.0, "in (0, 1]", None),
    ("rollout.gpu_memory_utilization", 0.0, "in (0, 1]", None),
    ("rollout.deadline_s", float("nan"), "finite", None),
    ("metrics.port", 99999, "in [0, 65535]", None),
    ("metrics.port", -1, "in [0, 65535]", None),
    ("algo.clip_eps", float("inf"), "finite", None),
    ("algo.kl_coef", float("nan"), "finite", None),
    ("checkpoint.grace_s", float("inf"), "finite", None),
    ("data.synthetic.min_len", 0, ">= 1", None),
    ("data.synthetic.max_len", 2, ">= data.synthetic.min_len (3)", None),
    ("data.synthetic.num_prompts", 0, ">= 1", None),
    ("data.synthetic.num_eval", -5, ">= 1", None),
    ("data.synthetic.num_expert", -1, ">= 0", None),
    ("data.synthetic.num_expert", 0, "expert_ratio > 0 needs expert rows", None),
    ("data.synthetic.alphabet", "", "non-empty", None),
    # alphabet "ab", lengths 3..6: 8 + 16 + 32 + 64 = 120 strings, fewer than the 4 x 50 = 200 needed
    ("data.synthetic", {"alphabet": "ab", "num_eval": 50}, "need at least 200 distinct strings, but alphabet 'ab' "
     "with lengths 3..6 has only 120", "data.synthetic.num_eval"),
])
def test_meaningless_value_stops_the_start_naming_its_key(tmp_path, key, value, must, named):
    if key == "data.synthetic":
        value = {"task": "reverse", **value}
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, base_with(key, value)))
    message = str(exc.value)
    assert f"config key '{named or key}': " in message and must in message, message


def test_zero_values_that_mean_something_stay_allowed(tmp_path):
    # grad_clip 0 = no clipping (DeepSpeed clips only above 0); num_cpus 0 = reserve none (an actor with a GPU);
    # num_gpus 0 = CPU actors; weight_decay 0; metrics.port 0 = any free port; no expert rows for pure RL
    cfg = load_config(write(tmp_path, BASE), [
        "learner.grad_clip=0", "learner.num_cpus=0", "learner.num_gpus=1", "reference.num_gpus=0",
        "learner.weight_decay=0", "metrics.port=0", "data.synthetic.num_expert=0", "algo.expert_ratio=0",
        "algo.mu_peak=0", "algo.mu_valley=0", "rollout.gpu_memory_utilization=1.0", "learner.betas=[0,0.5]",
        "reward.functions=[{name: exact_match, weight: -1.0}]"])  # a negative weight is a penalty
    assert (cfg.learner.grad_clip, cfg.learner.num_cpus, cfg.data.synthetic.num_expert) == (0.0, 0.0, 0)


def test_nan_from_the_command_line_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("config key 'reward.fallback': must be a finite number, got nan")):
        load_config(write(tmp_path, BASE), ["reward.fallback=nan"])
    with pytest.raises(ConfigError, match=re.escape("config key 'learner.lr': must be a finite number, got inf")):
        load_config(write(tmp_path, BASE), ["learner.lr=inf"])


def test_missing_model_and_data(tmp_path):
    with pytest.raises(ConfigError, match="'model.path'"):
        load_config(write(tmp_path, "data:\n  synthetic: {}\n"))
    recipe = Path(__file__).resolve().parents[2] / "configs" / "models" / "tiny_llama.json"
    with pytest.raises(ConfigError, match="'data.prompts'"):
        load_config(write(tmp_path, f"model:\n  build: {recipe}\n"))
    with pytest.raises(ConfigError, match="'model.build'.*x.json"):
        load_config(write(tmp_path, "model:\n  build: x.json\ndata:\n  synthetic: {}\n"))


def test_override_without_equals_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(write(tmp_path, BASE), ["train.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_reward_function_without_name_names_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.functions\[0\]\.name"):
        load_config(write(tmp_path, BASE), ["reward.functions=[{weight: 2}]"])


# --- errors once lost or garbled: list elements, list overrides, YAML syntax ------------------------------------


@pytest.mark.parametrize("source", ["yaml", "override"])
def test_unknown_key_in_reward_function_names_full_path(tmp_path, source):
    functions = "[{name: exact_match}, {name: exact_match, wieght: 2}]"
    if source == "yaml":
        args = (write(tmp_path, base_with("reward.functions", yaml.safe_load(functions))), [])
    else:
        args = (write(tmp_path, BASE), [f"reward.functions={functions}"])
    with pytest.raises(ConfigError, match=r"reward\.functions\[1\]\.wieght"):
        load_config(*args)


def test_override_into_reward_function_raises_config_error(tmp_path):
    # from_dotlist makes {'functions': {'0': ...}}, a dict that OmegaConf cannot merge onto the list; the cli only
    # catches ConfigError, so the user gets a traceback "Cannot merge incompatible container types".
    with pytest.raises(ConfigError, match="reward.functions"):
        load_config(write(tmp_path, BASE), ["reward.functions.0.weight=2.0"])


def test_malformed_yaml_raises_config_error(tmp_path):
    # the cli only catches ConfigError; OmegaConf.load raises yaml.YAMLError, which is no OmegaConfBaseException
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, "train:\n  steps: [1\n"))
