"""learners/batch.py: collation to shifted positions and the token counts that normalise the loss."""

from __future__ import annotations

import math

import pytest
import torch

from learners.batch import TrainBatch, collate, split_for_ranks
from learners.losses import token_logprobs

ATOL_F32 = 1e-6  # float32 results

PAD = 0


def _batch() -> TrainBatch:
    # row 0: prompt [11, 12] (P = 2) + response [13, 14, 15] -> L = 5, logprob positions P-1..L-2 = 1..3
    # row 1: prompt [21, 22, 23] (P = 3) + response [24]    -> L = 4, position 2
    # row 2: expert, prompt [31] (P = 1) + response [32, 33] -> L = 3, positions 0..1
    return TrainBatch(
        input_ids=[[11, 12, 13, 14, 15], [21, 22, 23, 24], [31, 32, 33]],
        prompt_lens=[2, 3, 1],
        old_logprobs=[[-0.1, -0.2, -0.3], [-0.4], [0.0, 0.0]],
        advantages=[[1.5, 1.5, 1.5], [-0.5], [0.0, 0.0]],
        is_expert=[False, False, True],
        ref_logprobs=[[-0.7, -0.8, -0.9], [-1.0], [0.0, 0.0]],
    )


def test_collate_shifted_positions():
    t = collate(_batch(), PAD)
    assert t.input_ids.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 24, PAD], [31, 32, 33, PAD, PAD]]
    assert t.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert t.targets.tolist() == [[12, 13, 14, 15], [22, 23, 24, PAD], [32, 33, PAD, PAD]]
    # mask[b, t] = 1 where targets[b, t] (the token predicted at t) is a response token
    assert t.mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0]]
    assert t.targets[t.mask.bool()].tolist() == [13, 14, 15, 24, 32, 33]  # exactly the response tokens, in order
    torch.testing.assert_close(t.old_logprobs, torch.tensor(
        [[0.0, -0.1, -0.2, -0.3], [0.0, 0.0, -0.4, 0.0], [0.0, 0.0, 0.0, 0.0]]), atol=0, rtol=0)
    assert t.advantages.tolist() == [[0, 1.5, 1.5, 1.5], [0, 0, -0.5, 0], [0, 0, 0, 0]]
    assert t.advantages.dtype == torch.float32
    torch.testing.assert_close(t.ref_logprobs, torch.tensor(
        [[0.0, -0.7, -0.8, -0.9], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), atol=0, rtol=0)
    assert t.old_values is None and t.returns is None  # absent fields stay absent
    assert t.is_expert.tolist() == [False, False, True] and t.is_expert.dtype == torch.bool


def test_token_counts_match_collated_mask():
    b = _batch()
    # on-policy: 3 + 1 = 4 response tokens; expert: 2
    assert b.token_counts() == (4, 2)
    t = collate(b, PAD)
    assert t.mask[~t.is_expert].sum() == 4 and t.mask[t.is_expert].sum() == 2


def test_select_and_token_counts_of_a_shard():
    shard = _batch().select([2, 0])
    assert shard.prompt_lens == [1, 2] and shard.is_expert == [True, False]
    assert shard.token_counts() == (3, 2)
    assert shard.ref_logprobs == [[0.0, 0.0], [-0.7, -0.8, -0.9]] and shard.returns is None
    assert len(shard) == 2


def test_counts_give_the_global_normalisers():
    # RL rows 0 and 1 (3 + 1 tokens), expert row 2 (2 tokens), plus an RL row without response tokens (not a sequence)
    b = _batch()
    b = TrainBatch(b.input_ids + [[5, 6]], b.prompt_lens + [2], b.old_logprobs + [[]], b.advantages + [[]],
                   b.is_expert + [False], ref_logprobs=b.ref_logprobs + [[]])
    assert b.counts() == {"n_rl_tokens": 4, "n_rl_seqs": 2, "n_sft_tokens": 2}


def test_filler_carries_the_batch_optional_fields_and_no_tokens():
    f = _batch().filler()
    assert f.ref_logprobs == [[]] and f.old_values is None and f.token_counts() == (0, 0)
    t = collate(f, PAD)
    assert t.mask.sum() == 0 and t.ref_logprobs is not None


def test_collated_logprobs_pick_the_response_tokens():
    # A "model" whose logits at every position put log-probability log(1/2) on token (position + 12) and spread the
    # rest uniformly over the other 39 tokens: token_logprobs at the masked positions of row 0 (targets 13, 14, 15
    # at positions 1..3) must all be log 0.5 = -0.6931472; with a one-off shift they would be log(0.5 / 39).
    V, L = 40, 5
    t = collate(_batch(), PAD)
    logits = torch.full((3, L, V), math.log(0.5 / (V - 1)))
    for pos in range(L):
        logits[:, pos, pos + 12] = math.log(0.5)
    lp = token_logprobs(logits[:, :-1], t.targets)  # [B, L-1], as the learner does
    torch.testing.assert_close(lp[0][t.mask[0].bool()], torch.full((3,), math.log(0.5)), atol=ATOL_F32, rtol=0)


def test_collate_empty_response():
    # a completion with no tokens contributes no mask position and no count
    b = TrainBatch([[1, 2], [3, 4, 5]], [2, 2], [[], [-0.5]], [[], [1.0]], [False, False])
    t = collate(b, PAD)
    assert t.mask.tolist() == [[0, 0], [0, 1]]
    assert b.token_counts() == (1, 0)


@pytest.mark.parametrize("rows, world, micro", [(5, 2, 1), (13, 2, 2), (80, 3, 2), (1, 3, 4), (128, 2, 16)])
def test_split_for_ranks_gives_every_rank_the_same_number_of_non_empty_micro_batches(rows, world, micro):
    batch = TrainBatch(
        input_ids=[[1, 2, 3 + i] for i in range(rows)], prompt_lens=[2] * rows, old_logprobs=[[-0.5]] * rows,
        advantages=[[float(i)] for i in range(rows)], is_expert=[i % 3 == 0 for i in range(rows)],
    )
    shards = split_for_ranks(batch, world, micro)
    assert len(shards) == world
    counts = {len(micros) for micros in shards}
    assert len(counts) == 1  # the same number of forward/backward passes on every rank
    num_micro = counts.pop()
    assert num_micro == max(1, -(-(-(-rows // world)) // micro))  # ceil(ceil(rows / world) / micro)
    real = [ids for micros in shards for m in micros for ids, p in zip(m.input_ids, m.prompt_lens) if len(ids) > p]
    assert sorted(real) == sorted(batch.input_ids)  # every row exactly once
    for micros in shards:
        for m in micros:
            assert 1 <= len(m) <= micro
            assert sum(batch.token_counts()) >= sum(m.token_counts())
    # filler rows carry no response tokens, so the global token counts are unchanged
    assert sum(sum(m.token_counts()[i] for micros in shards for m in micros) for i in (0, 1)) == \
        sum(batch.token_counts())
