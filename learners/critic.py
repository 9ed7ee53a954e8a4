"""The critic of PPO: a value model (the policy's transformer body with a scalar head) on its own DeepSpeed ranks.

V at position t is the value of the prefix ending at t, i.e. of the state before response token t+1 is chosen: the
same shifted positions as the policy's log-probabilities (learners/batch.py), so per-token arrays line up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from learners.batch import TrainBatch, collate, response_rows
from learners.learner import DeepSpeedRank

if TYPE_CHECKING:  # the config's section is passed in; learners/ does not import actors/
    from actors.config import LearnerConfig


def _value_model_class():
    import torch
    from transformers import AutoModel

    class ValueModel(torch.nn.Module):
        """Transformer body of ``model_path`` + a linear head to one value per position, initialised to zero so
        that the critic starts by predicting 0 everywhere instead of noise."""

        def __init__(self, model_path: str, dtype, attn_implementation: str):
            super().__init__()
            self.body = AutoModel.from_pretrained(model_path, dtype=dtype, attn_implementation=attn_implementation)
            self.head = torch.nn.Linear(self.body.config.hidden_size, 1, dtype=dtype)
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

        def forward(self, input_ids, attention_mask):
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
            return self.head(hidden).squeeze(-1).float()  # [B, L]

    return ValueModel


class CriticActor(DeepSpeedRank):
    def __init__(self, model_path: str, cfg: LearnerConfig, *, value_clip: float | None, dtype: str, seed: int,
                 rank: int, world_size: int):
        super().__init__(model_path, cfg, dtype=dtype, seed=seed, rank=rank, world_size=world_size)
        self.value_clip = value_clip

    def setup(self, master_addr: str, master_port: int) -> None:
        self._join(master_addr, master_port)
        from learners.reference import attention

        self._initialize(_value_model_class()(self.model_path, getattr(self.torch, self.dtype),
                                              attention(self.cfg.attention, self.device)))

    def _values(self, t):
        from learners.reference import autocast

        with autocast(self.device, self.cfg.autocast):
            return self.engine(input_ids=t.input_ids, attention_mask=t.attention_mask)[:, :-1]  # [B, L-1]

    def values(self, batch: TrainBatch) -> list[list[float]]:
        """V of the state before each response token, under the current critic: [B][L_i - P_i]."""
        self.engine.eval()
        with self.torch.no_grad():
            v = self._values(collate(batch, self.pad_id, self.device))
        return response_rows(v, batch)

    def train_step(self, micro_batches: list[TrainBatch], *, n_tokens: int) -> dict[str, float]:
        """One optimiser step on the clipped value loss (token mean over the mini-batch's ``n_tokens``)."""
        from learners.losses import value_loss

        def loss_fn(t):
            return value_loss(self._values(t), t.old_values, t.returns, t.mask, clip_eps=self.value_clip,
                              n_tokens=n_tokens)

        return self._step(micro_batches, loss_fn)
