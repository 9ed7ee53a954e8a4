"""Data sets: JSONL, Parquet or Hugging Face ``datasets`` rows with documented fields, a shuffling cursor, and the
synthetic from-scratch tasks.

Fields (the chat forms, ``messages`` or lists of messages in ``prompt`` / ``completion``: ``rollout/chat.py``):
- prompt set and held-out set: ``prompt`` (str, the exact text the model continues, or a conversation), ``answer``
  (str, the reference the reward compares with); any other field is kept and passed to reward functions as metadata.
- expert set: ``prompt`` (str) and ``response`` (str, the demonstration the SFT term imitates), or a conversation.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from rollout.chat import check_row


class DataError(ValueError):
    """A data file that cannot be used: the message names the file and the line (row)."""


def load_rows(path: str | Path, kind: str, skipped: list[str] | None = None) -> list[dict]:
    """Read a JSONL or Parquet file, or a directory written by ``datasets``' ``save_to_disk``, of ``kind`` (prompts |
    expert | eval | responses) and check each row's fields (:func:`rollout.chat.check_row`). A bad row raises
    :class:`DataError` naming the file and line (row) and saying what is wrong; or, when a ``skipped`` list is given,
    it is left out and its message appended there (``data.on_bad_row: skip``). A file that cannot be read at all, or
    has no good row, raises."""
    path = Path(path)
    if not path.is_file() and not (path.is_dir() and _is_hf_dataset(path)):
        what = "is a directory that no `datasets` save_to_disk wrote" if path.is_dir() else "not found"
        raise DataError(f"{path}: {kind} data file {what}")

    def bad(message: str) -> None:
        if skipped is None:
            raise DataError(message)
        skipped.append(message)

    try:
        if path.is_dir():
            rows, where = _read_hf_dataset(path)
        else:
            rows, where = _read_parquet(path) if path.suffix == ".parquet" else _read_jsonl(path, bad)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {kind} data file ({exc.strerror or exc})") from None
    good = []
    for row, loc in zip(rows, where):
        if not isinstance(row, dict):
            bad(f"{loc}: a row must be a JSON object, got {type(row).__name__}")
        elif error := check_row(row, kind):
            bad(f"{loc}: {error}")
        else:
            good.append(row)
    if not good:
        raise DataError(f"{path}: no rows" + (f" ({len(skipped)} bad ones skipped)" if skipped else ""))
    return good


def _is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_hf_dataset(path: Path) -> tuple[list, list[str]]:
    """The rows of a ``Dataset`` saved with ``save_to_disk``; a ``DatasetDict`` of one split is that split."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as exc:
        raise DataError(f"{path}: not a readable `datasets` directory ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise DataError(f"{path}: a DatasetDict of splits {', '.join(data)}: name one, e.g. "
                            f"{path / next(iter(data))}")
        path, data = path / next(iter(data)), next(iter(data.values()))
    rows = data.to_list()
    return rows, [f"{path}: row {i + 1}" for i in range(len(rows))]


