"""Conversations: the chat forms of data rows, checked, and rendered with the tokenizer's chat template into token ids
and a loss mask over the assistant turns.

The forms are the ones Hugging Face TRL's data sets use. A message is ``{"role": ROLE, "content": str, ...}`` with
ROLE one of system, user, assistant, tool (other keys are passed to the template as they are).

- prompt and held-out rows: ``prompt`` as a string (text, continued as it is), or ``prompt`` as a list of messages,
  or ``messages`` (the conversation so far; the template's generation prompt opens the model's turn);
- expert rows: ``prompt`` and ``response`` strings (text; ``completion`` is taken for ``response``), or
  ``messages`` (a whole conversation: every assistant turn is trained on, the other turns are context), or
  ``prompt`` and ``completion`` lists of messages.

The token ids of a conversation are those of its turns rendered one after another: turn i's tokens are what
rendering the first i + 1 messages adds to rendering the first i, so a template must render a conversation as the
concatenation of its turns (every common one does; one that rewrites earlier turns, as some "thinking" templates
drop their reasoning, is refused by name). An assistant turn's header (what the generation prompt adds) is context;
its content is trained on up to and including the end-of-sequence token, which ends a model's turn; what the
template writes after that token (a newline) is context again.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")


def check_messages(value, field: str) -> str | None:
    """Why ``value`` (the row's ``field``) is not a list of messages, or None."""
    if not isinstance(value, list) or not value:
        return f"field '{field}' must be a non-empty list of messages ({{\"role\": ..., \"content\": ...}})"
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            return f"field '{where}' must be a message object, got {type(m).__name__}"
        if m.get("role") not in ROLES:
            return f"field '{where}.role' must be one of {', '.join(ROLES)}, got {m.get('role')!r}"
        if not isinstance(m.get("content"), str):
            return f"field '{where}.content' (a string) is missing"
    return None


def check_row(row: dict, kind: str) -> str | None:
    """Why ``row`` is not a valid row of ``kind`` (prompts | eval | expert | responses | episodes: a prompt row whose
    ``answer`` is optional, the input of ``chorus env play``), or None."""
    if kind == "episodes":
        return check_row({"answer": "", **row}, "prompts")
    if kind in ("prompts", "eval"):
        if "messages" in row and "prompt" in row:
            return "both 'prompt' and 'messages': give the prompt in one of them"
        if "messages" in row:
            error = check_messages(row["messages"], "messages")
        elif isinstance(row.get("prompt"), list):
            error = check_messages(row["prompt"], "prompt")
        elif not isinstance(row.get("prompt"), str):
            error = "field 'prompt' (a string) is missing"
        else:
            error = None
        return error or (None if isinstance(row.get("answer"), str) else "field 'answer' (a string) is missing")
    if kind == "expert":
        if "messages" in row:
            if "prompt" in row or "completion" in row or "response" in row:
                return "'messages' holds the whole conversation: no 'prompt', 'completion' or 'response' beside it"
            if error := check_messages(row["messages"], "messages"):
                return error
            roles = [m["role"] for m in row["messages"]]
            if "assistant" not in roles:
                return "field 'messages' has no assistant turn to train on"
            if roles[0] == "assistant":
                return "field 'messages' starts with an assistant turn: the model needs a turn to answer"
            return None
        if isinstance(row.get("prompt"), list):
            if error := check_messages(row["prompt"], "prompt") or check_messages(row.get("completion"), "completion"):
                return error
            if row["completion"][0]["role"] != "assistant":
                return "field 'completion[0].role' must be assistant: the completion is the model's part"
            return None
        response = "completion" if "completion" in row and "response" not in row else "response"
        for key in ("prompt", response):
            if not isinstance(row.get(key), str):
                return f"field '{key}' (a string) is missing"
        return None
    if kind == "responses":  # the input of `chorus reward score`
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                return f"field '{key}' (a string) is missing"
        return None
    raise ValueError(f"unknown data kind {kind!r}")


def conversation(row: dict, *, completion: bool = False) -> list[dict] | None:
    """A chat row's messages, or None for a text row. ``completion``: an expert row's, its ``completion`` joined to
    its ``prompt`` list (a prompt row's ``completion``, if any, is not its prompt: it would hold the answer)."""
    if "messages" in row:
        return row["messages"]
    if isinstance(row.get("prompt"), list):
        return row["prompt"] + (row.get("completion", []) if completion else [])
    return None


class TemplateError(ValueError):
    """A conversation that the chat template cannot render (none, or one that rewrites earlier turns)."""


class ChatRenderer:
    """Token ids of data rows for one tokenizer. ``template``: a Jinja chat template used in place of the
    tokenizer's own ("" = the tokenizer's; a text-only data set needs none). ``model``: named in errors."""

    def __init__(self, tokenizer, template: str = "", model: str = ""):
        self.tok, self.model = tokenizer, model
        self.template = template or getattr(tokenizer, "chat_template", None) or None
        self.eos = tokenizer.eos_token

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.template is None:
            raise TemplateError(f"the model {self.model} has no chat template and the data holds conversations: set "
                                f"model.chat_template to a Jinja template file, or give the rows as text")
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja2's errors and the template's own raise_exception
            raise TemplateError(f"the chat template cannot render it ({type(exc).__name__}: {exc})") from None

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids  # a template writes its own special tokens

    def prompt(self, row: dict) -> tuple[str, list[int]]:
        """(text, token ids) of a prompt row: what the model continues."""
        messages = conversation(row)
        if messages is None:
            return row["prompt"], self.tok(row["prompt"]).input_ids
        text = self.render(messages, generation_prompt=True)
        return text, self.ids(text)

    def expert(self, row: dict) -> tuple[list[int], list[int], list[int] | None]:
        """(prompt ids, response ids, response loss mask) of an expert row. The prompt ends where the first assistant
        turn's content starts; the mask is 1 on assistant content (its end token included) and 0 on the other turns
        and the headers between them; None for a text row (every response token is trained on, and the response
        ends with the end token)."""
        messages = conversation(row, completion=True)
        if messages is None:
            response = row["response"] if "response" in row else row["completion"]
            return self.tok(row["prompt"]).input_ids, self.ids(response) + [self.tok.eos_token_id], None
        # the prompt-completion form trains on the completion only (TRL's convention): an assistant turn inside the
        # prompt list is context
        trained_from = 0 if "messages" in row else len(row["prompt"])
        segments = self.segments(messages, trained_from)
        first = next(i for i, (_, trained) in enumerate(segments) if trained)
        prompt = [t for text, _ in segments[:first] for t in self.ids(text)]
        response, mask = [], []
        for text, trained in segments[first:]:
            ids = self.ids(text)
            response += ids
            mask += [int(trained)] * len(ids)
        if not prompt:
            raise TemplateError("the template renders nothing before the first assistant turn: no prompt to train on")
        return prompt, response, mask

    def segments(self, messages: list[dict], trained_from: int = 0) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained) pieces in order: the content (to the end token) of the
        assistant turns from message ``trained_from`` on trained, the rest not."""
        out: list[tuple[str, bool]] = []
        done = ""  # the rendering of messages[:i]
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                header = self._extend(done, self.render(messages[:i], generation_prompt=True), i, "generation prompt")
                out.append((header[len(done):], False))
                done = header
            full = self._extend(done, self.render(messages[: i + 1], generation_prompt=False), i, "turn")
            text = full[len(done):]
            if m["role"] == "assistant":
                cut = text.find(self.eos) + len(self.eos) if self.eos and self.eos in text else len(text)
                out += [(text[:cut], i >= trained_from), (text[cut:], False)]
            else:
                out.append((text, False))
            done = full
        return [(text, trained) for text, trained in out if text]

    def turns(self, messages: list[dict], new: list[dict]) -> list[int]:
        """The token ids that ``new`` messages (an environment's observation) add after ``messages``, which end
        with the model's turn, up to the next assistant turn's header: what goes between the model's end token and
        its next turn (what the template writes after that end token included)."""
        before = self.render(messages, generation_prompt=False)
        after = self._extend(before, self.render(messages + new, generation_prompt=True), len(messages), "turn")
        end = before.rfind(self.eos) if self.eos else -1
        cut = end + len(self.eos) if end >= 0 and messages[-1]["role"] == "assistant" else len(before)
        return self.ids(after[cut:])

    def _extend(self, prefix: str, text: str, i: int, what: str) -> str:
        if not text.startswith(prefix):
            raise TemplateError(f"the chat template renders message {i}'s {what} by rewriting the turns before it, "
                                f"so their tokens cannot be kept apart; use a template that appends each turn "
                                f"(model.chat_template)")
        return text
