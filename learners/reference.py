"""The frozen reference model of the KL penalty, and the response log-probabilities every model here computes.

The reference is the initial policy, never trained. It lives either in each learner process (``reference.colocate``:
no extra actors, one more copy of the weights per learner) or in its own actors (``ReferenceActor``: on a GPU
cluster, a device of its own).
"""

from __future__ import annotations

import os

from learners.batch import TrainBatch, collate, response_rows


def response_logprobs(model, batch: TrainBatch, pad_id: int, device, *, temperature: float = 1.0,
                      top_p: float = 1.0) -> list[list[float]]:
    """log p(response token | prefix) of each row under ``model`` (an HF causal LM or a DeepSpeed engine wrapping
    one) on the sampling distribution (logits / temperature, top-p nucleus), no gradient: [B][L_i - P_i]."""
    import torch

    from learners.sampling import sampling_logprobs

    with torch.no_grad():
        t = collate(batch, pad_id, device)
        logits = model(input_ids=t.input_ids, attention_mask=t.attention_mask).logits[:, :-1]  # [B, L-1, V]
        lp = sampling_logprobs(logits, t.targets, temperature=temperature, top_p=top_p, mask=t.mask)  # [B, L-1]
    return response_rows(lp, batch)


class ReferenceActor:
    """A frozen copy of the initial policy in its own process (``reference.colocate: false``)."""

    def __init__(self, model_path: str, *, dtype: str, num_threads: int, temperature: float = 1.0, top_p: float = 1.0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(num_threads)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval().requires_grad_(False)
        self.temperature, self.top_p = temperature, top_p  # the rollouts' sampling distribution

    def reference_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        return response_logprobs(self.model, batch, self.pad_id, self.device, temperature=self.temperature,
                                 top_p=self.top_p)

    def ready(self) -> int:
        return os.getpid()