# A JSON string escape of a UTF-16 surrogate: a lone one (not text, unencodable as UTF-8) fails far from here, in
# msgpack or a tokenizer, unless it is caught on its line.
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _read_jsonl(path: Path, bad) -> tuple[list, list[str]]:
    rows, where = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            loc = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad(f"{loc}: not valid UTF-8 (byte {exc.start + 1} of the line, {raw[exc.start]:#04x})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if _SURROGATE.search(line):
                    json.dumps(row, ensure_ascii=False).encode("utf-8")
            except json.JSONDecodeError as exc:
                bad(f"{loc}: not valid JSON ({exc.msg})")
            except RecursionError:
                bad(f"{loc}: JSON nested too deeply to read")
            except UnicodeEncodeError:
                bad(f"{loc}: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")
            except ValueError as exc:  # e.g. an integer of more than 4300 digits
                bad(f"{loc}: not valid JSON ({exc})")
            else:
                rows.append(row)
                where.append(loc)
    return rows, where


def _read_parquet(path: Path) -> tuple[list, list[str]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, ValueError, OSError) as exc:  # not Parquet, cut short, a corrupt page
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from None
    return rows, [f"{path}: row {i + 1}" for i in range(len(rows))]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@dataclass
class Cursor:
    """Walks a data set in a fresh seeded permutation each epoch; its fields are what a checkpoint saves."""

    size: int
    seed: int
    epoch: int = 0
    pos: int = 0

    def __post_init__(self) -> None:
        self._order: tuple[int, list[int]] | None = None  # (epoch, its permutation): made once per epoch, since
        #                                                    shuffling a 300k-row set each step took 0.2 s

    def _permutation(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            order = list(range(self.size))
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._order = (self.epoch, order)
        return self._order[1]

    def state(self) -> dict[str, int]:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = self._permutation()
            take = min(k - len(out), self.size - self.pos)
            out.extend(order[self.pos : self.pos + take])
            self.pos += take
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
        return out


# --- synthetic tasks, from scratch -----------------------------------------------------------------------------
# A prompt is "<string>=" and the answer the string reversed (or sorted): short, verifiable, and learnable by a
# 1.4M-parameter model in minutes on a CPU. The tokenizer is character level, so one character is one token.
# A task maps the string to its row fields: ``answer`` (the expert's response and the held-out reference) and any
# metadata its reward reads, which prompt and held-out rows carry (e.g. ``schema`` for the json_schema reward).

JSON_SCHEMA = {  # the json task's answer: the string reversed ("r") and its length ("n"), nothing else
    "type": "object",
    "properties": {"r": {"type": "string"}, "n": {"type": "integer", "minimum": 0}},
    "required": ["r", "n"],
    "additionalProperties": False,
}


def _json_task(s: str) -> dict:
    # compact separators: the answer is the exact text the expert writes, and the shorter the faster it is learnt
    return {"answer": json.dumps({"r": s[::-1], "n": len(s)}, separators=(",", ":")), "schema": JSON_SCHEMA}


TASKS = {  # string -> row fields
    "reverse": lambda s: {"answer": s[::-1]},
    "sort": lambda s: {"answer": "".join(sorted(s))},
    "json": _json_task,  # "cab=" -> {"r":"bac","n":3}, scored by json_schema against the row's schema
}


def distinct_strings(alphabet: str, min_len: int, max_len: int, enough: int) -> int:
    """Distinct strings of ``min_len``..``max_len`` characters over ``alphabet``, counted up to ``enough``. The
    held-out strings are drawn at random and may take at most a quarter of them (``enough`` = 4 x held-out rows), so
    that the training strings drawn around them stay plentiful."""
    total = 0
    for n in range(min_len, max_len + 1):
        total += len(set(alphabet)) ** n
        if total >= enough:
            break
    return total


def make_synthetic(task: str, seed: int, alphabet: str, min_len: int, max_len: int,
                   num_prompts: int, num_expert: int, num_eval: int) -> dict[str, list[dict]]:
    """Deterministic prompt / expert / eval rows; held-out strings never appear in the other two sets."""
    fields = TASKS[task]
    rng = random.Random(seed)
    universe = distinct_strings(alphabet, min_len, max_len, 4 * num_eval)  # actors/config.py checks it first
    if num_eval * 4 > universe:
        raise ValueError(f"only {universe} distinct strings: too few for {num_eval} held-out rows")
    held: set[str] = set()
    while len(held) < num_eval:
        held.add("".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len))))

    def fresh() -> str:
        while True:
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))
            if s not in held:
                return s

    prompts = [{"prompt": f"{s}=", **fields(s)} for s in (fresh() for _ in range(num_prompts))]
    expert = [{"prompt": f"{s}=", "response": fields(s)["answer"]} for s in (fresh() for _ in range(num_expert))]
    evals = [{"prompt": f"{s}=", **fields(s)} for s in sorted(held)]
    return {"prompts": prompts, "expert": expert, "eval": evals}
