"""learners/sampling.py: the sampling distribution's log-probabilities by hand (arithmetic in the comments), the
identity at temperature 1 and top_p 1, the gradient mask, a naive loop, and transformers' own top-p warper."""

from __future__ import annotations

import math

import pytest
import torch

from learners.losses import token_logprobs
from learners.sampling import nucleus_mask, sampling_logprobs

ATOL = 1e-6  # float32 results against hand arithmetic written to 7 decimals

# One position, V = 4. At temperature 0.5 the scaled logits z = logits / 0.5 = log([6, 3, 2, 1]) + 2, so
# softmax(z) = [6, 3, 2, 1] / 12 = [0.5, 0.25, 0.1666667, 0.0833333] (the + 2 shift changes nothing).
LOGITS = 0.5 * torch.log(torch.tensor([6.0, 3.0, 2.0, 1.0])) + 1.0  # [V=4]


def one_position(tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """LOGITS at every position of one row: [1, T, 4] logits, [1, T] tokens."""
    return LOGITS.expand(len(tokens), 4).unsqueeze(0).clone(), torch.tensor([tokens])


def test_temperature_and_top_p_by_hand():
    # top_p = 0.8. Descending: 6/12 = 0.5 < 0.8, then 9/12 = 0.75 < 0.8, then the "2" token brings the running mass
    # to 11/12 = 0.9166667 >= 0.8: it is the boundary token and is KEPT (mass strictly above it, 0.75, is < 0.8).
    # The "1" token (mass above it 11/12 >= 0.8) is removed. (Engines' form: ascending cumsum
    # [1, 3, 6, 12] / 12 = [0.083, 0.25, 0.5, 1]; removed where <= 1 - 0.8 = 0.2: only the first.)
    # Nucleus {6, 3, 2}, renormalised over 11: log(6/11) = -0.6061358, log(3/11) = -1.2992830,
    # log(2/11) = -1.7047481. The removed token, asked about, counts as kept (renormalised over {6, 3, 2, 1}):
    # log(1/12) = -2.4849066, not -inf.
    logits, tokens = one_position([0, 1, 2, 3])
    lp = sampling_logprobs(logits, tokens, temperature=0.5, top_p=0.8)
    assert lp.shape == (1, 4) and lp.dtype == torch.float32
    expected = torch.tensor([[-0.6061358, -1.2992830, -1.7047481, -2.4849066]])
    torch.testing.assert_close(lp, expected, atol=ATOL, rtol=0)


def test_temperature_alone_by_hand():
    # top_p = 1: no truncation, softmax(z) = [6, 3, 2, 1] / 12: log 0.5 = -0.6931472, log(1/12) = -2.4849066.
    logits, tokens = one_position([0, 3])
    lp = sampling_logprobs(logits, tokens, temperature=0.5, top_p=1.0)
    torch.testing.assert_close(lp, torch.tensor([[-0.6931472, -2.4849066]]), atol=ATOL, rtol=0)


def test_a_nucleus_mass_exactly_top_p_drops_the_next_token():
    # logits log([1, 1, 2]) at T = 1: probs [0.25, 0.25, 0.5]. top_p = 0.5: the top token's mass is 0.5 >= 0.5, so
    # it alone is the nucleus (the next token's mass above is exactly top_p, not < top_p): log 1 = 0. Each other
    # token, asked about, joins it: log(0.25 / 0.75) = -1.0986123.
    logits = torch.log(torch.tensor([[[1.0, 1.0, 2.0]]]))
    lp = sampling_logprobs(logits.expand(1, 3, 3), torch.tensor([[2, 0, 1]]), temperature=1.0, top_p=0.5)
    torch.testing.assert_close(lp, torch.tensor([[0.0, -1.0986123, -1.0986123]]), atol=ATOL, rtol=0)
    assert nucleus_mask(logits[0, 0], 0.5).tolist() == [True, True, False]


def test_temperature_1_top_p_1_is_token_logprobs_exactly():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 17) * 3
    tokens = torch.randint(0, 17, (3, 5))
    assert torch.equal(sampling_logprobs(logits, tokens, temperature=1.0, top_p=1.0), token_logprobs(logits, tokens))
    bf16 = logits.bfloat16()  # upcast first, as token_logprobs does
    assert torch.equal(sampling_logprobs(bf16, tokens, temperature=1.0, top_p=1.0), token_logprobs(bf16, tokens))


