"""The frozen reference model of the KL penalty, and the response log-probabilities every model here computes.

The reference is the initial policy, never trained. It lives either in each learner process (``reference.colocate``:
no extra actors, one more copy of the weights per learner) or in its own actors (``ReferenceActor``: on a GPU
cluster, a device of its own).
"""

from __future__ import annotations

import contextlib
import os

from learners.batch import TrainBatch, collate, response_rows


def autocast(device, dtype: str):
    """The context every forward pass of a learner, critic or reference runs in: ``torch.autocast`` to ``dtype``
    (``learner.autocast``: matrix products in bfloat16 while the weights, their gradients and AdamW's state stay in
    the model's float32), or none for ``""``. Backward passes run outside it, as torch.autocast asks."""
    import torch

    if not dtype:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


def attention(name: str, device) -> str:
    """The attention kernel of a model that trains or scores rows (``learner.attention``): ``name``, or for ``""``
    eager on a CPU and sdpa on a GPU. On a CPU torch's fused SDPA kernel was slower than plain eager attention for
    chorus's rows of tens of tokens (a bfloat16 learner step of 64 rows of about 26 tokens, 2 threads: the 1.4M model
    0.11 s against 0.15 s, the 27M model 1.53 s against 1.73 s)."""
    import torch

    return name or ("sdpa" if torch.device(device).type == "cuda" else "eager")


def response_logprobs(model, batch: TrainBatch, pad_id: int, device, *, temperature: float = 1.0,
                      top_p: float = 1.0, precision: str = "") -> list[list[float]]:
    """log p(response token | prefix) of each row under ``model`` (an HF causal LM or a DeepSpeed engine wrapping
    one) on the sampling distribution (logits / temperature, top-p nucleus), no gradient, the forward pass under
    ``autocast(device, precision)``: [B][L_i - P_i]."""
    import torch

    from learners.sampling import sampling_logprobs

    with torch.no_grad():
        t = collate(batch, pad_id, device)
        with autocast(device, precision):
            logits = model(input_ids=t.input_ids, attention_mask=t.attention_mask).logits[:, :-1]  # [B, L-1, V]
        lp = sampling_logprobs(logits.float(), t.targets, temperature=temperature, top_p=top_p,
                               mask=t.mask)  # [B, L-1]
    return response_rows(lp, batch)


class ReferenceActor:
    """A frozen copy of the initial policy in its own process (``reference.colocate: false``)."""

    def __init__(self, model_path: str, *, dtype: str, num_threads: int, temperature: float = 1.0, top_p: float = 1.0,
                 precision: str = "", attn: str = ""):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(num_threads)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                          attn_implementation=attention(attn, self.device))
        self.model.to(self.device).eval().requires_grad_(False)
        self.temperature, self.top_p = temperature, top_p  # the rollouts' sampling distribution
        self.precision = precision  # the learner's autocast: the KL compares log-probabilities computed alike

    def reference_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        return response_logprobs(self.model, batch, self.pad_id, self.device, temperature=self.temperature,
                                 top_p=self.top_p, precision=self.precision)

    def ready(self) -> int:
        return os.getpid()
