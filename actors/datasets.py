"""A run's data: the prompt, expert and held-out sets named by ``data``, generated first where the config says so
(``data.synthetic``, ``data.tasks``), read and checked (``rollout/data.py``), and turned into token ids, conversations
through the chat template (``rollout/chat.py``). Used by training and ``chorus eval``."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from actors.config import DataConfig
from actors.evaluation import TARGET
from rollout.chat import ChatRenderer, TemplateError, conversation
from rollout.data import DataError, load_rows, make_synthetic, write_jsonl
from rollout.tasks import as_chat, make_task_sets

log = logging.getLogger("chorus")


@dataclass
class RunData:
    prompts: list[dict]
    expert: list[dict]  # empty without an expert set
    eval_sets: dict[str, list[dict]]  # "target" (data.eval) first, then each retention set
    skipped: dict[str, list[str]] = field(default_factory=dict)  # data set -> why each row left out was bad
    paths: dict[str, str] = field(default_factory=dict)  # "prompts", "expert", "eval", "retention/<name>" -> file


@dataclass
class Tokens:
    """The token ids of a run's rows (:func:`tokenize`)."""

    prompts: list[list[int]]  # each prompt row's: what the model continues
    expert: list[tuple[list[int], list[int], list[int] | None]]  # (prompt, response, loss mask or None: all trained)
    eval_sets: dict[str, list[list[int]]]
    renderer: ChatRenderer  # what rendered them: multi-turn episodes render their observations with it


def tokenize(data: RunData, tokenizer, *, chat_template: str = "", model: str = "") -> Tokens:
    """Token ids of every row. A conversation row is rendered with the chat template (``chat_template``: a Jinja
    file's path, "" = the tokenizer's) and its ``prompt`` becomes the rendered text the model continues, which is
    what rewards get as the prompt; its messages stay in ``messages``. A row the template cannot render stops the
    run naming its set and row."""
    template = Path(chat_template).read_text(encoding="utf-8") if chat_template else ""
    renderer = ChatRenderer(tokenizer, template, model=model)

    def each(rows: list[dict], name: str, fn) -> list:
        out = []
        for i, row in enumerate(rows):
            try:
                out.append(fn(row))
            except TemplateError as exc:
                raise DataError(f"{data.paths.get(name, name)}: row {i + 1}: {exc}") from None
        return out

    def prompt(row: dict) -> list[int]:
        messages = conversation(row)
        text, ids = renderer.prompt(row)
        if messages is not None:
            row["messages"], row["prompt"] = messages, text
        return ids

    return Tokens(prompts=each(data.prompts, "prompts", prompt), expert=each(data.expert, "expert", renderer.expert),
                  eval_sets={name: each(rows, "eval" if name == TARGET else f"retention/{name}", prompt)
                             for name, rows in data.eval_sets.items()}, renderer=renderer)


def generate(cfg: DataConfig, data_dir: Path, *, only_eval: bool = False) -> dict[str, str]:
    """Write the generated sets into ``data_dir``; returns every set's path: "prompts", "expert", "eval" (of the
    target) and "retention/<name>" (the expert path is "" when there is no expert set). ``only_eval``: the
    held-out sets only (``chorus eval``), which do not depend on the training rows."""
    paths = {"prompts": cfg.prompts, "expert": cfg.expert, "eval": cfg.eval,
             **{f"retention/{name}": path for name, path in cfg.retention.items()}}
    if cfg.synthetic is not None:
        generated = make_synthetic(**asdict(cfg.synthetic))
    elif cfg.tasks is not None:
        t = cfg.tasks
        train = (0, 0) if only_eval else (t.num_prompts, t.num_expert)
        sets = make_task_sets(dict(t.mixture), list(t.eval), seed=t.seed, num_prompts=train[0], num_expert=train[1],
                              num_eval=t.num_eval)
        if t.chat:
            sets = as_chat(sets, t.tool)
        target, *retention = t.eval
        generated = {"prompts": sets["prompts"], "expert": sets["expert"], "eval": sets[f"eval/{target}"],
                     **{f"retention/{f}": sets[f"eval/{f}"] for f in retention}}
    else:
        return paths
    for kind, rows in generated.items():
        if not rows:  # num_expert 0: pure RL, no expert set
            continue
        paths[kind] = str(data_dir / f"{kind.replace('/', '-')}.jsonl")
        write_jsonl(Path(paths[kind]), rows)
    return paths


def load(cfg: DataConfig, data_dir: Path, *, eval_max_rows: int = 0, only_eval: bool = False) -> RunData:
    """Generate (into ``data_dir``) and read the run's sets. A bad row stops here naming file and line, or with
    ``data.on_bad_row: skip`` is left out, logged and listed in ``skipped``."""
    paths = generate(cfg, data_dir, only_eval=only_eval)
    skipped: dict[str, list[str]] = {}

    def read(name: str, kind: str) -> list[dict]:
        bad = [] if cfg.on_bad_row == "skip" else None  # None: the first bad row raises DataError
        rows = load_rows(paths[name], kind, bad)
        if bad:
            skipped[name] = bad
            log.warning("data.on_bad_row = skip: %d bad rows left out of %s: %s", len(bad), paths[name],
                        "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
        return rows[:eval_max_rows] if kind == "eval" and eval_max_rows else rows

    eval_sets = {TARGET: read("eval", "eval")}
    for name in paths:
        if name.startswith("retention/"):
            eval_sets[name.removeprefix("retention/")] = read(name, "eval")
    if only_eval:
        return RunData([], [], eval_sets, skipped, paths)
    prompts = read("prompts", "prompts")
    expert = read("expert", "expert") if paths["expert"] else []
    return RunData(prompts, expert, eval_sets, skipped, paths)