def test_gradient_flows_through_the_nucleus_only():
    # d log pi(a) / d logit_j = (1[j = a] - pi_j) / T for j in the nucleus, 0 outside it. With a = token 0,
    # pi = [6, 3, 2] / 11 and 1 / T = 2: [2 * 5/11, -2 * 3/11, -2 * 2/11, 0] = [0.9090909, -0.5454545, -0.3636364, 0].
    logits, tokens = one_position([0])
    logits.requires_grad_(True)
    sampling_logprobs(logits, tokens, temperature=0.5, top_p=0.8).sum().backward()
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor([0.9090909, -0.5454545, -0.3636364, 0.0]),
                               atol=ATOL, rtol=0)
    assert logits.grad[0, 0, 3] == 0.0  # exactly zero: the removed logit is masked, not merely small
    # asked about the removed token 3, the set is {6, 3, 2, 1} / 12: 2 * (1[j = 3] - pi_j) =
    # [-2 * 0.5, -2 * 0.25, -2 / 6, 2 * 11/12] = [-1, -0.5, -0.3333333, 1.8333333]: finite, not a NaN from -inf
    logits, tokens = one_position([3])
    logits.requires_grad_(True)
    sampling_logprobs(logits, tokens, temperature=0.5, top_p=0.8).sum().backward()
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor([-1.0, -0.5, -1 / 3, 11 / 6]), atol=ATOL, rtol=0)


def naive_sampling_logprob(logits: list[float], token: int, temperature: float, top_p: float) -> float:
    """One position, plain Python: descending order, keep a token while the mass strictly above it is < top_p."""
    z = [x / temperature for x in logits]
    top = max(z)
    weights = [math.exp(x - top) for x in z]
    total = sum(weights)
    kept, above = set(), 0.0
    for j in sorted(range(len(z)), key=lambda j: -z[j]):
        if above >= top_p:
            break
        kept.add(j)
        above += weights[j] / total
    kept.add(token)  # the token asked about always counts as kept
    return z[token] - top - math.log(sum(weights[j] for j in kept))


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (0.7, 0.9), (1.3, 0.5), (1.0, 0.95)])
def test_matches_a_naive_loop(temperature, top_p):
    torch.manual_seed(1)
    B, T, V = 3, 6, 13
    logits = torch.randn(B, T, V) * 2
    probs = torch.softmax(logits / temperature, -1)
    # sample from the sampling distribution itself (as the engines do) so that most tokens are inside the nucleus,
    # plus some uniformly random ones, some of which fall outside it
    tokens = torch.where(torch.rand(B, T) < 0.7, torch.multinomial(probs.view(-1, V), 1).view(B, T),
                         torch.randint(0, V, (B, T)))
    lp = sampling_logprobs(logits, tokens, temperature=temperature, top_p=top_p)
    assert torch.isfinite(lp).all()
    for b in range(B):
        for t in range(T):
            expected = naive_sampling_logprob(logits[b, t].tolist(), int(tokens[b, t]), temperature, top_p)
            assert abs(float(lp[b, t]) - expected) <= ATOL, (b, t, float(lp[b, t]), expected)
    if top_p < 1:  # both sides of the boundary were exercised
        outside = nucleus_mask(logits / temperature, top_p).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        assert outside.any() and (~outside).any()


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.9, 0.95, 0.99])
def test_nucleus_is_transformers_top_p_warper(top_p):
    """The same tokens as transformers' TopPLogitsWarper (what HFBackend samples with) on random logits; vLLM's is
    checked in tests/integration/test_sampling_logprobs.py, where vLLM is imported anyway."""
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(2)
    z = torch.randn(64, 100) * 2  # [N, V]
    warped = TopPLogitsWarper(top_p)(None, z.clone())
    assert torch.equal(nucleus_mask(z, top_p), warped == -math.inf)


def test_rejects_greedy_and_bad_top_p():
    logits, tokens = one_position([0])
    with pytest.raises(ValueError, match="temperature"):
        sampling_logprobs(logits, tokens, temperature=0.0, top_p=1.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling_logprobs(logits, tokens, temperature=1.0, top_p=0.0)


def test_a_mask_limits_the_nucleus_to_the_positions_asked_about():
    """Same values and gradients where the mask is 1; elsewhere the tempered log-probability without the nucleus."""
    torch.manual_seed(3)
    logits = (torch.randn(3, 5, 11) * 2).requires_grad_(True)
    tokens = torch.randint(0, 11, (3, 5))
    mask = (torch.rand(3, 5) > 0.4).float()
    full = sampling_logprobs(logits, tokens, temperature=0.7, top_p=0.8)
    part = sampling_logprobs(logits, tokens, temperature=0.7, top_p=0.8, mask=mask)
    keep = mask > 0
    assert keep.any() and (~keep).any()
    assert torch.equal(part[keep], full[keep])
    plain = torch.gather((logits / 0.7).log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(part[~keep], plain[~keep], atol=ATOL, rtol=0)
    (g_full,) = torch.autograd.grad((full * mask).sum(), logits)
    (g_part,) = torch.autograd.grad((part * mask).sum(), logits)
    torch.testing.assert_close(g_part, g_full, atol=ATOL, rtol=0)
