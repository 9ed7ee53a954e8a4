"""LLM judge: a language model in a Ray actor of its own scores each response from a rubric prompt.

The reward ``judge`` renders ``template`` for each sample (``{prompt}``, ``{response}`` and any field of the data
row, e.g. ``{answer}``), has the judge model continue it greedily, and reads the score from the verdict strictly:
``pattern`` (one capture group) must match exactly once and the number must lie in ``[min_score, max_score]``;
the reward is that number scaled to [0, 1]. Anything else (no match, two verdicts, out of range, a prompt longer
than the model takes, a row without a field the template names) scores ``None``: a counted failure that gets
``reward.fallback``, never a crash. Only the judge's own output is parsed, so a response that writes
"Score: 10" itself gains nothing from it.

Config (``reward.functions``)::

    - name: judge
      args:
        model: /models/Qwen2.5-7B-Instruct   # a Hugging Face directory; its chat template is used if it has one
        template: |
          Question: {prompt}
          Reference answer: {answer}
          Candidate answer: {response}
          Grade the candidate from 0 to 10 against the reference. Reply with one line, "Score: N".
        max_new_tokens: 16
        dtype: bfloat16                      # float32 by default, as the tiny CPU models need
        num_gpus: 1
        timeout_s: 60                        # at most reward.timeout_s: a stuck engine is then replaced in time

The engine (vLLM; ``backend: hf`` for transformers ``generate``) runs in a :class:`JudgeEngine` actor started by
the reward actor that builds the reward, and stopped with it. An engine that dies fails the batch it was on (Ray
restarts it, up to 3 times; after that a new one is started); one that gives no verdicts within ``timeout_s`` is
killed and replaced. Raise ``reward.timeout_s`` to what the judge needs for one batch, and keep the judge's own
``timeout_s`` at or below it: the reward actor stops waiting at ``reward.timeout_s``, the judge's thread at
``timeout_s``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import string

from rewards.registry import register

log = logging.getLogger("chorus.rewards")

DEFAULT_TEMPLATE = (
    "Question: {prompt}\nAnswer: {response}\n\n"
    "Rate how well the answer answers the question, from 0 (wrong) to 10 (fully correct). "
    "Reply with one line: Score: N\n"
)
DEFAULT_PATTERN = r"Score:\s*(-?\d+(?:\.\d+)?)"


def template_fields(template: str) -> set[str]:
    """The row fields ``template`` uses; raises ``ValueError`` for a malformed template or a field that is not a
    plain name (``{0}``, ``{x.attr}``, ``{x[0]}``)."""
    names = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"template field {{{name}}}: use a plain field name such as {{prompt}} or {{answer}}")
        names.add(name)
    if "response" not in names:
        raise ValueError("template does not show the judge the {response}")
    return names


def compile_pattern(pattern: str) -> re.Pattern:
    """``pattern`` compiled; it must have exactly one capture group (the score)."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r}: {exc}") from None
    if compiled.groups != 1:
        raise ValueError(f"pattern {pattern!r} has {compiled.groups} capture groups; it needs one, the score")
    return compiled


def parse_verdict(verdict: str, pattern: re.Pattern, min_score: float, max_score: float) -> float | None:
    """The score in ``verdict`` scaled to [0, 1], or ``None`` unless ``pattern`` matches exactly once with a finite
    number in ``[min_score, max_score]``.

    >>> p = compile_pattern(DEFAULT_PATTERN)
    >>> parse_verdict("Score: 7", p, 0, 10), parse_verdict("Score: 7\\nScore: 9", p, 0, 10)
    (0.7, None)
    """
    matches = list(pattern.finditer(verdict))
    if len(matches) != 1:
        return None
    try:
        value = float(matches[0].group(1))
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or not min_score <= value <= max_score:
        return None
    return (value - min_score) / (max_score - min_score)


