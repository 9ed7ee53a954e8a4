"""rollout/chat.py and the chat forms of data: rows checked with errors that name file, line and field; conversations
rendered with the chat template into prompt, response and a loss mask on the assistant turns only; Hugging Face
`datasets` directories read like JSONL."""

from __future__ import annotations

import json
import re

import pytest
import torch

from actors.datasets import RunData, tokenize
from learners.batch import TrainBatch, collate
from rollout.chat import ChatRenderer, TemplateError, check_row
from rollout.data import DataError, load_rows, write_jsonl
from rollout.tiny import build_tokenizer

CHARS = " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~\n"
TOOL_TALK = [  # the tool-use example's demonstration
    {"role": "system", "content": "calc"},
    {"role": "user", "content": "347+285="},
    {"role": "assistant", "content": "<calc>347+285</calc>"},
    {"role": "tool", "content": "632"},
    {"role": "assistant", "content": "632"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CHARS)


def text(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def test_rows_in_every_form_are_accepted():
    ok = [("prompts", {"prompt": "2+2=", "answer": "4"}),
          ("prompts", {"prompt": [{"role": "user", "content": "2+2="}], "answer": "4"}),
          ("eval", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "answer": "a"}),
          ("expert", {"prompt": "2+2=", "response": "4"}),
          ("expert", {"prompt": "2+2=", "completion": "4"}),  # TRL's prompt-completion text form
          ("expert", {"messages": TOOL_TALK}),
          ("expert", {"prompt": TOOL_TALK[:2], "completion": TOOL_TALK[2:]})]
    for kind, row in ok:
        assert check_row(row, kind) is None, (kind, row)


@pytest.mark.parametrize("kind,row,error", [
    ("prompts", {"messages": [{"role": "bot", "content": "x"}], "answer": "a"},
     "field 'messages[0].role' must be one of system, user, assistant, tool, got 'bot'"),
    ("prompts", {"prompt": [{"role": "user"}], "answer": "a"}, "field 'prompt[0].content' (a string) is missing"),
    ("prompts", {"prompt": [], "answer": "a"}, "field 'prompt' must be a non-empty list of messages"),
    ("prompts", {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "answer": "a"},
     "both 'prompt' and 'messages'"),
    ("eval", {"messages": [{"role": "user", "content": "x"}]}, "field 'answer' (a string) is missing"),
    ("expert", {"messages": TOOL_TALK[:2]}, "field 'messages' has no assistant turn to train on"),
    ("expert", {"messages": TOOL_TALK[2:]}, "field 'messages' starts with an assistant turn"),
    ("expert", {"messages": TOOL_TALK, "response": "x"}, "'messages' holds the whole conversation"),
    ("expert", {"prompt": TOOL_TALK[:2], "completion": TOOL_TALK[3:]}, "field 'completion[0].role' must be assistant"),
    ("expert", {"prompt": TOOL_TALK[:2]}, "field 'completion' must be a non-empty list of messages"),
    ("expert", {"prompt": "x"}, "field 'response' (a string) is missing"),
])
def test_a_bad_row_says_which_field_is_wrong(kind, row, error):
    assert check_row(row, kind).startswith(error)


def test_a_bad_message_in_a_file_names_file_line_and_field(tmp_path):
    path = tmp_path / "expert.jsonl"
    path.write_text(json.dumps({"messages": TOOL_TALK}) + "\n"
                    + json.dumps({"messages": [*TOOL_TALK[:3], {"role": "tool", "content": 632}]}) + "\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: field 'messages\\[3\\].content'"):
        load_rows(path, "expert")


def test_an_expert_conversation_trains_on_the_assistant_turns_only(tok):
    prompt, response, mask = ChatRenderer(tok).expert({"messages": TOOL_TALK})
    # the template (rollout/tiny.py): "S:calc\nU:347+285=\nA:" opens the model's turn; its content and end token are
    # trained; the tool's turn and the next header are context
    assert text(tok, prompt) == "S:calc\nU:347+285=\nA:"
    assert text(tok, response) == "<calc>347+285</calc></s>T:632\nA:632</s>"
    trained = "".join(text(tok, [t]) for t, m in zip(response, mask) if m)
    context = "".join(text(tok, [t]) for t, m in zip(response, mask) if not m)
    assert trained == "<calc>347+285</calc></s>632</s>" and context == "T:632\nA:"
    assert mask == [1] * 21 + [0] * 8 + [1] * 4  # 20 characters and </s>; "T:632\nA:"; "632" and </s>
    # the prompt-completion form of the same conversation gives the same tokens
    assert ChatRenderer(tok).expert({"prompt": TOOL_TALK[:2], "completion": TOOL_TALK[2:]}) == (prompt, response, mask)


def test_text_rows_are_tokenized_as_before(tok):
    r = ChatRenderer(tok)
    assert r.prompt({"prompt": "ab=", "answer": "ba"}) == ("ab=", tok("ab=").input_ids)
    assert r.expert({"prompt": "ab=", "response": "ba"}) == (tok("ab=").input_ids,
                                                            tok("ba").input_ids + [tok.eos_token_id], None)


def test_a_chat_prompt_ends_with_the_generation_prompt(tok):
    text_, ids = ChatRenderer(tok).prompt({"messages": TOOL_TALK[:2], "answer": "632"})
    assert text_ == "S:calc\nU:347+285=\nA:" and text(tok, ids) == text_


def test_what_a_template_writes_after_the_end_token_is_context(tok):
    # ChatML's shape: the end token, then a newline before the next turn
    chatml = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}"
              "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")
    r = ChatRenderer(tok, chatml)
    prompt, response, mask = r.expert({"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "yo"},
                                                    {"role": "user", "content": "ok"},
                                                    {"role": "assistant", "content": "ya"}]})
    assert text(tok, prompt) == "<user>hi\n<assistant>"
    assert [(text(tok, [t]), m) for t, m in zip(response, mask)][:4] == [("y", 1), ("o", 1), ("</s>", 1), ("\n", 0)]
    assert "".join(text(tok, [t]) for t, m in zip(response, mask) if m) == "yo</s>ya</s>"
    # an observation after the model's turn starts after its end token, newline included
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert text(tok, r.turns(history, [{"role": "user", "content": "ok"}])) == "\n<user>ok\n<assistant>"


