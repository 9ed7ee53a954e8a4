"""A user's own reward module, referenced from configs as ``tests.integration.user_rewards:position_match``."""


def position_match(prompts, responses, answer, **_):
    """Share of the answer's positions the response gets right: dense partial credit, so even an untrained
    model's samples differ in reward and GRPO advantages are not all zero."""
    return [sum(a == b for a, b in zip(r.strip(), ans)) / len(ans) for r, ans in zip(responses, answer)]