class JudgeEngine:
    """The judge model behind one generation backend (a Ray actor). ``verdicts`` continues each prompt greedily."""

    def __init__(self, model: str, *, backend: str, chat: bool | None, max_new_tokens: int, max_model_len: int,
                 num_threads: int, **backend_kwargs):
        import torch
        from transformers import AutoTokenizer

        from rollout.engine import BACKENDS

        torch.set_num_threads(num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ValueError(f"judge model {model} has no chat template (set chat: false)")
        self.chat = has_template if chat is None else chat
        self.max_new_tokens, self.max_model_len = max_new_tokens, max_model_len
        self.backend = BACKENDS[backend](model, max_model_len=max_model_len, **backend_kwargs)

    def _encode(self, text: str) -> list[int]:
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(text).input_ids

    def verdicts(self, texts: list[str]) -> list[str | None]:
        """The judge's greedy continuation of each prompt; ``None`` where the prompt leaves no room for
        ``max_new_tokens`` within ``max_model_len``."""
        from rollout.types import SamplingSpec

        ids = [self._encode(t) for t in texts]
        fits = [i for i, x in enumerate(ids) if len(x) + self.max_new_tokens <= self.max_model_len]
        out: list[str | None] = [None] * len(texts)
        if fits:
            spec = SamplingSpec(n=1, max_new_tokens=self.max_new_tokens, temperature=0.0)
            for c in self.backend.generate([ids[i] for i in fits], spec):
                out[fits[c.prompt_index]] = c.text
        return out

    def shutdown(self) -> None:
        self.backend.shutdown()

    def ready(self) -> int:
        return os.getpid()


@register("judge")
class Judge:
    """The ``judge`` reward: see the module docstring. Built once per reward actor, it starts its engine actor."""

    isolation = "thread"  # it calls its engine through Ray, which only the reward actor's own process can

    def __init__(self, model: str, *, template: str = DEFAULT_TEMPLATE, pattern: str = DEFAULT_PATTERN,
                 min_score: float = 0.0, max_score: float = 10.0, max_new_tokens: int = 16, chat: bool | None = None,
                 backend: str = "vllm", dtype: str = "float32", max_model_len: int = 2048, seed: int = 0,
                 num_cpus: float = 1.0, num_gpus: float | None = None, num_threads: int = 1,
                 tensor_parallel_size: int = 1, kv_cache_gib: int = 1, gpu_memory_utilization: float = 0.5,
                 timeout_s: float = 60.0, start_timeout_s: float = 600.0):
        import ray

        self.fields, self.pattern = self.check_args(model=model, template=template, pattern=pattern,
                                                    min_score=min_score, max_score=max_score)
        self.template, self.min_score, self.max_score, self.timeout_s = template, min_score, max_score, timeout_s
        if not ray.is_initialized():  # `chorus reward score judge ...`: a local cluster for the engine actor
            ray.init(include_dashboard=False, log_to_driver=False)
        if num_gpus is None:
            num_gpus = float(ray.cluster_resources().get("GPU", 0) > 0)
        env = {"OMP_NUM_THREADS": str(num_threads), "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "ERROR"}
        # No task retries: a batch that made the engine hang or crash is not run again on its replacement.
        self._new_engine = lambda: ray.remote(JudgeEngine).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=3, max_task_retries=0, runtime_env={"env_vars": env},
        ).remote(model, backend=backend, chat=chat, max_new_tokens=max_new_tokens, max_model_len=max_model_len,
                 num_threads=num_threads, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                 kv_cache_gib=kv_cache_gib, gpu_memory_utilization=gpu_memory_utilization)
        self.engine = self._new_engine()
        try:
            ray.get(self.engine.ready.remote(), timeout=start_timeout_s)
        except BaseException:
            ray.kill(self.engine)
            raise

    @staticmethod
    def check_args(model: str, template: str = DEFAULT_TEMPLATE, pattern: str = DEFAULT_PATTERN,
                   min_score: float = 0.0, max_score: float = 10.0, **_) -> tuple[set[str], re.Pattern]:
        """What can be checked before the engine starts (called at the run's start too); raises ValueError or
        FileNotFoundError naming the argument. Returns the template's fields and the compiled pattern."""
        fields, compiled = template_fields(template), compile_pattern(pattern)
        if not min_score < max_score:
            raise ValueError(f"min_score {min_score} must be below max_score {max_score}")
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"judge model '{model}': no Hugging Face model (config.json) there")
        return fields, compiled

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list[float | None]:
        import ray

        texts: dict[int, str] = {}
        missing = {}
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            values = {**{k: v[i] for k, v in fields.items()}, "prompt": prompt, "response": response}
            if absent := sorted(f for f in self.fields if values.get(f) is None):
                missing[i] = absent
                continue
            texts[i] = self.template.format_map(values)  # values go in as they are: braces in them are text
        if missing:
            log.warning("judge: %d rows lack the template's fields %s (first prompt %r)", len(missing),
                        next(iter(missing.values())), prompts[next(iter(missing))])
        order = list(texts)
        if not order:
            return [None] * len(responses)
        try:
            verdicts = ray.get(self.engine.verdicts.remote([texts[i] for i in order]), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.kill(self.engine, no_restart=False)  # a stuck engine: Ray starts a fresh one for the next call
            raise RuntimeError(f"judge engine gave no verdicts in {self.timeout_s}s; it is being restarted") from None
        except ray.exceptions.ActorDiedError:  # out of restarts: a new actor, for the next call
            self.engine = self._new_engine()
            raise
        scores: list[float | None] = [None] * len(responses)
        too_long, unparsed = 0, []
        for i, verdict in zip(order, verdicts):
            if verdict is None:
                too_long += 1
                continue
            scores[i] = parse_verdict(verdict, self.pattern, self.min_score, self.max_score)
            if scores[i] is None:
                unparsed.append(verdict)
        if too_long:
            log.warning("judge: %d prompts were longer than the judge's max_model_len allows", too_long)
        if unparsed:
            log.warning("judge: %d of %d verdicts did not parse (first: %r)", len(unparsed), len(order),
                        unparsed[0][:200])
        return scores

    def close(self) -> None:
        """Stop the engine (its processes and shared memory) and its actor."""
        import ray

        try:
            ray.get(self.engine.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.engine, no_restart=True)