def test_observation_turns_of_the_tiny_template(tok):
    r = ChatRenderer(tok)
    assert text(tok, r.turns(TOOL_TALK[:3], [TOOL_TALK[3]])) == "T:632\nA:"


def test_conversations_without_a_template_or_with_one_that_rewrites_turns_are_refused(tok):
    plain = build_tokenizer(CHARS)
    plain.chat_template = None
    with pytest.raises(TemplateError, match="the model m has no chat template .* set model.chat_template"):
        ChatRenderer(plain, model="m").expert({"messages": TOOL_TALK})
    # a template that writes only the last turn: turn i is not what rendering i + 1 messages adds
    last_only = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}A:{% endif %}"
    with pytest.raises(TemplateError, match="rewriting the turns before it"):
        ChatRenderer(tok, last_only).expert({"messages": TOOL_TALK})


def test_tokenize_renders_chat_rows_and_names_the_row_it_cannot_render(tok):
    rows = [{"prompt": "ab=", "answer": "ba"}, {"messages": TOOL_TALK[:2], "answer": "632"}]
    data = RunData(prompts=[dict(r) for r in rows], expert=[{"messages": TOOL_TALK}], eval_sets={"target": []},
                   paths={"prompts": "p.jsonl", "expert": "e.jsonl"})
    tokens = tokenize(data, tok)
    assert tokens.prompts[0] == tok("ab=").input_ids
    assert text(tok, tokens.prompts[1]) == "S:calc\nU:347+285=\nA:"
    # a reward gets the rendered text as the prompt, and the messages beside it
    assert data.prompts[1]["prompt"] == "S:calc\nU:347+285=\nA:" and data.prompts[1]["messages"] == TOOL_TALK[:2]
    assert tokens.expert[0][2] is not None
    bad = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    data.expert.append(bad)
    with pytest.raises(DataError, match=r"^e.jsonl: row 2: the model m has no chat template"):
        plain = build_tokenizer(CHARS)
        plain.chat_template = None
        data.prompts = data.prompts[:1]
        data.expert = [{"prompt": "a", "response": "b"}, bad]
        tokenize(data, plain, model="m")


