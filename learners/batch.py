"""The training batch: the record the driver sends to each learner rank, and its collation into tensors."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


OPTIONAL = ("ref_logprobs", "old_values", "returns", "behaviour_logprobs")  # the per-token fields that may be None


@dataclass
class TrainBatch:
    """Rows of one step (or one rank's share of it). Row i is ``input_ids[i]`` = prompt + response tokens.

    For a row of prompt length P and total length L, the response tokens are positions P..L-1; the logits at
    position t predict token t+1, so the response's log-probabilities sit at shifted positions P-1..L-2.
    """

    input_ids: list[list[int]]  # [B][L_i] prompt + response tokens, unpadded
    prompt_lens: list[int]  # [B] P_i
    old_logprobs: list[list[float]]  # [B][L_i - P_i] the PPO ratio's denominator: the engine's logprobs, or the
    #                                  learner's recomputed ones (algo.recompute_logprobs); zeros for expert rows
    advantages: list[list[float]]  # [B][L_i - P_i] per response token (GRPO: the sequence's, repeated; 0: expert)
    is_expert: list[bool]  # [B] True: an expert demonstration (SFT term); False: on-policy (RL term)
    # Per response token, present only when the step uses them ([B][L_i - P_i] or None):
    ref_logprobs: list[list[float]] | None = None  # the frozen reference model's (KL penalty)
    old_values: list[list[float]] | None = None  # the critic's before this step (value clipping)
    returns: list[list[float]] | None = None  # the critic's targets (GAE)
    behaviour_logprobs: list[list[float]] | None = None  # the engine's, when old_logprobs are the learner's
    # 1 on the response tokens the loss covers, 0 on those it does not: an environment's observations inside a
    # multi-turn rollout, the user and tool turns of an expert conversation. None: every response token counts
    loss_mask: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, rows: list[int]) -> "TrainBatch":
        return TrainBatch(**{f.name: None if (v := getattr(self, f.name)) is None else [v[i] for i in rows]
                             for f in fields(self)})

    def filler(self) -> "TrainBatch":
        """A row with no response tokens and this batch's optional fields: it adds nothing to the loss or the
        gradient, and fills a micro-batch that would otherwise be empty so that every rank runs the same number of
        forward/backward passes (ZeRO's gradient reduction is collective: a rank with one pass fewer would leave the
        others waiting forever)."""
        return TrainBatch(input_ids=[[0, 0]], prompt_lens=[2], old_logprobs=[[]], advantages=[[]], is_expert=[False],
                          **{k: None if getattr(self, k) is None else [[]]
                             for k in (*OPTIONAL, "loss_mask")})

    def trained_tokens(self) -> list[int]:
        """[B] each row's response tokens that the loss covers."""
        if self.loss_mask is None:
            return [len(x) - p for x, p in zip(self.input_ids, self.prompt_lens)]
        return [sum(m) for m in self.loss_mask]

    def token_counts(self) -> tuple[int, int]:
        """(on-policy response tokens, expert response tokens) that the loss covers: the normalisers of the two
        loss terms."""
        tokens = self.trained_tokens()
        rl = sum(n for n, e in zip(tokens, self.is_expert) if not e)
        sft = sum(n for n, e in zip(tokens, self.is_expert) if e)
        return rl, sft

    def counts(self) -> dict[str, int]:
        """The global normalisers a learner rank needs: RL tokens, RL sequences with tokens, expert tokens."""
        rl, sft = self.token_counts()
        seqs = sum(1 for n, e in zip(self.trained_tokens(), self.is_expert) if not e and n > 0)
        return {"n_rl_tokens": rl, "n_rl_seqs": seqs, "n_sft_tokens": sft}


def split_for_ranks(batch: TrainBatch, world_size: int, micro_batch_size: int) -> list[list[TrainBatch]]:
    """Deal rows round-robin to ``world_size`` ranks (each gets a similar mix of RL and expert rows), then cut each
    rank's rows into the same number of micro-batches of at most ``micro_batch_size`` rows, none empty.

    Returns ``[rank][micro]``. Concatenating every micro-batch gives back every row of ``batch`` exactly once,
    plus filler rows without response tokens where a rank has fewer rows than micro-batches.
    """
    per_rank = [list(range(r, len(batch), world_size)) for r in range(world_size)]
    num_micro = max(1, -(-max(map(len, per_rank)) // micro_batch_size))
    return [[batch.select(rows) if rows else batch.filler() for rows in even_split(rank_rows, num_micro)]
            for rank_rows in per_rank]


def even_split(items: list, k: int) -> list[list]:
    """``k`` contiguous chunks whose sizes differ by at most one (empty ones when ``k > len(items)``)."""
    size, extra = divmod(len(items), k)
    bounds = [i * size + min(i, extra) for i in range(k + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(k)]


@dataclass
class Tensors:
    input_ids: torch.Tensor  # [B, L] right-padded with pad_id
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L-1] = input_ids[:, 1:]
    mask: torch.Tensor  # [B, L-1] 1.0 where targets[b, t] is a response token the loss covers (loss_mask)
    is_expert: torch.Tensor  # [B] bool
    # [B, L-1], each row's per-token values at its response positions and 0 elsewhere (None where the batch has none)
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    behaviour_logprobs: torch.Tensor | None = None


_PER_TOKEN = ("old_logprobs", "advantages", *OPTIONAL)


def collate(batch: TrainBatch, pad_id: int, device: str | torch.device = "cpu") -> Tensors:
    B, L = len(batch), max(map(len, batch.input_ids))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1))
    per_token = {k: torch.zeros((B, L - 1)) for k in _PER_TOKEN if getattr(batch, k) is not None}
    for i, (ids, p) in enumerate(zip(batch.input_ids, batch.prompt_lens)):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        attention[i, :n] = 1
        mask[i, p - 1 : n - 1] = 1.0 if batch.loss_mask is None else torch.tensor(batch.loss_mask[i],
                                                                                   dtype=torch.float32)
        for k, out in per_token.items():
            out[i, p - 1 : n - 1] = torch.tensor(getattr(batch, k)[i], dtype=torch.float32)
    return Tensors(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), targets=input_ids[:, 1:].to(device),
        mask=mask.to(device), is_expert=torch.tensor(batch.is_expert, dtype=torch.bool, device=device),
        **{k: v.to(device) for k, v in per_token.items()},
    )


def response_rows(x: torch.Tensor, batch: TrainBatch) -> list[list[float]]:
    """Each row's response positions of a collated [B, L-1] tensor (logprobs, values): [B][L_i - P_i]."""
    return [x[i, p - 1 : len(ids) - 1].tolist() for i, (ids, p) in enumerate(zip(batch.input_ids, batch.prompt_lens))]
