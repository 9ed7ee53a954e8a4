"""A user's own reward module, referenced from configs as ``tests.integration.user_rewards:position_match``."""


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
