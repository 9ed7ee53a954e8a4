"""A reward to copy: rename the file, keep the shape you need, delete the others.

Try it:   chorus reward score reward_template:keyword_hits rows.jsonl --args '{"keywords": ["paris"]}'
Train:    reward: {functions: [{name: "reward_template:keyword_hits", weight: 1.0, args: {keywords: [paris]}}]}
(run from this file's folder, or put the folder on PYTHONPATH)
"""

from rewards.registry import per_sample


# 1. One sample at a time: the row's fields arrive by name. An exception fails this sample only (fallback score).
@per_sample
def right_answer(prompt: str, response: str, answer: str) -> float | None:
    return float(response.strip().lower() == answer.strip().lower())


# 2. A batch at a time, with named components (each exported as chorus_reward_mean{component="<name>.<part>"}).
def keyword_hits(prompts: list[str], responses: list[str], *, keywords: list[str], **_) -> list[dict]:
    out = []
    for response in responses:
        hits = sum(k.lower() in response.lower() for k in keywords) / max(len(keywords), 1)
        short = float(len(response.split()) <= 50)
        out.append({"score": 0.8 * hits + 0.2 * short, "hits": hits, "short": short})
    return out


# 3. A class: built once per reward actor with the config's args, so load models in __init__.
class StartsWith:
    def __init__(self, prefix: str = "Answer:"):
        self.prefix = prefix

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list[float | None]:
        return [float(r.lstrip().startswith(self.prefix)) for r in responses]