def test_the_loss_mask_reaches_the_collated_mask_and_the_token_counts(tok):
    prompt, response, mask = ChatRenderer(tok).expert({"messages": TOOL_TALK})
    batch = TrainBatch(input_ids=[prompt + response, [5, 6, 7]], prompt_lens=[len(prompt), 1],
                       old_logprobs=[[0.0] * len(response), [0.0, 0.0]], advantages=[[0.0] * len(response), [0.0] * 2],
                       is_expert=[True, False], loss_mask=[mask, [1, 1]])
    t = collate(batch, pad_id=0)
    P = len(prompt)
    assert t.mask[0, P - 1 : P - 1 + len(response)].tolist() == [float(m) for m in mask]
    assert t.mask[0].sum() == 25 and t.mask[0, : P - 1].sum() == 0  # 21 + 4 trained tokens, none in the prompt
    assert batch.token_counts() == (2, 25)
    assert batch.counts() == {"n_rl_tokens": 2, "n_rl_seqs": 1, "n_sft_tokens": 25}
    # a filler and a selection keep the field
    assert batch.filler().loss_mask == [[]] and batch.select([1]).loss_mask == [[1, 1]]
    assert torch.equal(collate(batch.select([1]), pad_id=0).mask, torch.tensor([[1.0, 1.0]]))


def test_hf_datasets_directories_are_read_like_jsonl(tmp_path):
    import datasets

    rows = [{"messages": TOOL_TALK[:2], "answer": "632"}, {"messages": TOOL_TALK[:2], "answer": "633"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert load_rows(tmp_path / "one", "prompts") == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    assert load_rows(tmp_path / "dict", "prompts") == rows  # one split: that split
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)})
    both.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="a DatasetDict of splits train, test: name one, e.g. .*two/train"):
        load_rows(tmp_path / "two", "prompts")
    assert load_rows(tmp_path / "two" / "train", "prompts") == rows
    datasets.Dataset.from_list([{"messages": [{"role": "robot", "content": "x"}], "answer": "a"}]).save_to_disk(
        str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad: row 1: field 'messages\[0\].role'"):
        load_rows(tmp_path / "bad", "prompts")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a directory that no `datasets` save_to_disk wrote"):
        load_rows(tmp_path / "empty", "prompts")


def test_parquet_conversations_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": TOOL_TALK}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    assert load_rows(tmp_path / "e.parquet", "expert") == rows
    write_jsonl(tmp_path / "e.jsonl", rows)
    assert load_rows(tmp_path / "e.jsonl", "expert") == rows


def test_the_prompt_completion_form_trains_on_the_completion_only(tok):
    # an assistant turn inside the prompt list is context, as TRL's prompt-completion form means it
    row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"},
                      {"role": "user", "content": "again"}],
           "completion": [{"role": "assistant", "content": "new"}]}
    prompt, response, mask = ChatRenderer(tok).expert(row)
    assert text(tok, prompt) == "U:hi\nA:old</s>U:again\nA:" and text(tok, response) == "new</s>"
    assert mask == [1, 1, 1, 1]
    # the same turns as `messages` train on both assistant turns
    _, response, mask = ChatRenderer(tok).expert({"messages": row["prompt"] + row["completion"]})
    assert "".join(text(tok, [t]) for t, m in zip(response, mask) if m) == "old</s>new</s>"


def test_a_prompt_rows_completion_stays_out_of_its_prompt(tok):
    row = {"prompt": [{"role": "user", "content": "1+2="}], "completion": [{"role": "assistant", "content": "3"}],
           "answer": "3"}
    assert check_row(row, "prompts") is None
    assert ChatRenderer(tok).prompt(row)[0] == "U:1+2=\nA:"  # not the answer
