"""The training batch: the record the driver sends to each learner rank, and its collation into tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainBatch:
    """Rows of one step (or one rank's share of it). Row i is ``input_ids[i]`` = prompt + response tokens.

    For a row of prompt length P and total length L, the response tokens are positions P..L-1; the logits at
    position t predict token t+1, so the response's log-probabilities sit at shifted positions P-1..L-2.
    """

    input_ids: list[list[int]]  # [B][L_i] prompt + response tokens, unpadded
    prompt_lens: list[int]  # [B] P_i
    old_logprobs: list[list[float]]  # [B][L_i - P_i] behaviour logprobs of the response (zeros for expert rows)
    advantages: list[float]  # [B] one advantage per sequence (0 for expert rows)
    is_expert: list[bool]  # [B] True: an expert demonstration (SFT term); False: on-policy (RL term)

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, rows: list[int]) -> "TrainBatch":
        return TrainBatch(
            [self.input_ids[i] for i in rows], [self.prompt_lens[i] for i in rows],
            [self.old_logprobs[i] for i in rows], [self.advantages[i] for i in rows],
            [self.is_expert[i] for i in rows],
        )

    def token_counts(self) -> tuple[int, int]:
        """(on-policy response tokens, expert response tokens): the normalisers of the two loss terms."""
        rl = sum(len(x) - p for x, p, e in zip(self.input_ids, self.prompt_lens, self.is_expert) if not e)
        sft = sum(len(x) - p for x, p, e in zip(self.input_ids, self.prompt_lens, self.is_expert) if e)
        return rl, sft


# A row with no response tokens: it adds nothing to the loss or the gradient, and fills a micro-batch that would
# otherwise be empty so that every rank runs the same number of forward/backward passes (ZeRO's gradient
# reduction is collective: a rank with one pass fewer would leave the others waiting forever).
_FILLER = TrainBatch(input_ids=[[0, 0]], prompt_lens=[2], old_logprobs=[[]], advantages=[0.0], is_expert=[False])


def split_for_ranks(batch: TrainBatch, world_size: int, micro_batch_size: int) -> list[list[TrainBatch]]:
    """Deal rows round-robin to ``world_size`` ranks (each gets a similar mix of RL and expert rows), then cut each
    rank's rows into the same number of micro-batches of at most ``micro_batch_size`` rows, none empty.

    Returns ``[rank][micro]``. Concatenating every micro-batch gives back every row of ``batch`` exactly once,
    plus filler rows without response tokens where a rank has fewer rows than micro-batches.
    """
    per_rank = [list(range(r, len(batch), world_size)) for r in range(world_size)]
    num_micro = max(1, -(-max(map(len, per_rank)) // micro_batch_size))
    return [[batch.select(rows) if rows else _FILLER for rows in even_split(rank_rows, num_micro)]
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
    mask: torch.Tensor  # [B, L-1] 1.0 where targets[b, t] is a response token
    old_logprobs: torch.Tensor  # [B, L-1] behaviour logprobs at the response positions, 0 elsewhere
    advantages: torch.Tensor  # [B]
    is_expert: torch.Tensor  # [B] bool


def collate(batch: TrainBatch, pad_id: int, device: str | torch.device = "cpu") -> Tensors:
    B, L = len(batch), max(map(len, batch.input_ids))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1))
    old = torch.zeros((B, L - 1))
    for i, (ids, p, lp) in enumerate(zip(batch.input_ids, batch.prompt_lens, batch.old_logprobs)):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        attention[i, :n] = 1
        mask[i, p - 1 : n - 1] = 1.0
        old[i, p - 1 : n - 1] = torch.tensor(lp, dtype=torch.float32)
    return Tensors(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), targets=input_ids[:, 1:].to(device),
        mask=mask.to(device), old_logprobs=old.to(device),
        advantages=torch.tensor(batch.advantages, dtype=torch.float32, device=device),
        is_expert=torch.tensor(batch.is_expert, dtype=torch.bool, device=device),
    )
