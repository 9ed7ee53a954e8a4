"""A user's own reward module, referenced from configs as ``tests.integration.user_rewards:position_match``."""

from rewards.registry import per_sample


def position_match(prompts, responses, answer, **_):
    """Share of the answer's positions the response gets right: dense partial credit, so even an untrained
    model's samples differ in reward and GRPO advantages are not all zero."""
    return [sum(a == b for a, b in zip(r.strip(), ans)) / len(ans) for r, ans in zip(responses, answer)]


def letters_from_prompt(prompts, responses, answer, **_):
    """Share of the response's characters that occur in the row's answer (the prompt's letters): a reward an RL
    learner raises within a few dozen steps from a random model, because it depends on the prompt but credits every
    character on its own."""
    out = []
    for r, ans in zip(responses, answer):
        r = r.strip()
        out.append(sum(ch in ans for ch in r) / len(r) if r else 0.0)
    return out


def flaky(prompt: str) -> bool:
    """The prompts :func:`flaky_parts` fails on: those starting with 'a' or 'b' (a third of them with alphabet
    abcdef)."""
    return prompt[0] in "ab"


@per_sample
def flaky_parts(prompt, response, answer):
    """A reward that fails by a known rule: it raises on prompts starting with 'a' and scores NaN on those starting
    with 'b'. Else the position-match score, beside a part that depends on the prompt alone (its length), so a test
    can compute that part's mean from the prompts the scheduler picked."""
    if prompt.startswith("a"):
        raise ValueError(f"flaky_parts fails on {prompt!r}")
    if prompt.startswith("b"):
        return {"score": float("nan"), "prompt_chars": float(len(prompt))}
    score = sum(a == b for a, b in zip(response.strip(), answer)) / len(answer)
    return {"score": score, "prompt_chars": float(len(prompt))}
